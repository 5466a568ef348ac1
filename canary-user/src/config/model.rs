//! The validated config model: what `load_path` returns once every object
//! has parsed and every cross-reference checks out. Hosts are fully
//! qualified, VIPs and pod IPs are parsed, and each object remembers the
//! file it came from so that later steps can still point at it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;

use super::error::{ConfigWarning, Origin};
use super::istio::{DestinationRuleSpec, Subset, TrafficPolicy, VirtualServiceSpec};

/// The kinds of object canary reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ObjectKind {
    Service,
    Pod,
    DestinationRule,
    VirtualService,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::Pod => "Pod",
            ObjectKind::DestinationRule => "DestinationRule",
            ObjectKind::VirtualService => "VirtualService",
        })
    }
}

/// Identity and provenance of a validated object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectMeta {
    pub kind: ObjectKind,
    pub name: String,
    /// `default` when the YAML has none.
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub file: PathBuf,
    /// 1-based line where the object's YAML document starts.
    pub line: usize,
}

impl ObjectMeta {
    /// `"VirtualService prod/checkout-service-vs"`, as errors name it.
    pub fn id(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// `"VirtualService/prod/checkout-service-vs"`, as the routing table
    /// names it.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }

    pub(crate) fn origin(&self) -> Origin {
        Origin {
            file: self.file.clone(),
            line: None,
            object: Some(self.id()),
        }
    }

    /// A warning about this object, for steps after validation.
    pub fn warning(&self, field: &str, message: impl Into<String>) -> ConfigWarning {
        ConfigWarning {
            file: self.file.clone(),
            line: None,
            object: Some(self.id()),
            field: (!field.is_empty()).then(|| field.to_string()),
            message: message.into(),
        }
    }
}

// === Kubernetes ===

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            _ => return None,
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per pod.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub port: u16,
    pub name: Option<String>,
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
    pub target_port: TargetPort,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub meta: ObjectMeta,
    /// `name.namespace.svc.cluster.local`.
    pub host: String,
    /// clusterIPs in their YAML order; empty for a headless or
    /// ExternalName service, which canary does not serve.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Empty: no selector, so no endpoints from pods.
    pub selector: BTreeMap<String, String>,
}

impl Service {
    /// Whether the node serves this service (it has a VIP).
    pub fn is_served(&self) -> bool {
        !self.vips.is_empty()
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    pub fn tcp_ports(&self) -> impl Iterator<Item = &ServicePort> {
        self.ports.iter().filter(|p| p.protocol == Protocol::Tcp)
    }

    /// `"8080 (http), 9090"`, for messages.
    pub fn port_list(&self) -> String {
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|p| match &p.name {
                Some(n) => format!("{} ({n})", p.port),
                None => p.port.to_string(),
            })
            .collect();
        ports.join(", ")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub meta: ObjectMeta,
    /// `status.podIPs` (and `status.podIP`), IPv4 and/or IPv6.
    pub ips: Vec<IpAddr>,
    pub phase: Option<String>,
    /// The `Ready` condition; `true` when the pod reports none.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    pub ports: Vec<ContainerPort>,
    /// `metadata.ownerReferences`, in YAML order.
    pub owners: Vec<OwnerReference>,
}

/// Who created a pod: Istio derives the workload name from the
/// controlling owner (a ReplicaSet named after its Deployment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    /// The owner that manages the pod (`controller: true`).
    pub controller: bool,
}

impl Pod {
    /// Whether the pod may receive traffic: Running, Ready (or no Ready
    /// condition reported), not terminating, and with an IP.
    pub fn is_ready(&self) -> bool {
        self.phase.as_deref() == Some("Running")
            && self.ready
            && !self.terminating
            && !self.ips.is_empty()
    }

    /// Resolves a named container port.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol)
            .map(|p| p.port)
    }

    /// Whether `selector` (non-empty) and `extra` are both subsets of the
    /// pod's labels.
    pub fn selected_by(
        &self,
        selector: &BTreeMap<String, String>,
        extra: &BTreeMap<String, String>,
    ) -> bool {
        let has = |(k, v): (&String, &String)| self.meta.labels.get(k) == Some(v);
        !selector.is_empty() && selector.iter().all(has) && extra.iter().all(has)
    }
}

