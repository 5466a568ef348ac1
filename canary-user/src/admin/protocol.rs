//! Requests and responses on the admin socket. Shared by agent and CLI.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// `canary weights HOST SUBSET=W...`: a live override of the file.
    Weights {
        host: String,
        route: Option<String>,
        weights: Vec<(String, i64)>,
    },
    /// `canary weights HOST --reset`: back to the file's weights.
    Reset {
        host: String,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
}

impl Response {
    pub fn error(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

/// Everything `canary status` shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub config: String,
    pub cgroup: String,
    pub pin_path: String,
    /// Bumped on every change the kernel received (reload or override).
    pub generation: u64,
    pub reloads: u64,
    pub rejected_reloads: u64,
    /// Why the last reload was rejected; the previous config stays in force.
    pub last_error: Option<String>,
    pub services: Vec<ServiceStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub host: String,
    pub vips: Vec<String>,
    /// "kernel" or "shim".
    pub path: String,
    pub path_reasons: Vec<String>,
    pub virtual_service: Option<String>,
    pub destination_rule: Option<String>,
    pub ports: Vec<PortStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PortStatus {
    pub port: u16,
    pub route_name: Option<String>,
    pub origin: String,
    /// "source_ip" when the subset is chosen by client hash.
    pub sticky: Option<String>,
    /// True while a `canary weights` override replaces the file's weights.
    pub overridden: bool,
    pub destinations: Vec<DestinationStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DestinationStatus {
    pub host: String,
    pub subset: Option<String>,
    pub weight: u32,
    pub file_weight: u32,
    /// Share of new connections, in percent of the route.
    pub percent: f64,
    pub pick: String,
    pub counters: Totals,
    /// Requests/s, 5xx rate, p99 and connections/s over the last seconds
    /// (HTTP numbers for services the shim serves).
    #[serde(default)]
    pub live: Option<crate::metrics::LiveStats>,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub addr: String,
    pub pod: String,
    pub counters: Totals,
}

/// Kernel counters (sockops), summed over CPUs and the service's VIPs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub opened: u64,
    pub closed: u64,
    pub active: u64,
    pub failed: u64,
    pub no_endpoint: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.opened += o.opened;
        self.closed += o.closed;
        self.active += o.active;
        self.failed += o.failed;
        self.no_endpoint += o.no_endpoint;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
    }
}

impl From<&canary_common::Counters> for Totals {
    fn from(c: &canary_common::Counters) -> Self {
        Self {
            opened: c.opened,
            closed: c.closed,
            active: c.opened.saturating_sub(c.closed),
            failed: c.failed,
            no_endpoint: c.no_endpoint,
            bytes_sent: c.bytes_sent,
            bytes_received: c.bytes_received,
        }
    }
}
