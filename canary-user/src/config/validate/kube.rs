//! Services and Pods.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::object_meta;
use crate::config::error::{Diagnostics, Origin};
use crate::config::host;
use crate::config::kube::{IntOrString, PodObject, ServiceObject, ServicePortSpec};
use crate::config::load::Parsed;
use crate::config::model::{
    ContainerPort, ObjectKind, OwnerReference, Pod, Protocol, Service, ServicePort, TargetPort,
};

const PORT_RANGE: &str = "a port number from 1 to 65535";

pub(super) fn service(p: Parsed<ServiceObject>, diags: &mut Diagnostics) -> Service {
    let meta = object_meta(ObjectKind::Service, &p, &p.object.metadata);
    let at = meta.origin();
    let spec = &p.object.spec;

    let mut external = false;
    match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        "ExternalName" => {
            external = true;
            diags.warn(
                &at,
                "spec.type",
                "an ExternalName Service has no cluster IP; not served by canary",
            );
        }
        other => diags.error(
            &at,
            "spec.type",
            format!("unknown Service type {other:?}"),
            "ClusterIP, NodePort, LoadBalancer or ExternalName",
        ),
    }

    // clusterIPs wins; clusterIP must then equal its first entry.
    let mut ips: Vec<(String, &str)> = spec
        .cluster_ips
        .iter()
        .enumerate()
        .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
        .collect();
    match (&spec.cluster_ip, spec.cluster_ips.first()) {
        (Some(ip), None) => ips.push(("spec.clusterIP".into(), ip.as_str())),
        (Some(ip), Some(first)) if ip != first && !ip.is_empty() => diags.error(
            &at,
            "spec.clusterIP",
            format!("clusterIP {ip} differs from clusterIPs[0] {first}"),
            "clusterIP equal to clusterIPs[0], or clusterIPs alone",
        ),
        _ => {}
    }
    let headless = ips.iter().any(|(_, ip)| *ip == "None");
    let mut vips: Vec<IpAddr> = Vec::new();
    for (field, ip) in &ips {
        if *ip == "None" || ip.is_empty() {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(addr) if vips.iter().any(|v| v.is_ipv4() == addr.is_ipv4()) => diags.error(
                &at,
                field,
                format!(
                    "second {} cluster IP {addr}",
                    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
                "at most one IPv4 and one IPv6 cluster IP, for dual stack",
            ),
            Ok(addr) => vips.push(addr),
            Err(_) => diags.error(
                &at,
                field,
                format!("{ip:?} is not an IP address"),
                "an IPv4 or IPv6 address, or None for a headless Service",
            ),
        }
    }
    if headless {
        vips.clear();
        diags.warn(
            &at,
            "spec.clusterIP",
            "headless Service (clusterIP: None) has no VIP to route; not served by canary",
        );
    } else if vips.is_empty() && !external && ips.is_empty() {
        diags.warn(
            &at,
            "spec.clusterIP",
            "no clusterIP: canary serves a Service at its cluster IP, so this one is not served \
             (set spec.clusterIP or spec.clusterIPs)",
        );
    }
    if external {
        vips.clear();
    }

    let ports = service_ports(spec.ports.as_slice(), &at, diags);
    let selector = spec.selector.clone().unwrap_or_default();
    if !vips.is_empty() {
        if spec.ports.is_empty() {
            diags.warn(&at, "spec.ports", "no ports; not served");
        }
        if selector.is_empty() {
            diags.warn(
                &at,
                "spec.selector",
                "no selector: canary takes endpoints from the Pods a selector picks, so this \
                 Service has no endpoints",
            );
        }
    }

    Service {
        host: host::fqdn(&meta.name, &meta.namespace),
        meta,
        vips,
        ports,
        selector,
    }
}