// === Istio ===

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRule {
    pub meta: ObjectMeta,
    /// The resolved `spec.host`.
    pub host: String,
    pub spec: DestinationRuleSpec,
}

impl DestinationRule {
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.spec
            .subsets
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
    }

    /// Position of the subset in the DestinationRule: the fixed order of
    /// destinations in a compiled route.
    pub fn subset_index(&self, name: &str) -> Option<usize> {
        self.spec
            .subsets
            .iter()
            .position(|s| s.name.as_deref() == Some(name))
    }

    pub fn subset_names(&self) -> Vec<&str> {
        self.spec
            .subsets
            .iter()
            .filter_map(|s| s.name.as_deref())
            .collect()
    }

    /// The traffic policy in force for `subset` on service `port`, merged
    /// the way Istio merges it (istio-semantics §2.5).
    pub fn policy(&self, subset: Option<&str>, port: u16) -> TrafficPolicy {
        let sub = subset
            .and_then(|s| self.subset(s))
            .and_then(|s| s.traffic_policy.as_ref());
        TrafficPolicy::merge_subset(self.spec.traffic_policy.as_ref(), sub, port)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualService {
    pub meta: ObjectMeta,
    /// The resolved `spec.hosts`.
    pub hosts: Vec<String>,
    /// With every destination host resolved.
    pub spec: VirtualServiceSpec,
    /// canary extension: per-destination timeout and retries, from the
    /// `canary.io/destination-policy` annotation (hosts resolved).
    pub destination_policies: Vec<crate::config::annotation::DestinationPolicy>,
    /// canary extension (`canary.io/split: per-request`): serve weighted
    /// http routes in the shim, per request, as Istio does.
    pub per_request_split: bool,
}

// === The loaded config ===

/// A validated config: every object parsed, every reference resolved.
/// Only VirtualServices that apply to the mesh (sidecars) are kept.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoadedConfig {
    /// Sorted by host.
    pub services: Vec<Service>,
    /// Sorted by namespace, then name.
    pub pods: Vec<Pod>,
    pub destination_rules: Vec<DestinationRule>,
    pub virtual_services: Vec<VirtualService>,
    pub warnings: Vec<ConfigWarning>,
    /// The files read, in the order read.
    pub files: Vec<PathBuf>,
}

impl LoadedConfig {
    pub fn service(&self, host: &str) -> Option<&Service> {
        // Sorted by host.
        let i = self.services.partition_point(|s| s.host.as_str() < host);
        self.services.get(i).filter(|s| s.host == host)
    }

    pub fn destination_rule(&self, host: &str) -> Option<&DestinationRule> {
        self.destination_rules.iter().find(|d| d.host == host)
    }

    /// The VirtualService that routes `host` on this node.
    pub fn virtual_service(&self, host: &str) -> Option<&VirtualService> {
        self.virtual_services
            .iter()
            .find(|v| v.hosts.iter().any(|h| h == host))
    }

    /// The traffic policy in force for `host`'s `subset` on `port` (the
    /// default, empty policy when no DestinationRule names the host).
    pub fn policy(&self, host: &str, subset: Option<&str>, port: u16) -> TrafficPolicy {
        self.destination_rule(host)
            .map(|dr| dr.policy(subset, port))
            .unwrap_or_default()
    }

    /// Pods in the service's namespace selected by the service and by the
    /// subset `labels`, ready or not, in name order.
    pub fn selected_pods<'a>(
        &'a self,
        service: &'a Service,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a Pod> + 'a {
        // Sorted by namespace, then name.
        let ns = service.meta.namespace.as_str();
        let start = self
            .pods
            .partition_point(|p| p.meta.namespace.as_str() < ns);
        self.pods[start..]
            .iter()
            .take_while(move |p| p.meta.namespace == ns)
            .filter(move |p| p.selected_by(&service.selector, labels))
    }
}
