//! Which pods serve a destination, and at which address.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::model::Endpoint;
use crate::config::{ConfigWarning, LoadedConfig, TargetPort};

/// The ready endpoints of `host` (a Service FQDN), restricted to `subset`,
/// for Service port `port`: every IP (IPv4 and IPv6) of every Running and
/// Ready pod that the Service selector and the subset labels select, with
/// the Service port's target port. In pod-name order.
pub fn endpoints(cfg: &LoadedConfig, host: &str, subset: Option<&str>, port: u16) -> Vec<Endpoint> {
    resolve(cfg, host, subset, port).0
}

/// `endpoints`, plus a warning for each pod skipped because it lacks the
/// named target port.
pub(crate) fn resolve(
    cfg: &LoadedConfig,
    host: &str,
    subset: Option<&str>,
    port: u16,
) -> (Vec<Endpoint>, Vec<ConfigWarning>) {
    let mut endpoints = Vec::new();
    let mut warnings = Vec::new();
    let Some(svc) = cfg.service(host) else {
        return (endpoints, warnings);
    };
    let Some(sp) = svc.port(port) else {
        return (endpoints, warnings);
    };
    let no_labels = BTreeMap::new();
    let labels = subset
        .and_then(|s| cfg.destination_rule(host)?.subset(s))
        .map_or(&no_labels, |s| &s.labels);
    for pod in cfg.selected_pods(svc, labels).filter(|p| p.is_ready()) {
        let target = match &sp.target_port {
            TargetPort::Number(n) => *n,
            TargetPort::Name(name) => match pod.named_port(name, sp.protocol) {
                Some(n) => n,
                None => {
                    warnings.push(pod.meta.warning(
                        "spec.containers",
                        format!(
                            "no {} container port named {name:?}, which Service {host} port {port} \
                             targets; pod skipped",
                            sp.protocol
                        ),
                    ));
                    continue;
                }
            },
        };
        endpoints.extend(pod.ips.iter().map(|ip| Endpoint {
            addr: SocketAddr::new(*ip, target),
            pod: pod.meta.name.clone(),
            namespace: pod.meta.namespace.clone(),
        }));
    }
    (endpoints, warnings)
}
