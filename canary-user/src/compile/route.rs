//! The split the kernel applies on one Service port.

use super::endpoints;
use super::model::{CompiledDestination, DataPath, EndpointPick, KernelRoute, StickyKey};
use crate::config::istio::{Destination, HashKey, HttpRoute, TcpRoute};
use crate::config::{ConfigWarning, LoadedConfig, Service, VirtualService};

/// The VirtualService rule that the kernel applies on a port.
enum PortRule<'a> {
    Tcp(usize, &'a TcpRoute),
    Http(usize, &'a HttpRoute),
    /// No rule applies: the whole service, like Istio's TCP fallback.
    Default,
}

/// Picks the rule for `port`: the first `tcp` rule whose matches let the
/// port through (a rule with other L4 conditions is skipped: the kernel
/// cannot evaluate them); with no `tcp` rules, the first `http` rule that
/// forwards and takes every request on the port (no match, or a match on
/// the port alone).
fn rule_for_port<'a>(
    vs: &'a VirtualService,
    port: u16,
    warnings: &mut Vec<ConfigWarning>,
) -> PortRule<'a> {
    if !vs.spec.tcp.is_empty() {
        for (i, r) in vs.spec.tcp.iter().enumerate() {
            if r.matches.is_empty() {
                return PortRule::Tcp(i, r);
            }
            let mut l4: Vec<&str> = r.matches.iter().flat_map(|m| m.non_port_fields()).collect();
            l4.dedup();
            if !l4.is_empty() {
                warnings.push(vs.meta.warning(
                    &format!("spec.tcp[{i}].match"),
                    format!(
                        "matches on {} cannot be evaluated by canary; rule skipped",
                        l4.join(", ")
                    ),
                ));
                continue;
            }
            let applies = r
                .matches
                .iter()
                .filter(|m| m.applies_to_mesh())
                .any(|m| m.port.is_none_or(|p| p == i64::from(port)));
            if applies {
                return PortRule::Tcp(i, r);
            }
        }
        return PortRule::Default;
    }
    for (i, r) in vs.spec.http.iter().enumerate() {
        if !r.route.is_empty() && r.catches_all_on(Some(port)) {
            return PortRule::Http(i, r);
        }
    }
    PortRule::Default
}

/// One destination of the rule, before compilation.
struct Target<'a> {
    /// `spec.http[1].route[0]`, for messages.
    field: String,
    host: &'a str,
    subset: Option<&'a str>,
    port: Option<u16>,
    weight: u32,
}

impl<'a> Target<'a> {
    fn from_destination(
        field: String,
        d: Option<&'a Destination>,
        weight: Option<i64>,
    ) -> Option<Self> {
        let d = d?;
        Some(Target {
            field,
            host: d.host.as_deref()?,
            subset: d.subset.as_deref(),
            port: d
                .port
                .as_ref()
                .and_then(|p| p.number)
                .and_then(|n| u16::try_from(n).ok()),
            // Validated: 0 ≤ weight ≤ u32::MAX.
            weight: weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(0),
        })
    }
}

pub(crate) fn kernel_route(
    cfg: &LoadedConfig,
    svc: &Service,
    vs: Option<&VirtualService>,
    port: u16,
    path: &DataPath,
    warnings: &mut Vec<ConfigWarning>,
) -> KernelRoute {
    let kernel = matches!(path, DataPath::Kernel);
    let rule = match vs {
        Some(vs) => rule_for_port(vs, port, warnings),
        None => PortRule::Default,
    };
    let (name, origin, mut targets): (Option<String>, String, Vec<Target<'_>>) = match rule {
        PortRule::Tcp(i, r) => (
            None,
            format!("virtualservice tcp[{i}]"),
            r.route
                .iter()
                .enumerate()
                .filter_map(|(k, d)| {
                    Target::from_destination(
                        format!("spec.tcp[{i}].route[{k}]"),
                        d.destination.as_ref(),
                        d.weight,
                    )
                })
                .collect(),
        ),
        PortRule::Http(i, r) => (
            r.name.clone(),
            format!("virtualservice http[{i}]"),
            r.route
                .iter()
                .enumerate()
                .filter_map(|(k, d)| {
                    Target::from_destination(
                        format!("spec.http[{i}].route[{k}]"),
                        d.destination.as_ref(),
                        d.weight,
                    )
                })
                .collect(),
        ),
        PortRule::Default => {
            if let Some(vs) = vs
                && kernel
            {
                let kind = if vs.spec.tcp.is_empty() {
                    "http"
                } else {
                    "tcp"
                };
                warnings.push(vs.meta.warning(
                    "spec",
                    format!(
                        "no {kind} rule applies to port {port} of {}; that port gets the service \
                         default (all ready pods), like Istio's TCP fallback",
                        svc.host
                    ),
                ));
            }
            (
                None,
                "service default".to_string(),
                vec![Target {
                    field: String::new(),
                    host: &svc.host,
                    subset: None,
                    port: Some(port),
                    weight: 100,
                }],
            )
        }
    };
    fix_order(cfg, &mut targets);

    let mut destinations = Vec::with_capacity(targets.len());
    for t in &targets {
        destinations.push(compile_destination(cfg, svc, vs, port, t, warnings));
    }
    let sticky = (!destinations.is_empty()
        && destinations.iter().all(|d| d.pick == EndpointPick::Maglev))
    .then_some(StickyKey::SourceIp);
    KernelRoute {
        name,
        origin,
        sticky,
        destinations,
    }
}

