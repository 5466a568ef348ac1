//! Serde types for Istio's `VirtualService` and `DestinationRule`
//! (`networking.istio.io/v1alpha3`, `v1beta1`, `v1`; the three share one
//! schema). Field names follow the Istio API. Parsing is lenient: every
//! field is optional and unknown fields are kept in `extra`, which
//! validation reports as warnings (a typo such as `wieght` must not pass in
//! silence, nor fail a config that Istio would accept).
//!
//! After validation, every destination `host` in these structs is a fully
//! qualified service name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A section canary keeps but does not interpret (yet): `corsPolicy`,
/// `connectionPool`, `outlierDetection`, `tls`, ...
pub type Json = serde_json::Value;

/// Fields that the structs below do not model.
pub type Extra = BTreeMap<String, Json>;

/// The apiVersions canary reads for DestinationRule and VirtualService.
pub const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];

// === VirtualService ===

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct VirtualServiceObject {
    pub metadata: super::kube::ObjectMetaSpec,
    pub spec: VirtualServiceSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
    /// Not supported by canary: kept so that it can be reported.
    pub tls: Vec<Json>,
    pub export_to: Vec<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// One ordered `http` rule.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// `None`: no `match`, a catch-all.
    #[serde(rename = "match")]
    pub matches: Option<Vec<HttpMatchRequest>>,
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<Json>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    pub mirror: Option<Destination>,
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// Deprecated integer form of `mirrorPercentage`.
    pub mirror_percent: Option<i64>,
    pub mirror_percentage: Option<Percent>,
    pub cors_policy: Option<Json>,
    pub headers: Option<Headers>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// One `match` block: every field set must match (AND); blocks are ORed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    pub port: Option<i64>,
    pub source_labels: BTreeMap<String, String>,
    pub gateways: Vec<String>,
    pub query_params: BTreeMap<String, StringMatch>,
    pub ignore_uri_case: Option<bool>,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub source_namespace: Option<String>,
    pub stat_prefix: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl HttpMatchRequest {
    /// Whether this block applies to sidecars: its `gateways`, when listed,
    /// include `mesh`.
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh")
    }

    /// The request conditions this block sets, other than `port` (which is
    /// a static filter on the listener port). Names as in the Istio API.
    pub fn condition_fields(&self) -> Vec<&'static str> {
        let mut fields = Vec::new();
        let mut add = |set: bool, name| {
            if set {
                fields.push(name);
            }
        };
        add(self.uri.is_some(), "uri");
        add(self.scheme.is_some(), "scheme");
        add(self.method.is_some(), "method");
        add(self.authority.is_some(), "authority");
        add(!self.headers.is_empty(), "headers");
        add(!self.query_params.is_empty(), "queryParams");
        add(!self.without_headers.is_empty(), "withoutHeaders");
        add(!self.source_labels.is_empty(), "sourceLabels");
        add(self.source_namespace.is_some(), "sourceNamespace");
        fields
    }

    /// Whether the block's `port` filter lets `port` through.
    pub fn allows_port(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == i64::from(port))
    }
}

impl HttpRoute {
    /// Whether this rule takes every request on `port` (`None`: on every
    /// port): it has no `match`, or one of its blocks that applies to
    /// sidecars sets no condition (other than a `port` that lets `port`
    /// through).
    pub fn catches_all_on(&self, port: Option<u16>) -> bool {
        match &self.matches {
            None => true,
            Some(blocks) if blocks.is_empty() => true,
            Some(blocks) => blocks.iter().any(|m| {
                m.applies_to_mesh()
                    && m.condition_fields().is_empty()
                    && match port {
                        Some(p) => m.allows_port(p),
                        None => m.port.is_none(),
                    }
            }),
        }
    }
}