fn service_ports(
    specs: &[ServicePortSpec],
    at: &Origin,
    diags: &mut Diagnostics,
) -> Vec<ServicePort> {
    let mut ports: Vec<ServicePort> = Vec::new();
    let mut seen: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, p) in specs.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        let proto_name = p.protocol.as_deref().unwrap_or("TCP");
        let Some(protocol) = Protocol::parse(proto_name) else {
            diags.error(
                at,
                &format!("{f}.protocol"),
                format!("unknown protocol {proto_name:?}"),
                "TCP, UDP or SCTP",
            );
            continue;
        };
        let Some(port) = port_number(p.port, &format!("{f}.port"), at, diags) else {
            continue;
        };
        if protocol != Protocol::Tcp {
            diags.warn(
                at,
                &format!("{f}.protocol"),
                format!("{protocol} port {port} is not served by canary (TCP only)"),
            );
        }
        match &p.name {
            Some(name) => {
                if !host::is_dns1123_label(name) {
                    diags.error(
                        at,
                        &format!("{f}.name"),
                        format!("port name {name:?} is not a DNS-1123 label"),
                        "lower-case letters, digits and '-', such as http or grpc-web",
                    );
                }
                if let Some(prev) = names.insert(name, i) {
                    diags.error(
                        at,
                        &format!("{f}.name"),
                        format!("port name {name:?} is used twice (also spec.ports[{prev}])"),
                        "a different name for each port",
                    );
                }
            }
            None if specs.len() > 1 => diags.error(
                at,
                &format!("{f}.name"),
                "missing: a Service with several ports must name each one",
                "a DNS-1123 label such as http",
            ),
            None => {}
        }
        if let Some(prev) = seen.insert((port, protocol), i) {
            diags.error(
                at,
                &format!("{f}.port"),
                format!("port {port}/{protocol} is listed twice (also spec.ports[{prev}])"),
                "each port and protocol once",
            );
        }
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                match port_number(Some(*n), &format!("{f}.targetPort"), at, diags) {
                    Some(n) => TargetPort::Number(n),
                    None => continue,
                }
            }
            Some(IntOrString::String(s)) if host::is_iana_svc_name(s) => {
                TargetPort::Name(s.clone())
            }
            Some(IntOrString::String(s)) => {
                diags.error(
                    at,
                    &format!("{f}.targetPort"),
                    format!("targetPort {s:?} is neither a port number nor a port name"),
                    "a number from 1 to 65535, or a container port name (lower-case letters, \
                     digits and '-', at least one letter, at most 15 characters)",
                );
                continue;
            }
        };
        ports.push(ServicePort {
            port,
            name: p.name.clone(),
            protocol,
            app_protocol: p.app_protocol.clone(),
            target_port,
        });
    }
    ports
}

/// A port number in 1..=65535, or an error.
pub(super) fn port_number(
    n: Option<i64>,
    field: &str,
    at: &Origin,
    diags: &mut Diagnostics,
) -> Option<u16> {
    match n {
        None => {
            diags.error(at, field, "missing", PORT_RANGE);
            None
        }
        Some(n) => match u16::try_from(n) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                diags.error(at, field, format!("port {n} is out of range"), PORT_RANGE);
                None
            }
        },
    }
}

pub(super) fn pod(p: Parsed<PodObject>, diags: &mut Diagnostics) -> Pod {
    let meta = object_meta(ObjectKind::Pod, &p, &p.object.metadata);
    let at = meta.origin();
    let status = &p.object.status;

    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status
        .pod_ip
        .iter()
        .map(|ip| ("status.podIP".to_string(), ip))
        .chain(status.pod_ips.iter().enumerate().filter_map(|(i, p)| {
            p.ip.as_ref()
                .map(|ip| (format!("status.podIPs[{i}].ip"), ip))
        }));
    for (field, ip) in listed {
        match ip.parse::<IpAddr>() {
            Ok(addr) if !ips.contains(&addr) => ips.push(addr),
            Ok(_) => {}
            Err(_) => diags.error(
                &at,
                &field,
                format!("{ip:?} is not an IP address"),
                "an IPv4 or IPv6 address",
            ),
        }
    }

    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_.as_deref() == Some("Ready"))
        .is_none_or(|c| c.status.as_deref() == Some("True"));

    let mut ports = Vec::new();
    for (c, container) in p.object.spec.containers.iter().enumerate() {
        for (i, cp) in container.ports.iter().enumerate() {
            let f = format!("spec.containers[{c}].ports[{i}]");
            let Some(port) =
                port_number(cp.container_port, &format!("{f}.containerPort"), &at, diags)
            else {
                continue;
            };
            let protocol = match Protocol::parse(cp.protocol.as_deref().unwrap_or("TCP")) {
                Some(proto) => proto,
                None => {
                    diags.error(
                        &at,
                        &format!("{f}.protocol"),
                        format!(
                            "unknown protocol {:?}",
                            cp.protocol.as_deref().unwrap_or_default()
                        ),
                        "TCP, UDP or SCTP",
                    );
                    continue;
                }
            };
            ports.push(ContainerPort {
                name: cp.name.clone(),
                port,
                protocol,
            });
        }
    }

    let pod = Pod {
        meta,
        ips,
        phase: status.phase.clone(),
        ready,
        terminating: p.object.metadata.deletion_timestamp.is_some(),
        ports,
        owners: p
            .object
            .metadata
            .owner_references
            .iter()
            .map(|o| OwnerReference {
                kind: o.kind.clone().unwrap_or_default(),
                name: o.name.clone().unwrap_or_default(),
                controller: o.controller.unwrap_or(false),
            })
            .collect(),
    };
    if pod.phase.as_deref() == Some("Running") && pod.ready && pod.ips.is_empty() {
        diags.warn(
            &at,
            "status.podIP",
            "Running and Ready but has no IP; not an endpoint",
        );
    }
    pod
}
