//! What the data path reports to telemetry. The shim produces one
//! `RequestRecord` per HTTP request (primary or mirrored); the metrics
//! module turns them into Istio's standard series. Neither side knows the
//! other: they meet at `RequestObserver`.

use std::sync::Arc;
use std::time::Duration;

/// A metric label value. Shared, not copied: the shim records every
/// request with its service's and workloads' names, and a clone of an
/// `Arc<str>` is a reference count, where a `String` would be an
/// allocation (13 of them per request).
pub type Label = Arc<str>;

/// A workload as Istio's metric labels describe it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload {
    /// Deployment-like name (the pod's owner with the ReplicaSet hash
    /// removed, else its `app` label, else the pod name); "unknown" if not
    /// known.
    pub workload: Label,
    pub namespace: Label,
    /// `app` (or `app.kubernetes.io/name`) label, "unknown" if absent.
    pub app: Label,
    /// `version` (or `app.kubernetes.io/version`) label; for destinations
    /// the subset's `version` label, else the subset name.
    pub version: Label,
}

impl Workload {
    /// Istio's labels for a peer it knows nothing about (one shared
    /// "unknown" string; no allocation per call).
    pub fn unknown() -> Self {
        thread_local! {
            static UNKNOWN: Label = Label::from("unknown");
        }
        let u = UNKNOWN.with(Label::clone);
        Self {
            workload: u.clone(),
            namespace: u.clone(),
            app: u.clone(),
            version: u,
        }
    }
}

/// One finished HTTP request as the shim saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub source: Workload,
    pub destination: Workload,
    /// FQDN, e.g. `checkout-service.prod.svc.cluster.local`.
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    /// DestinationRule subset chosen, if any.
    pub subset: Option<Label>,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// HTTP status sent to the client; 0 if none was (connection reset).
    pub response_code: u16,
    /// gRPC status code as a decimal string, when the response carried one.
    pub grpc_status: Option<String>,
    /// Envoy's short flags: `-`, `NR`, `UH`, `UF`, `UT`, `URX`, `DI`, `FI`
    /// (several joined by `,`).
    pub response_flags: std::borrow::Cow<'static, str>,
    pub duration: Duration,
    /// Bytes received from / sent to the client (headers and body).
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// A mirrored copy: counted apart from primary traffic.
    pub mirrored: bool,
    /// Attempts made (1 + retries).
    pub attempts: u32,
}

/// Events from the shim that are not requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShimEvent {
    /// A mirror copy was not sent because the in-flight bound was reached.
    MirrorDropped { destination_service: String },
    /// Outlier detection ejected an endpoint.
    EndpointEjected {
        destination_service: String,
        subset: Option<String>,
        endpoint: std::net::SocketAddr,
    },
}

pub trait RequestObserver: Send + Sync + 'static {
    fn on_request(&self, record: &RequestRecord);
    fn on_event(&self, _event: &ShimEvent) {}
}

/// Discards everything (tests, or metrics turned off).
pub struct NoopObserver;

impl RequestObserver for NoopObserver {
    fn on_request(&self, _record: &RequestRecord) {}
}
