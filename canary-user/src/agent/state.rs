//! The agent's state: the last good config, live overrides, and the
//! dataplane they are pushed into. Every change goes through `push`, which
//! either lands in the kernel completely or leaves it as it was.

use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};

use super::AgentOptions;
use super::overrides::{Override, Overrides, file_weights};
use super::shim_host::ShimHost;
use super::status::{service_status, with_live};
use crate::admin::protocol::*;
use crate::admin::server::Handler;
use crate::compile::{RoutingTable, apply_weights, compile};
use crate::config::{LoadedConfig, load_path};
use crate::dataplane::{Dataplane, encode, identities};
use crate::metrics::Metrics;

pub struct Agent {
    opts: AgentOptions,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
    shim: Arc<ShimHost>,
    netns_listing: Mutex<Option<Vec<(String, u64)>>>,
}

struct Inner {
    dataplane: Dataplane,
    shim: Arc<ShimHost>,
    shim_port: u16,
    /// The last config that passed validation.
    cfg: Option<Arc<LoadedConfig>>,
    /// Endpoints the shim's outlier detection has ejected: kept out of the
    /// kernel's tables too.
    ejected: Ejected,
    metrics: Arc<Metrics>,
    /// Compiled from the last config that passed validation.
    file_table: Option<RoutingTable>,
    overrides: Overrides,
    /// What the kernel serves now.
    live: RoutingTable,
    generation: u64,
    reloads: u64,
    rejected: u64,
    last_error: Option<String>,
}

impl Agent {
    pub fn new(
        opts: AgentOptions,
        dataplane: Dataplane,
        overrides: Overrides,
        shim: Arc<ShimHost>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics: metrics.clone(),
            inner: Mutex::new(Inner {
                dataplane,
                shim: shim.clone(),
                shim_port: opts.shim_port,
                cfg: None,
                ejected: Ejected::new(),
                metrics,
                file_table: None,
                overrides,
                live: RoutingTable::default(),
                generation: 0,
                reloads: 0,
                rejected: 0,
                last_error: None,
            }),
            opts,
            shim,
            netns_listing: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock must not wedge the admin socket.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads, validates and compiles the config files and pushes the result
    /// (with live overrides) into the kernel. A rejected config changes
    /// nothing: the error is kept for `status` and the old routes stay.
    pub fn reload(&self) -> Result<()> {
        let mut inner = self.lock();
        inner.reloads += 1;
        let result = load_path(&self.opts.config)
            .map_err(|e| anyhow!("{e}"))
            .and_then(|cfg| {
                for w in &cfg.warnings {
                    tracing::warn!("config: {w}");
                }
                let file_table = compile(&cfg);
                let (table, dropped) = inner.overrides.apply(&file_table);
                for d in dropped {
                    tracing::warn!("dropping live override: {d}");
                }
                let previous = inner.cfg.replace(Arc::new(cfg));
                if let Err(e) = inner.push(table) {
                    inner.cfg = previous;
                    return Err(e);
                }
                inner.file_table = Some(file_table);
                Ok(())
            });
        inner.metrics.config_reload(result.is_ok());
        match &result {
            Ok(()) => {
                inner.last_error = None;
                tracing::info!(
                    config = %self.opts.config.display(),
                    services = inner.live.services.len(),
                    generation = inner.generation,
                    "config applied"
                );
            }
            Err(e) => {
                inner.rejected += 1;
                inner.last_error = Some(format!("{e:#}"));
                tracing::error!("config rejected, previous config stays in force:\n{e:#}");
            }
        }
        result
    }

    /// Rescans the node's network namespaces: the kernel's namespace →
    /// client address map (so unbound sockets hash like their pod's IP),
    /// and the shim's listeners (one per client namespace, kept open so a
    /// service can move to the shim without a gap).
    pub async fn refresh_namespaces(self: &Arc<Self>) {
        let dir = std::path::Path::new(identities::NETNS_DIR);
        // Cheap check first: only rescan when namespaces came or went.
        let listing = identities::listing(dir);
        {
            let mut last = self.netns_listing.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_ref() == Some(&listing) {
                return;
            }
            *last = Some(listing);
        }
        let namespaces = tokio::task::spawn_blocking(move || identities::scan(dir))
            .await
            .unwrap_or_default();
        let ids = identities::identities(&namespaces);
        {
            let mut inner = self.lock();
            match inner.dataplane.sync_client_identities(&ids) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(changed = n, known = ids.len(), "client identities updated")
                }
                Err(e) => tracing::warn!("cannot update client identities: {e:#}"),
            }
        }
        self.shim.set_clients(&ids);
        self.shim.sync(Some(namespaces)).await;
    }

    /// Closes pooled upstream connections idle past their timeout.
    pub fn expire_idle_upstreams(&self) {
        let closed = self.shim.shim.expire_idle_upstreams();
        if closed > 0 {
            tracing::debug!(closed, "idle upstream connections closed");
        }
    }

    /// Requests the shim received so far.
    pub fn shim_requests(&self) -> u64 {
        self.shim.shim.requests_received()
    }

    /// One more second for the kernel's flow slots (see
    /// `Dataplane::advance_flow_epoch`).
    pub fn advance_flow_epoch(&self) {
        if let Err(e) = self.lock().dataplane.advance_flow_epoch() {
            tracing::warn!("{e:#}");
        }
    }

    /// Mirrors the shim's outlier ejections into the kernel's tables.
    pub fn sync_ejections(&self) {
        let now: Ejected = self.shim.shim.ejected().into_iter().collect();
        let mut inner = self.lock();
        if now == inner.ejected {
            return;
        }
        tracing::info!(
            ejected = now.len(),
            "outlier ejections changed; updating kernel tables"
        );
        inner.ejected = now;
        let live = inner.live.clone();
        if let Err(e) = inner.push(live) {
            tracing::warn!("cannot apply outlier ejections to the kernel: {e:#}");
        }
    }

    fn set_weights(
        &self,
        host: &str,
        route: Option<String>,
        weights: Vec<(String, i64)>,
    ) -> Result<String> {
        let mut inner = self.lock();
        let file_table = inner
            .file_table
            .clone()
            .ok_or_else(|| anyhow!("no valid config is loaded"))?;
        let new = apply_weights(&inner.live, host, route.as_deref(), &weights)
            .map_err(|e| anyhow!("{e}"))?;
        let fqdn = new
            .find(host)
            .map(|s| s.host.clone())
            .ok_or_else(|| anyhow!("unknown host {host}"))?;
        inner.push(new)?;
        inner.overrides.set(Override {
            file_weights: file_weights(&file_table, &fqdn, route.as_deref()),
            host: fqdn.clone(),
            route,
            weights,
        })?;
        Ok(inner.split_lines(&fqdn))
    }

    fn reset(&self, host: &str) -> Result<String> {
        let mut inner = self.lock();
        let file_table = inner
            .file_table
            .clone()
            .ok_or_else(|| anyhow!("no valid config is loaded"))?;
        let fqdn = file_table
            .find(host)
            .map(|s| s.host.clone())
            .ok_or_else(|| anyhow!("unknown host {host}; known: {}", hosts(&file_table)))?;
        let n = inner.overrides.reset(&fqdn)?;
        let (table, _) = inner.overrides.apply(&file_table);
        inner.push(table)?;
        Ok(format!(
            "{} (dropped {n} override(s))",
            inner.split_lines(&fqdn)
        ))
    }

    /// `/readyz`: programs attached (the agent would not run otherwise)
    /// and a config loaded.
    pub fn ready(&self) -> Result<(), String> {
        match &self.lock().file_table {
            Some(_) => Ok(()),
            None => Err("no valid config loaded yet".into()),
        }
    }

    /// Refreshes the kernel TCP series (called at every scrape and status).
    pub fn export_kernel_metrics(&self) {
        let inner = self.lock();
        let Ok(counters) = inner.dataplane.counters() else {
            return;
        };
        let services = service_status(&inner.live, &counters, &inner.overrides);
        super::telemetry::export(&self.metrics, inner.cfg.as_deref(), &inner.live, &services);
    }

    pub fn status(&self) -> Result<StatusReport> {
        self.export_kernel_metrics();
        let inner = self.lock();
        let counters = inner.dataplane.counters()?;
        Ok(StatusReport {
            config: self.opts.config.display().to_string(),
            cgroup: self.opts.cgroup.display().to_string(),
            pin_path: self.opts.pin_path.display().to_string(),
            generation: inner.generation,
            reloads: inner.reloads,
            rejected_reloads: inner.rejected,
            last_error: inner.last_error.clone(),
            services: with_live(
                service_status(&inner.live, &counters, &inner.overrides),
                &self.metrics,
            ),
        })
    }
}

