//! The shim's routing table: for every service VIP:port, the ordered http
//! rules of its VirtualService compiled for that port (matches,
//! destinations with live weights, policies), and the destinations'
//! endpoints. Built once per config or weight change, then swapped in
//! whole; requests in flight keep the table they started with.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::ShimOptions;
use super::balance::{Cluster, Endpoint, HashPolicy, Health, OutlierConfig};
use super::matcher::Match;
use super::policy::{
    DirectResponse, Fault, Fraction, HeaderPolicy, Redirect, RetryPolicy, Rewrite, timeout,
};
use crate::compile::{CompiledService, DataPath, KernelRoute, RoutingTable};
use crate::config::istio::{Destination, HttpRoute, SimpleLb};
use crate::config::{ConfigWarning, LoadedConfig, VirtualService, duration};
use crate::observe::{Label, Workload};

pub(crate) struct Table {
    pub services: HashMap<SocketAddr, Arc<ServiceRoutes>>,
    /// VIP:ports of services whose data path is the shim.
    pub shim_vips: HashSet<SocketAddr>,
    /// Every destination, once (for `Shim::ejected`).
    pub clusters: Vec<Arc<Cluster>>,
}

impl Table {
    pub fn empty() -> Table {
        Table {
            services: HashMap::new(),
            shim_vips: HashSet::new(),
            clusters: Vec::new(),
        }
    }
}

pub(crate) struct ServiceRoutes {
    pub host: Label,
    pub name: Label,
    pub namespace: Label,
    pub routes: Vec<Route>,
}

pub(crate) struct Route {
    /// The route's `name` (for logs).
    pub name: Option<String>,
    /// OR of blocks; empty: every request.
    pub matches: Vec<Match>,
    pub action: Action,
    pub headers: HeaderPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
}

pub(crate) enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct(DirectResponse),
}

pub(crate) struct Forward {
    /// In the kernel's fixed order (DestinationRule subset order).
    pub dests: Vec<Dest>,
    pub weights: Vec<u32>,
    /// Cumulative bands of `weights` on [0, 10000).
    pub bands: Vec<u32>,
    /// The route's consistent hash (the first destination's that has one).
    pub hash: Option<HashPolicy>,
}

pub(crate) struct Dest {
    pub cluster: Arc<Cluster>,
    pub headers: HeaderPolicy,
    /// canary extension (`canary.io/destination-policy`): replaces the
    /// route's timeout / retries for this destination.
    pub timeout: Option<Option<Duration>>,
    pub retry: Option<RetryPolicy>,
}

pub(crate) struct Mirror {
    pub cluster: Arc<Cluster>,
    pub fraction: Fraction,
}

/// Endpoint health by (host, subset, address), carried across updates.
pub(crate) type HealthMap = HashMap<(String, Option<String>, SocketAddr), Arc<Health>>;

pub(crate) struct Builder<'a> {
    cfg: &'a LoadedConfig,
    options: &'a ShimOptions,
    old_health: &'a HealthMap,
    pub health: HealthMap,
    clusters: HashMap<(String, Option<String>, u16, bool), Arc<Cluster>>,
    pub warnings: Vec<ConfigWarning>,
}

impl<'a> Builder<'a> {
    pub fn new(cfg: &'a LoadedConfig, options: &'a ShimOptions, old_health: &'a HealthMap) -> Self {
        Builder {
            cfg,
            options,
            old_health,
            health: HashMap::new(),
            clusters: HashMap::new(),
            warnings: Vec::new(),
        }
    }

    pub fn build(mut self, table: &RoutingTable) -> (Table, HealthMap, Vec<ConfigWarning>) {
        let mut out = Table::empty();
        for s in &table.services {
            for vip in &s.vips {
                for port in &s.ports {
                    let key = SocketAddr::new(*vip, port.port);
                    let routes = self.routes(s, port.port, vip.is_ipv4());
                    out.services.insert(
                        key,
                        Arc::new(ServiceRoutes {
                            host: s.host.as_str().into(),
                            name: s.name.as_str().into(),
                            namespace: s.namespace.as_str().into(),
                            routes,
                        }),
                    );
                    if matches!(s.path, DataPath::Shim { .. }) {
                        out.shim_vips.insert(key);
                    }
                }
            }
        }
        out.clusters = self.clusters.values().cloned().collect();
        let mut warnings: Vec<ConfigWarning> = Vec::new();
        for w in self.warnings {
            if !warnings.contains(&w) {
                warnings.push(w);
            }
        }
        (out, self.health, warnings)
    }

