//! DestinationRules: host, subsets, traffic policies.

use std::collections::{BTreeMap, BTreeSet};

use super::kube::port_number;
use super::{Refs, object_meta, unknown_fields};
use crate::config::duration;
use crate::config::error::{Diagnostics, Origin};
use crate::config::host::{self, HostError};
use crate::config::istio::{DestinationRuleObject, LoadBalancerSettings, SimpleLb, TrafficPolicy};
use crate::config::load::Parsed;
use crate::config::model::{DestinationRule, ObjectKind};

const SUPPORTED_SIMPLE: &str = "UNSPECIFIED, RANDOM, ROUND_ROBIN, LEAST_REQUEST or LEAST_CONN";

pub(super) fn validate_all(
    parsed: Vec<Parsed<DestinationRuleObject>>,
    refs: &Refs<'_>,
    diags: &mut Diagnostics,
) -> Vec<DestinationRule> {
    let mut rules: Vec<DestinationRule> = Vec::new();
    for p in parsed {
        let Some(dr) = destination_rule(p, diags) else {
            continue;
        };
        let at = dr.meta.origin();
        if let Some(prev) = rules.iter().find(|r| r.host == dr.host) {
            diags.error(
                &at,
                "spec.host",
                format!(
                    "host {} already has {} (in {})",
                    dr.host,
                    prev.meta.id(),
                    prev.meta.file.display()
                ),
                "one DestinationRule per host; put all its subsets in one",
            );
        }
        match refs.service(&dr.host) {
            None if !refs.broken_services.contains(&dr.host) => diags.warn(
                &at,
                "spec.host",
                format!(
                    "no Service {} in the config; this DestinationRule has no effect",
                    dr.host
                ),
            ),
            Some(svc) => {
                let policies = dr
                    .spec
                    .traffic_policy
                    .iter()
                    .map(|tp| ("spec.trafficPolicy".to_string(), tp))
                    .chain(dr.spec.subsets.iter().enumerate().filter_map(|(i, s)| {
                        s.traffic_policy
                            .as_ref()
                            .map(|tp| (format!("spec.subsets[{i}].trafficPolicy"), tp))
                    }));
                for (f, tp) in policies {
                    for (j, pl) in tp.port_level_settings.iter().enumerate() {
                        let n = pl.port.as_ref().and_then(|p| p.number);
                        if let Some(n) = n.and_then(|n| u16::try_from(n).ok())
                            && svc.port(n).is_none()
                        {
                            diags.warn(
                                &at,
                                &format!("{f}.portLevelSettings[{j}].port.number"),
                                format!(
                                    "Service {} has no port {n} (it has {}); this setting has no effect",
                                    svc.host,
                                    svc.port_list()
                                ),
                            );
                        }
                    }
                }
            }
            None => {}
        }
        rules.push(dr);
    }
    rules
}

fn destination_rule(
    p: Parsed<DestinationRuleObject>,
    diags: &mut Diagnostics,
) -> Option<DestinationRule> {
    let meta = object_meta(ObjectKind::DestinationRule, &p, &p.object.metadata);
    let at = meta.origin();
    let mut spec = p.object.spec;
    unknown_fields(
        diags,
        &at,
        "spec",
        &spec.extra,
        &[
            "host",
            "trafficPolicy",
            "subsets",
            "exportTo",
            "workloadSelector",
        ],
    );

    let resolved = match spec
        .host
        .as_deref()
        .map(|h| host::resolve(h, &meta.namespace))
    {
        None | Some(Err(HostError::Empty)) => {
            diags.error(
                &at,
                "spec.host",
                "missing",
                "a service host such as checkout-service or checkout-service.prod.svc.cluster.local",
            );
            None
        }
        Some(Err(e @ HostError::Wildcard(_))) => {
            diags.warn(
                &at,
                "spec.host",
                format!("{e}; this DestinationRule is ignored"),
            );
            return None;
        }
        Some(Ok(h)) => Some(h),
    };

    if let Some(tp) = &spec.traffic_policy {
        traffic_policy(tp, "spec.trafficPolicy", &at, diags);
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let f = format!("spec.subsets[{i}]");
        unknown_fields(
            diags,
            &at,
            &f,
            &s.extra,
            &["name", "labels", "trafficPolicy"],
        );
        match s.name.as_deref() {
            None | Some("") => diags.error(
                &at,
                &format!("{f}.name"),
                "missing",
                "a DNS-1123 label such as v1",
            ),
            Some(name) => {
                if !host::is_dns1123_label(name) {
                    diags.error(
                        &at,
                        &format!("{f}.name"),
                        format!("subset name {name:?} is not a DNS-1123 label"),
                        "lower-case letters, digits and '-', starting and ending with a letter or \
                         digit, at most 63 characters, such as v1 or canary",
                    );
                }
                if let Some(prev) = names.insert(name, i) {
                    diags.error(
                        &at,
                        &format!("{f}.name"),
                        format!("subset {name:?} is defined twice (also spec.subsets[{prev}])"),
                        "a different name for each subset",
                    );
                }
            }
        }
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(tp, &format!("{f}.trafficPolicy"), &at, diags);
        }
    }
    if spec.workload_selector.is_some() {
        diags.warn(
            &at,
            "spec.workloadSelector",
            "ignored: canary applies the rule to every client on the node",
        );
    }

    // Kept even with errors, so that routes to its host are not also
    // reported as having no DestinationRule.
    let host = resolved?;
    spec.host = Some(host.clone());
    Some(DestinationRule { meta, host, spec })
}

