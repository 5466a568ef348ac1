//! The compiled routing table: what the dataplane programs and what
//! `canary status` / `canary validate` describe. Immutable once built; a
//! config change or a live weight change builds a new one.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// Everything the node serves, sorted by service host.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RoutingTable {
    pub services: Vec<CompiledService>,
}

/// One Kubernetes Service and the route canary applies to it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompiledService {
    /// Fully qualified host, `name.namespace.svc.cluster.local`.
    pub host: String,
    pub name: String,
    pub namespace: String,
    /// The Service's clusterIPs (IPv4 and/or IPv6).
    pub vips: Vec<IpAddr>,
    /// Which path serves this service, and why.
    pub path: DataPath,
    /// `kind/namespace/name` of the VirtualService and DestinationRule in
    /// force, if any.
    pub virtual_service: Option<String>,
    pub destination_rule: Option<String>,
    pub ports: Vec<CompiledPort>,
    /// Every http rule that forwards (`route`), in VirtualService order,
    /// with the weights in force: the L7 shim splits by these, and
    /// `canary weights --route NAME` addresses them by name. Endpoints are
    /// not resolved here (the shim resolves them per port).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_routes: Vec<KernelRoute>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataPath {
    /// The kernel picks subset and endpoint at connect(); no proxy.
    Kernel,
    /// The routes need HTTP (header match, mirror, retries, ...): the L7
    /// shim must serve it. `reasons` name the fields that require it.
    Shim { reasons: Vec<String> },
}

/// One Service port and the route in force on it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompiledPort {
    pub port: u16,
    pub name: Option<String>,
    pub route: KernelRoute,
}

/// A weighted split between destinations, chosen once per connection.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelRoute {
    /// The VirtualService route's `name`, when it has one.
    pub name: Option<String>,
    /// Where the split comes from: "virtualservice http[1]", "tcp[0]", or
    /// "service default" when no VirtualService routes this host.
    pub origin: String,
    /// `Some` when the subset is chosen by a hash of the client (sticky),
    /// `None` for a random pick per connection.
    pub sticky: Option<StickyKey>,
    /// In a fixed order (the DestinationRule's subset order, then host
    /// order) so that cumulative bands only move at the changed boundary.
    pub destinations: Vec<CompiledDestination>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StickyKey {
    /// DestinationRule `consistentHash.useSourceIp`.
    SourceIp,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompiledDestination {
    /// The service host this destination sends to (usually the same
    /// service; Flagger-style routes use `<svc>-primary`/`<svc>-canary`).
    pub host: String,
    /// DestinationRule subset name, `None` for the whole service.
    pub subset: Option<String>,
    /// The weight in force (file weight, or a live override). A missing
    /// weight is 0; a single destination is 100.
    pub weight: u32,
    /// The weight the config file gives, kept so status can show overrides.
    pub file_weight: u32,
    /// How an endpoint inside this destination is picked.
    pub pick: EndpointPick,
    /// Ready endpoints (Running and Ready pods matching the subset labels).
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointPick {
    /// Uniform random per connection (stands in for Istio's LEAST_REQUEST,
    /// ROUND_ROBIN and RANDOM, which the kernel cannot tell apart per
    /// connection without shared state).
    Random,
    /// Maglev lookup on the client hash (`consistentHash`).
    Maglev,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub pod: String,
    pub namespace: String,
}

impl RoutingTable {
    /// Looks a service up by FQDN, `name.namespace`, or a bare name when it
    /// is unique on the node.
    pub fn find(&self, host: &str) -> Option<&CompiledService> {
        if let Some(s) = self.services.iter().find(|s| s.host == host) {
            return Some(s);
        }
        let mut hits = self.services.iter().filter(|s| {
            format!("{}.{}", s.name, s.namespace) == host
                || format!("{}.{}.svc", s.name, s.namespace) == host
                || s.name == host
        });
        let first = hits.next()?;
        hits.next().is_none().then_some(first)
    }
}