    /// The rules that apply on `port`, in order, up to the first that
    /// takes every request (Istio drops the rest).
    fn routes(&mut self, s: &CompiledService, port: u16, v4: bool) -> Vec<Route> {
        let cfg = self.cfg;
        let vs = cfg
            .virtual_service(&s.host)
            .filter(|v| !v.spec.http.is_empty());
        let Some(vs) = vs else {
            // No http rules: the service default, with Istio's default
            // retry policy and the DestinationRule's hash.
            let cluster = self.cluster(&s.host, None, port, v4);
            return vec![Route {
                name: None,
                matches: Vec::new(),
                action: Action::Forward(forward(vec![(dest(cluster), 100)])),
                headers: HeaderPolicy::default(),
                fault: None,
                mirrors: Vec::new(),
                rewrite: None,
                timeout: None,
                retry: RetryPolicy::istio_default(),
            }];
        };
        let mut routes = Vec::new();
        for (i, r) in vs.spec.http.iter().enumerate() {
            let f = format!("spec.http[{i}]");
            let matches = match &r.matches {
                None => Vec::new(),
                Some(blocks) if blocks.is_empty() => Vec::new(),
                Some(blocks) => {
                    let here: Vec<_> = blocks
                        .iter()
                        .filter(|m| m.applies_to_mesh() && m.allows_port(port))
                        .collect();
                    if here.is_empty() {
                        // Istio does not generate the route for this port.
                        continue;
                    }
                    if here.iter().any(|m| m.condition_fields().is_empty()) {
                        Vec::new()
                    } else {
                        here.iter().filter_map(|m| Match::from_istio(m)).collect()
                    }
                }
            };
            let catch_all = matches.is_empty();
            let Some(action) = self.action(s, vs, i, r, port, v4) else {
                continue;
            };
            let mut bad = Vec::new();
            let headers = HeaderPolicy::from_istio(r.headers.as_ref(), &mut bad);
            for b in bad {
                self.warn(
                    vs,
                    &format!("{f}.headers"),
                    format!("{b}: not a valid header; ignored"),
                );
            }
            if r.cors_policy.is_some() {
                self.warn(
                    vs,
                    &format!("{f}.corsPolicy"),
                    "corsPolicy is not enforced by the canary shim; requests pass as they are"
                        .to_string(),
                );
            }
            let mirrors = self.mirrors(r, port, v4);
            routes.push(Route {
                name: r.name.clone(),
                matches,
                action,
                headers,
                fault: r.fault.as_ref().map(Fault::from_istio),
                mirrors,
                rewrite: r.rewrite.as_ref().map(Rewrite::from_istio),
                timeout: timeout(r.timeout.as_deref()),
                retry: RetryPolicy::from_istio(r.retries.as_ref()),
            });
            if catch_all {
                break;
            }
        }
        routes
    }