/// `exact`, `prefix` or `regex` (RE2, whole-string). All three absent
/// (`{}`) means "present" for headers and query parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Json>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteDestination {
    pub destination: Option<Destination>,
    /// Missing means 0; a single destination gets 100% whatever it says.
    pub weight: Option<i64>,
    pub headers: Option<Headers>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Destination {
    pub host: Option<String>,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct PortSelector {
    pub number: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Percent {
    pub value: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpMirrorPolicy {
    pub destination: Option<Destination>,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpFaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultDelay {
    pub fixed_delay: Option<String>,
    pub exponential_delay: Option<String>,
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    pub percent: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultAbort {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<String>,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<i64>,
    pub derive_port: Option<String>,
    pub scheme: Option<String>,
    pub redirect_code: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpDirectResponse {
    pub status: Option<i64>,
    pub body: Option<HttpBody>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct HttpBody {
    pub string: Option<String>,
    /// Base64, as in the Istio API.
    pub bytes: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub match_: Option<String>,
    pub rewrite: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct HeaderOperations {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

/// One ordered `tcp` rule.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct TcpRoute {
    #[serde(rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    pub route: Vec<RouteDestination>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct L4MatchAttributes {
    pub destination_subnets: Vec<String>,
    pub port: Option<i64>,
    pub source_labels: BTreeMap<String, String>,
    pub gateways: Vec<String>,
    pub source_namespace: Option<String>,
    pub source_subnet: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl L4MatchAttributes {
    /// Whether this block applies to sidecars: its `gateways`, when listed,
    /// include `mesh`.
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh")
    }

    /// The conditions other than `port` (and `gateways`) that this block
    /// sets; canary's kernel path cannot evaluate them.
    pub fn non_port_fields(&self) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if !self.destination_subnets.is_empty() {
            fields.push("destinationSubnets");
        }
        if !self.source_labels.is_empty() {
            fields.push("sourceLabels");
        }
        if self.source_namespace.is_some() {
            fields.push("sourceNamespace");
        }
        if self.source_subnet.is_some() {
            fields.push("sourceSubnet");
        }
        fields
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct RouteDestination {
    pub destination: Option<Destination>,
    pub weight: Option<i64>,
    #[serde(flatten)]
    pub extra: Extra,
}

// === DestinationRule ===

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct DestinationRuleObject {
    pub metadata: super::kube::ObjectMetaSpec,
    pub spec: DestinationRuleSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationRuleSpec {
    pub host: Option<String>,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    pub export_to: Vec<String>,
    pub workload_selector: Option<Json>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Subset {
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// A DestinationRule traffic policy. `loadBalancer` is interpreted; the
/// other sections are kept as JSON for the parts of canary that will use
/// them (the shim: connection pool, outlier detection).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<Json>,
    pub outlier_detection: Option<Json>,
    pub tls: Option<Json>,
    pub tunnel: Option<Json>,
    pub proxy_protocol: Option<Json>,
    pub retry_budget: Option<Json>,
    pub port_level_settings: Vec<PortTrafficPolicy>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<Json>,
    pub outlier_detection: Option<Json>,
    pub tls: Option<Json>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancerSettings {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHashLb>,
    pub locality_lb_setting: Option<Json>,
    pub warmup_duration_secs: Option<Json>,
    pub warmup: Option<Json>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsistentHashLb {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<RingHash>,
    pub maglev: Option<MagLev>,
    /// Deprecated; use `ringHash.minimumRingSize`.
    pub minimum_ring_size: Option<i64>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpCookie {
    pub name: Option<String>,
    pub path: Option<String>,
    pub ttl: Option<String>,
    pub attributes: Vec<Json>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RingHash {
    pub minimum_ring_size: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MagLev {
    pub table_size: Option<i64>,
}

/// `loadBalancer.simple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    Unspecified,
    Random,
    RoundRobin,
    LeastRequest,
    LeastConn,
    Passthrough,
}

impl SimpleLb {
    pub const NAMES: [&'static str; 6] = [
        "UNSPECIFIED",
        "RANDOM",
        "ROUND_ROBIN",
        "LEAST_REQUEST",
        "LEAST_CONN",
        "PASSTHROUGH",
    ];

    pub fn parse(s: &str) -> Option<SimpleLb> {
        Some(match s {
            "UNSPECIFIED" => SimpleLb::Unspecified,
            "RANDOM" => SimpleLb::Random,
            "ROUND_ROBIN" => SimpleLb::RoundRobin,
            "LEAST_REQUEST" => SimpleLb::LeastRequest,
            "LEAST_CONN" => SimpleLb::LeastConn,
            "PASSTHROUGH" => SimpleLb::Passthrough,
            _ => return None,
        })
    }
}

/// What a `consistentHash` hashes on (a oneof in the Istio API).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HashKey<'a> {
    SourceIp,
    HttpHeaderName(&'a str),
    HttpCookie(&'a HttpCookie),
    HttpQueryParameterName(&'a str),
}

impl HashKey<'_> {
    /// The Istio field name, as used in messages.
    pub fn field(&self) -> &'static str {
        match self {
            HashKey::SourceIp => "useSourceIp",
            HashKey::HttpHeaderName(_) => "httpHeaderName",
            HashKey::HttpCookie(_) => "httpCookie",
            HashKey::HttpQueryParameterName(_) => "httpQueryParameterName",
        }
    }

    /// Whether only an HTTP proxy can compute it.
    pub fn needs_http(&self) -> bool {
        !matches!(self, HashKey::SourceIp)
    }
}

impl ConsistentHashLb {
    /// Every hash key that is set (validation accepts exactly one).
    pub fn keys(&self) -> Vec<HashKey<'_>> {
        let mut keys = Vec::new();
        if self.use_source_ip == Some(true) {
            keys.push(HashKey::SourceIp);
        }
        if let Some(h) = &self.http_header_name {
            keys.push(HashKey::HttpHeaderName(h));
        }
        if let Some(c) = &self.http_cookie {
            keys.push(HashKey::HttpCookie(c));
        }
        if let Some(q) = &self.http_query_parameter_name {
            keys.push(HashKey::HttpQueryParameterName(q));
        }
        keys
    }

    /// The hash key of a validated policy.
    pub fn key(&self) -> Option<HashKey<'_>> {
        self.keys().into_iter().next()
    }
}

impl LoadBalancerSettings {
    /// The consistent-hash key, when this policy hashes.
    pub fn hash_key(&self) -> Option<HashKey<'_>> {
        self.consistent_hash.as_ref().and_then(|c| c.key())
    }

    /// `simple`, when set and valid.
    pub fn simple_lb(&self) -> Option<SimpleLb> {
        self.simple.as_deref().and_then(SimpleLb::parse)
    }
}

impl TrafficPolicy {
    /// The policy in force on `port`: the port-level entry for it replaces
    /// `loadBalancer`, `connectionPool`, `outlierDetection` and `tls` whole,
    /// even where the entry leaves them out (they do not inherit;
    /// istio-semantics §2.5). The result has no `portLevelSettings`.
    pub fn for_port(&self, port: u16) -> TrafficPolicy {
        let mut merged = TrafficPolicy {
            port_level_settings: Vec::new(),
            ..self.clone()
        };
        if let Some(p) = self.port_level(port) {
            merged.load_balancer = p.load_balancer.clone();
            merged.connection_pool = p.connection_pool.clone();
            merged.outlier_detection = p.outlier_detection.clone();
            merged.tls = p.tls.clone();
        }
        merged
    }

    fn port_level(&self, port: u16) -> Option<&PortTrafficPolicy> {
        self.port_level_settings
            .iter()
            .find(|p| p.port.as_ref().and_then(|s| s.number) == Some(i64::from(port)))
    }

    /// Istio's `MergeTrafficPolicy`: a subset's policy over this
    /// (destination-level) one, for `port`. Each section the subset sets
    /// replaces the parent's section whole (no field-level merge); then a
    /// subset port-level entry for `port` replaces its four sections.
    pub fn merge_subset(
        parent: Option<&TrafficPolicy>,
        subset: Option<&TrafficPolicy>,
        port: u16,
    ) -> TrafficPolicy {
        let mut merged = parent.map(|p| p.for_port(port)).unwrap_or_default();
        let Some(sub) = subset else {
            return merged;
        };
        macro_rules! replace {
            ($($f:ident),*) => {$(
                if sub.$f.is_some() {
                    merged.$f = sub.$f.clone();
                }
            )*};
        }
        replace!(
            load_balancer,
            connection_pool,
            outlier_detection,
            tls,
            tunnel,
            proxy_protocol,
            retry_budget
        );
        if let Some(p) = sub.port_level(port) {
            merged.load_balancer = p.load_balancer.clone();
            merged.connection_pool = p.connection_pool.clone();
            merged.outlier_detection = p.outlier_detection.clone();
            merged.tls = p.tls.clone();
        }
        merged
    }
}

/// gRPC status names in code order (`grpcStatus` of a fault abort;
/// `retryOn` names map onto some of them).
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