fn traffic_policy(tp: &TrafficPolicy, f: &str, at: &Origin, diags: &mut Diagnostics) {
    unknown_fields(
        diags,
        at,
        f,
        &tp.extra,
        &[
            "loadBalancer",
            "connectionPool",
            "outlierDetection",
            "tls",
            "tunnel",
            "proxyProtocol",
            "retryBudget",
            "portLevelSettings",
        ],
    );
    if let Some(lb) = &tp.load_balancer {
        load_balancer(lb, &format!("{f}.loadBalancer"), at, diags);
    }
    let mut ports: BTreeSet<u16> = BTreeSet::new();
    for (j, pl) in tp.port_level_settings.iter().enumerate() {
        let pf = format!("{f}.portLevelSettings[{j}]");
        unknown_fields(
            diags,
            at,
            &pf,
            &pl.extra,
            &[
                "port",
                "loadBalancer",
                "connectionPool",
                "outlierDetection",
                "tls",
            ],
        );
        let number = pl.port.as_ref().and_then(|p| p.number);
        if let Some(n) = port_number(number, &format!("{pf}.port.number"), at, diags)
            && !ports.insert(n)
        {
            diags.error(
                at,
                &format!("{pf}.port.number"),
                format!("port {n} has two portLevelSettings entries"),
                "one entry per port",
            );
        }
        if let Some(lb) = &pl.load_balancer {
            load_balancer(lb, &format!("{pf}.loadBalancer"), at, diags);
        }
    }
}

fn load_balancer(lb: &LoadBalancerSettings, f: &str, at: &Origin, diags: &mut Diagnostics) {
    unknown_fields(
        diags,
        at,
        f,
        &lb.extra,
        &[
            "simple",
            "consistentHash",
            "localityLbSetting",
            "warmupDurationSecs",
            "warmup",
        ],
    );
    if let Some(simple) = &lb.simple {
        match SimpleLb::parse(simple) {
            None => diags.error(
                at,
                &format!("{f}.simple"),
                format!("unknown load balancer {simple:?}"),
                SUPPORTED_SIMPLE,
            ),
            Some(SimpleLb::Passthrough) => diags.error(
                at,
                &format!("{f}.simple"),
                "PASSTHROUGH is not supported by canary (it forwards to the original \
                 destination and would bypass the split)",
                format!("{SUPPORTED_SIMPLE}, or consistentHash"),
            ),
            Some(_) => {}
        }
        if lb.consistent_hash.is_some() {
            diags.error(
                at,
                f,
                "simple and consistentHash are both set",
                "one of simple or consistentHash",
            );
        }
    }
    let Some(ch) = &lb.consistent_hash else {
        return;
    };
    let cf = format!("{f}.consistentHash");
    unknown_fields(
        diags,
        at,
        &cf,
        &ch.extra,
        &[
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
            "ringHash",
            "maglev",
            "minimumRingSize",
        ],
    );
    const KEYS: &str =
        "exactly one of useSourceIp: true, httpHeaderName, httpCookie or httpQueryParameterName";
    let keys = ch.keys();
    match keys.len() {
        0 => diags.error(at, &cf, "no hash key", KEYS),
        1 => {}
        _ => {
            let names: Vec<&str> = keys.iter().map(|k| k.field()).collect();
            diags.error(
                at,
                &cf,
                format!("several hash keys ({})", names.join(", ")),
                KEYS,
            );
        }
    }
    if ch.http_header_name.as_deref() == Some("") {
        diags.error(
            at,
            &format!("{cf}.httpHeaderName"),
            "empty",
            "a header name such as session-id",
        );
    }
    if ch.http_query_parameter_name.as_deref() == Some("") {
        diags.error(
            at,
            &format!("{cf}.httpQueryParameterName"),
            "empty",
            "a query parameter name",
        );
    }
    if let Some(cookie) = &ch.http_cookie {
        if cookie.name.as_deref().unwrap_or_default().is_empty() {
            diags.error(
                at,
                &format!("{cf}.httpCookie.name"),
                "missing",
                "a cookie name such as user",
            );
        }
        if let Some(ttl) = &cookie.ttl
            && duration::parse(ttl).is_none()
        {
            diags.error(
                at,
                &format!("{cf}.httpCookie.ttl"),
                format!("{ttl:?} is not a duration"),
                "a duration such as 0s (session cookie) or 1h",
            );
        }
    }
    if ch.ring_hash.is_some() && ch.maglev.is_some() {
        diags.error(
            at,
            &cf,
            "ringHash and maglev are both set",
            "one of ringHash or maglev",
        );
    }
    if let Some(size) = ch.maglev.as_ref().and_then(|m| m.table_size)
        && size <= 0
    {
        diags.error(
            at,
            &format!("{cf}.maglev.tableSize"),
            format!("table size {size} is not positive"),
            "a prime such as 65537",
        );
    }
}