    fn action(
        &mut self,
        s: &CompiledService,
        vs: &VirtualService,
        i: usize,
        r: &HttpRoute,
        port: u16,
        v4: bool,
    ) -> Option<Action> {
        if let Some(rd) = &r.redirect {
            return Some(Action::Redirect(Redirect::from_istio(rd)));
        }
        if let Some(d) = &r.direct_response {
            return Some(Action::Direct(DirectResponse::from_istio(d)));
        }
        if r.route.is_empty() {
            return None;
        }
        // The weights in force: `canary weights` overrides are in the
        // compiled table (the rule's own entry, or the port's kernel route
        // when this rule is it).
        let origin = format!("virtualservice http[{i}]");
        let live: Option<&KernelRoute> =
            s.http_routes
                .iter()
                .find(|k| k.origin == origin)
                .or_else(|| {
                    s.ports
                        .iter()
                        .map(|p| &p.route)
                        .find(|k| k.origin == origin)
                });
        let targets: Vec<(String, Option<String>, u32)> = match live {
            Some(k) => k
                .destinations
                .iter()
                .map(|d| (d.host.clone(), d.subset.clone(), d.weight))
                .collect(),
            None => {
                let single = r.route.len() == 1;
                r.route
                    .iter()
                    .filter_map(|d| {
                        let dst = d.destination.as_ref()?;
                        let w = if single {
                            100
                        } else {
                            d.weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(0)
                        };
                        Some((dst.host.clone()?, dst.subset.clone(), w))
                    })
                    .collect()
            }
        };
        let mut dests = Vec::with_capacity(targets.len());
        for (k, (host, subset, weight)) in targets.into_iter().enumerate() {
            let entry = r.route.iter().find(|d| {
                d.destination
                    .as_ref()
                    .is_some_and(|x| x.host.as_deref() == Some(&host) && x.subset == subset)
            });
            let dport = dest_port(
                self.cfg,
                entry.and_then(|e| e.destination.as_ref()),
                &host,
                port,
            );
            let cluster = self.cluster(&host, subset.as_deref(), dport, v4);
            let mut bad = Vec::new();
            let headers =
                HeaderPolicy::from_istio(entry.and_then(|e| e.headers.as_ref()), &mut bad);
            for b in bad {
                self.warn(
                    vs,
                    &format!("spec.http[{i}].route[{k}].headers"),
                    format!("{b}: not a valid header; ignored"),
                );
            }
            let policies: Vec<_> = vs
                .destination_policies
                .iter()
                .filter(|p| p.applies(r.name.as_deref(), &host, subset.as_deref()))
                .collect();
            let timeout_override = policies
                .iter()
                .find_map(|p| p.timeout.as_deref())
                .map(|t| timeout(Some(t)));
            let retry_override = policies
                .iter()
                .find_map(|p| p.retries.as_ref())
                .map(|r| RetryPolicy::from_istio(Some(r)));
            dests.push((
                Dest {
                    cluster,
                    headers,
                    timeout: timeout_override,
                    retry: retry_override,
                },
                weight,
            ));
        }
        Some(Action::Forward(forward(dests)))
    }

    fn mirrors(&mut self, r: &HttpRoute, port: u16, v4: bool) -> Vec<Mirror> {
        let mut out = Vec::new();
        let mut add = |b: &mut Self, d: &Destination, fraction: Fraction| {
            let Some(host) = d.host.clone() else {
                return;
            };
            if fraction.0 == 0 {
                return;
            }
            let dport = dest_port(b.cfg, Some(d), &host, port);
            let cluster = b.cluster(&host, d.subset.as_deref(), dport, v4);
            out.push(Mirror { cluster, fraction });
        };
        if let Some(m) = &r.mirror {
            // Absent: 100%; explicit 0: off (istio-semantics §1.6).
            let f = Fraction::from_istio(
                r.mirror_percentage.as_ref(),
                r.mirror_percent,
                Fraction::ALL,
            );
            add(self, m, f);
        }
        for m in &r.mirrors {
            if let Some(d) = &m.destination {
                add(
                    self,
                    d,
                    Fraction::from_istio(m.percentage.as_ref(), None, Fraction::ALL),
                );
            }
        }
        out
    }

