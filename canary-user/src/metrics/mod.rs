//! Prometheus metrics with Istio's standard names and labels, so that
//! Istio's Grafana dashboards, alert rules and Flagger's built-in checks
//! work on canary unchanged.
//!
//! Where the numbers come from:
//! - HTTP series (`istio_requests_total`, `istio_request_duration_milliseconds`,
//!   `istio_request_bytes`, `istio_response_bytes`): the L7 shim, one
//!   [`RequestRecord`] per finished request through [`RequestObserver`].
//! - TCP series (`istio_tcp_connections_opened_total`, `..._closed_total`,
//!   `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`): the
//!   kernel's sockops counters, cumulative totals read from pinned maps and
//!   handed over with [`Metrics::set_tcp`] (usually from the hook set with
//!   [`Metrics::on_scrape`], so every scrape sees fresh values).
//! - `canary_*` series: the agent and the shim about themselves (config
//!   reloads, map update latency, mirror drops, outlier ejections, kernel
//!   no-endpoint refusals).
//!
//! # `reporter="destination"`
//! Istio reports every request twice: the client's sidecar with
//! `reporter="source"` and the server's with `reporter="destination"`.
//! Flagger's built-in `request-success-rate` and `request-duration` queries
//! and Istio's service and workload dashboards select
//! `reporter="destination"`. canary is the only proxy on the path, so it
//! reports each request once, and as `destination`: that keeps those queries
//! working unchanged and never counts a request twice.
//!
//! # Mirrored requests
//! A mirrored copy is counted in its own families,
//! `canary_mirror_requests_total` and
//! `canary_mirror_request_duration_milliseconds`, with the same labels as the
//! primary series. No `istio_*` series ever sees one, so a query over
//! `istio_requests_total` (Flagger's, the dashboards', or one with no
//! `reporter` selector at all) measures real traffic only. Mirrors also stay
//! out of the live view of `canary status`. (Istio itself counts mirrored
//! requests in the mirror target's `reporter="destination"` series.)
//!
//! # Labels
//! Exactly Istio's label names. `destination_workload` is the Deployment-like
//! name from [`workload_of`]; `destination_version` is the subset's `version`
//! label, else the subset name; whatever canary does not know is `unknown`
//! (peer identity: `connection_security_policy="unknown"`). TCP series carry
//! no `response_code` and no `grpc_response_status`, as in Istio. Buckets are
//! Envoy's defaults ([`ENVOY_BUCKETS`]), so `histogram_quantile` answers as it
//! does on Istio.
//!
//! The text served is Prometheus's text format 0.0.4 (what Envoy serves on
//! Istio's sidecars), which Prometheus scrapes and `promtool check metrics`
//! accepts.

mod istio;
mod kernel;
mod live;
mod server;
mod workload;

#[cfg(test)]
mod tests;

use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::observe::{RequestObserver, RequestRecord, ShimEvent};

pub use kernel::{TcpCounts, TcpSample};
pub use live::{Clock, LiveStats, ManualClock, SystemClock, WINDOW_SECS};
pub use server::{Readiness, serve, serve_listener};
pub use workload::{destination_workload, workload_of, workload_of_pod};

/// `Content-Type` of what [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Envoy's default histogram boundaries, which Istio does not override
/// (istio-semantics §4.3); milliseconds or bytes.
pub const ENVOY_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Map update latency boundaries, seconds (100 µs to 1 s).
const MAP_UPDATE_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Every series canary exports, in one registry configured once.
pub struct Metrics {
    registry: Registry,
    requests: Arc<istio::RequestTable>,
    mirrors: Arc<istio::RequestTable>,
    kernel: Arc<kernel::KernelSnapshot>,
    live: live::LiveTable,
    reloads: Family<ReloadLabels, Counter>,
    last_reload_ok: Gauge,
    map_update: Histogram,
    mirror_dropped: Family<ServiceLabels, Counter>,
    ejections: Family<EjectionLabels, Counter>,
    scrape_hook: RwLock<Option<ScrapeHook>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    /// `applied` or `rejected`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EjectionLabels {
    destination_service: String,
    /// The DestinationRule subset, empty for the whole service.
    destination_subset: String,
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Arc<Self> {
        Self::with_clock(Arc::new(SystemClock::new()))
    }