impl Inner {
    fn push(&mut self, table: RoutingTable) -> Result<()> {
        let routes = encode(&without(&table, &self.ejected), Some(self.shim_port));
        let started = std::time::Instant::now();
        let stats = self.dataplane.apply(&routes)?;
        self.metrics.map_update(started.elapsed().as_secs_f64());
        tracing::debug!(?stats, "kernel maps updated");
        if let Some(cfg) = &self.cfg {
            for w in self.shim.shim.update(cfg, &table) {
                tracing::warn!("shim: {w}");
            }
            self.shim.set_pods(cfg);
        }
        self.live = table;
        self.generation += 1;
        Ok(())
    }

    fn split_lines(&self, fqdn: &str) -> String {
        service_status(&self.live, &[], &self.overrides)
            .iter()
            .filter(|s| s.host == fqdn)
            .flat_map(|s| {
                s.ports
                    .iter()
                    .map(|p| crate::admin::render::split_line(&s.host, p))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Handler for Agent {
    fn handle(&self, request: Request) -> Response {
        let result = match request {
            Request::Status => {
                return match self.status() {
                    Ok(s) => Response {
                        ok: true,
                        status: Some(s),
                        ..Default::default()
                    },
                    Err(e) => Response::error(format!("{e:#}")),
                };
            }
            Request::Weights {
                host,
                route,
                weights,
            } => self.set_weights(&host, route, weights),
            Request::Reset { host } => self.reset(&host),
        };
        match result {
            Ok(message) => Response {
                ok: true,
                message: Some(message),
                ..Default::default()
            },
            Err(e) => Response::error(format!("{e:#}")),
        }
    }
}

/// (service host, subset, endpoint) ejected by outlier detection.
type Ejected = std::collections::BTreeSet<(String, Option<String>, std::net::SocketAddr)>;

/// The table the kernel gets: `table` without ejected endpoints.
fn without(table: &RoutingTable, ejected: &Ejected) -> RoutingTable {
    let mut t = table.clone();
    if ejected.is_empty() {
        return t;
    }
    for svc in &mut t.services {
        for port in &mut svc.ports {
            for d in &mut port.route.destinations {
                d.endpoints
                    .retain(|e| !ejected.contains(&(d.host.clone(), d.subset.clone(), e.addr)));
            }
        }
    }
    t
}

fn hosts(t: &RoutingTable) -> String {
    t.services
        .iter()
        .map(|s| s.host.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