    fn cluster(&mut self, host: &str, subset: Option<&str>, port: u16, v4: bool) -> Arc<Cluster> {
        let key = (host.to_string(), subset.map(str::to_string), port, v4);
        if let Some(c) = self.clusters.get(&key) {
            return c.clone();
        }
        let cfg = self.cfg;
        let policy = cfg.policy(host, subset, port);
        let lb = policy.load_balancer.as_ref();
        let hash = lb
            .and_then(|l| l.hash_key())
            .and_then(HashPolicy::from_istio);
        let simple = lb
            .and_then(|l| l.simple_lb())
            .unwrap_or(SimpleLb::LeastRequest);
        let mut bad = Vec::new();
        let outlier = policy
            .outlier_detection
            .as_ref()
            .and_then(|j| OutlierConfig::from_istio(j, &mut bad));
        if let Some(dr) = cfg.destination_rule(host) {
            for b in bad {
                self.warnings.push(
                    dr.meta
                        .warning("spec.trafficPolicy", format!("{b}; default used")),
                );
            }
        }
        // Istio applies only values above zero (a 0 means "not set").
        let mut pool_duration = |section: &str, field: &str| {
            let value = policy
                .connection_pool
                .as_ref()
                .and_then(|c| c.get(section)?.get(field).cloned())?;
            let parsed = value.as_str().and_then(duration::parse);
            if parsed.is_none()
                && let Some(dr) = cfg.destination_rule(host)
            {
                self.warnings.push(dr.meta.warning(
                    &format!("spec.trafficPolicy.connectionPool.{section}.{field}"),
                    format!("{value} is not a duration such as \"10s\" or \"1h\"; default used"),
                ));
            }
            parsed.filter(|d| !d.is_zero())
        };
        let limits = super::upstream::Limits {
            connect_timeout: pool_duration("tcp", "connectTimeout")
                .unwrap_or(self.options.connect_timeout),
            idle_timeout: pool_duration("http", "idleTimeout")
                .unwrap_or(self.options.upstream_idle_timeout),
        };
        let (service_name, service_namespace) = cfg
            .service(host)
            .map(|s| (s.meta.name.clone(), s.meta.namespace.clone()))
            .unwrap_or_else(|| {
                (
                    crate::config::host::short_name(host).to_string(),
                    "unknown".into(),
                )
            });
        let subset_version = subset.map(|s| {
            cfg.destination_rule(host)
                .and_then(|dr| dr.subset(s))
                .and_then(|x| x.labels.get("version").cloned())
                .unwrap_or_else(|| s.to_string())
        });
        let endpoints = crate::compile::endpoints(cfg, host, subset, port)
            .into_iter()
            .filter(|e| e.addr.is_ipv4() == v4)
            .map(|e| {
                let hkey = (host.to_string(), subset.map(str::to_string), e.addr);
                let health = self.old_health.get(&hkey).cloned().unwrap_or_default();
                self.health.insert(hkey, health.clone());
                Endpoint {
                    addr: e.addr,
                    workload: endpoint_workload(
                        cfg,
                        &e.namespace,
                        &e.pod,
                        subset_version.as_deref(),
                    ),
                    pod: e.pod,
                    health,
                }
            })
            .collect();
        let c = Arc::new(Cluster::new(
            host.to_string(),
            subset.map(str::to_string),
            port,
            service_name,
            service_namespace,
            endpoints,
            hash,
            simple,
            outlier,
            limits,
        ));
        self.clusters.insert(key, c.clone());
        c
    }

    fn warn(&mut self, vs: &VirtualService, field: &str, message: String) {
        self.warnings.push(vs.meta.warning(field, message));
    }
}

fn dest(cluster: Arc<Cluster>) -> Dest {
    Dest {
        cluster,
        headers: HeaderPolicy::default(),
        timeout: None,
        retry: None,
    }
}

fn forward(dests: Vec<(Dest, u32)>) -> Forward {
    let weights: Vec<u32> = dests.iter().map(|(_, w)| *w).collect();
    let bands = crate::compile::bands(&weights);
    let dests: Vec<Dest> = dests.into_iter().map(|(d, _)| d).collect();
    let hash = dests.iter().find_map(|d| d.cluster.hash.clone());
    Forward {
        dests,
        weights,
        bands,
        hash,
    }
}

/// The destination's Service port: the one the rule names; else its only
/// port; else the port the client connected to (as the compiler does).
fn dest_port(cfg: &LoadedConfig, d: Option<&Destination>, host: &str, listener: u16) -> u16 {
    if let Some(n) = d
        .and_then(|d| d.port.as_ref())
        .and_then(|p| p.number)
        .and_then(|n| u16::try_from(n).ok())
    {
        return n;
    }
    match cfg.service(host) {
        Some(s) if s.ports.len() == 1 => s.ports[0].port,
        _ => listener,
    }
}

/// The destination labels of an endpoint: its pod's workload (one rule for
/// HTTP and TCP series, `metrics::workload_of`), with the subset's version.
fn endpoint_workload(cfg: &LoadedConfig, ns: &str, name: &str, version: Option<&str>) -> Workload {
    let mut w = cfg
        .pods
        .iter()
        .find(|p| p.meta.namespace == ns && p.meta.name == name)
        .map(crate::metrics::workload_of_pod)
        .unwrap_or_else(|| crate::metrics::workload_of(name, ns, &BTreeMap::new(), &[]));
    if let Some(v) = version {
        w.version = v.into();
    }
    w
}