fn compile_destination(
    cfg: &LoadedConfig,
    svc: &Service,
    vs: Option<&VirtualService>,
    listener_port: u16,
    t: &Target<'_>,
    warnings: &mut Vec<ConfigWarning>,
) -> CompiledDestination {
    // The destination's Service port: the one the rule names; else its only
    // port; else the port the client connected to.
    let dest_svc = cfg.service(t.host);
    let port = t.port.unwrap_or_else(|| match dest_svc {
        Some(d) if d.ports.len() == 1 => d.ports[0].port,
        _ => listener_port,
    });
    let label = match t.subset {
        Some(s) => format!("{} subset {s}", t.host),
        None => t.host.to_string(),
    };
    let warn = |warnings: &mut Vec<ConfigWarning>, message: String| {
        let w = match vs {
            Some(vs) => vs.meta.warning(&t.field, message),
            None => svc.meta.warning("", message),
        };
        warnings.push(w);
    };
    let endpoints = match dest_svc {
        Some(d) if d.port(port).is_none() => {
            warn(
                warnings,
                format!(
                    "{label}: Service {} has no port {port} (it has {}); no endpoints",
                    t.host,
                    d.port_list()
                ),
            );
            Vec::new()
        }
        _ => {
            let (eps, pod_warnings) = endpoints::resolve(cfg, t.host, t.subset, port);
            warnings.extend(pod_warnings);
            eps
        }
    };
    if endpoints.is_empty() && t.weight > 0 {
        warn(
            warnings,
            format!("{label} has no ready endpoints; connections sent to it will fail"),
        );
    }
    let policy = cfg.policy(t.host, t.subset, port);
    let source_ip = policy
        .load_balancer
        .as_ref()
        .and_then(|lb| lb.hash_key())
        .is_some_and(|k| k == HashKey::SourceIp);
    CompiledDestination {
        host: t.host.to_string(),
        subset: t.subset.map(str::to_string),
        weight: t.weight,
        file_weight: t.weight,
        pick: if source_ip {
            EndpointPick::Maglev
        } else {
            EndpointPick::Random
        },
        endpoints,
    }
}

/// A single destination takes all the traffic, whatever its weight says;
/// then a fixed order (host, DestinationRule subset order), so that
/// changing weights never reorders the bands.
fn fix_order(cfg: &LoadedConfig, targets: &mut [Target<'_>]) {
    if let [only] = targets {
        only.weight = 100;
    }
    targets.sort_by_key(|t| {
        let rank = t
            .subset
            .map(|s| {
                cfg.destination_rule(t.host)
                    .and_then(|dr| dr.subset_index(s))
                    .map_or(usize::MAX, |i| i + 1)
            })
            .unwrap_or(0);
        (t.host, rank, t.subset)
    });
}

/// The weighted split of every http rule of `vs` that forwards, in rule
/// order (`origin` `"virtualservice http[i]"`), destinations in the same
/// fixed order as the kernel's; no endpoints.
pub(crate) fn http_routes(cfg: &LoadedConfig, vs: &VirtualService) -> Vec<KernelRoute> {
    vs.spec
        .http
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.route.is_empty())
        .map(|(i, r)| {
            let mut targets: Vec<Target<'_>> = r
                .route
                .iter()
                .enumerate()
                .filter_map(|(k, d)| {
                    Target::from_destination(
                        format!("spec.http[{i}].route[{k}]"),
                        d.destination.as_ref(),
                        d.weight,
                    )
                })
                .collect();
            fix_order(cfg, &mut targets);
            KernelRoute {
                name: r.name.clone(),
                origin: format!("virtualservice http[{i}]"),
                sticky: None,
                destinations: targets
                    .iter()
                    .map(|t| CompiledDestination {
                        host: t.host.to_string(),
                        subset: t.subset.map(str::to_string),
                        weight: t.weight,
                        file_weight: t.weight,
                        pick: EndpointPick::Random,
                        endpoints: Vec::new(),
                    })
                    .collect(),
            }
        })
        .collect()
}