    /// With the clock the live view reads (tests inject a [`ManualClock`]).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Arc::new(istio::RequestTable::new(istio::PRIMARY));
        let mirrors = Arc::new(istio::RequestTable::new(istio::MIRROR));
        let kernel = Arc::new(kernel::KernelSnapshot::default());
        registry.register_collector(Box::new(istio::RequestCollector(requests.clone())));
        registry.register_collector(Box::new(istio::RequestCollector(mirrors.clone())));
        registry.register_collector(Box::new(kernel::KernelCollector(kernel.clone())));

        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "canary_config_reloads",
            "Config loads by result: applied, or rejected (the previous config stays in force)",
            reloads.clone(),
        );
        let last_reload_ok = Gauge::default();
        registry.register(
            "canary_config_last_reload_successful",
            "1 if the last config load was applied, 0 if it was rejected",
            last_reload_ok.clone(),
        );
        let map_update = Histogram::new(MAP_UPDATE_BUCKETS);
        registry.register_with_unit(
            "canary_map_update_duration",
            "Time to write a routing table into the kernel maps and flip it live",
            Unit::Seconds,
            map_update.clone(),
        );
        let mirror_dropped = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "canary_mirror_dropped",
            "Mirror copies not sent because the in-flight bound was reached",
            mirror_dropped.clone(),
        );
        let ejections = Family::<EjectionLabels, Counter>::default();
        registry.register(
            "canary_outlier_ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );

        Arc::new(Metrics {
            registry,
            requests,
            mirrors,
            kernel,
            live: live::LiveTable::new(clock),
            reloads,
            last_reload_ok,
            map_update,
            mirror_dropped,
            ejections,
            scrape_hook: RwLock::new(None),
        })
    }

    /// Sets what runs at the start of every [`render`](Self::render),
    /// before anything is encoded: the agent reads the kernel counters here
    /// and calls [`set_tcp`](Self::set_tcp) and
    /// [`kernel_no_endpoint`](Self::kernel_no_endpoint). Replaces any
    /// earlier hook.
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        *self.scrape_hook.write().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(hook));
    }

    /// All series in Prometheus's text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        if let Some(hook) = self
            .scrape_hook
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(self);
        }
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            // Writing into a String cannot fail; a collector could.
            tracing::error!("encoding metrics: {e}");
        }
        out
    }

    /// Replaces the kernel TCP series with these cumulative totals. Samples
    /// with the same labels (endpoints of one workload) are added up; series
    /// absent from `samples` disappear. Also feeds connections/s of
    /// [`live`](Self::live).
    pub fn set_tcp(&self, samples: &[TcpSample]) {
        self.kernel.set_tcp(samples);
        self.live.record_connections(samples);
    }

    /// Counts a config load: `ok` when it was applied, else it was rejected.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "applied" } else { "rejected" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
        self.last_reload_ok.set(i64::from(ok));
    }

    /// Records how long one routing table took to reach the kernel.
    pub fn map_update(&self, seconds: f64) {
        self.map_update.observe(seconds);
    }

    /// Sets the kernel's cumulative count of `connect()` calls refused
    /// because the chosen subset had no endpoint, for `service` (FQDN).
    pub fn kernel_no_endpoint(&self, service: &str, total: u64) {
        self.kernel.set_no_endpoint(service, total);
    }

    /// requests/s, 5xx share and p99 of `service`'s `subset` over the last
    /// [`WINDOW_SECS`] complete seconds, and connections/s from the kernel
    /// counters; zeros for a destination that saw nothing.
    pub fn live(&self, service: &str, subset: Option<&str>) -> LiveStats {
        self.live.stats(service, subset)
    }
}

impl RequestObserver for Metrics {
    fn on_request(&self, record: &RequestRecord) {
        if record.mirrored {
            self.mirrors.record(record, None);
        } else {
            self.requests.record(record, Some(&self.live));
        }
    }

    fn on_event(&self, event: &ShimEvent) {
        match event {
            ShimEvent::MirrorDropped {
                destination_service,
            } => {
                self.mirror_dropped
                    .get_or_create(&ServiceLabels {
                        destination_service: destination_service.clone(),
                    })
                    .inc();
            }
            ShimEvent::EndpointEjected {
                destination_service,
                subset,
                ..
            } => {
                self.ejections
                    .get_or_create(&EjectionLabels {
                        destination_service: destination_service.clone(),
                        destination_subset: subset.clone().unwrap_or_default(),
                    })
                    .inc();
            }
        }
    }
}

/// The labels every Istio series shares: reporter, source and destination
/// (HTTP and TCP series add their own after these).
fn peer_labels<'a>(
    s: &'a crate::observe::Workload,
    d: &'a crate::observe::Workload,
    service: &'a str,
    name: &'a str,
    namespace: &'a str,
) -> [(&'static str, &'a str); 12] {
    [
        ("reporter", "destination"),
        ("source_workload", &s.workload),
        ("source_workload_namespace", &s.namespace),
        ("source_app", &s.app),
        ("source_version", &s.version),
        ("destination_service", service),
        ("destination_service_name", name),
        ("destination_service_namespace", namespace),
        ("destination_workload", &d.workload),
        ("destination_workload_namespace", &d.namespace),
        ("destination_app", &d.app),
        ("destination_version", &d.version),
    ]
}
