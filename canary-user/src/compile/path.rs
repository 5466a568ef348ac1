//! Kernel or shim: whether a service's routes need an HTTP proxy.

use super::model::DataPath;
use crate::config::istio::HttpRoute;
use crate::config::{LoadedConfig, Service, VirtualService, duration};

/// `DataPath::Shim` with the fields that need HTTP (request matches,
/// mirroring, retries, timeouts, faults, header edits, rewrites, redirects,
/// direct responses, CORS, header/cookie/query hashing), or `Kernel` when a
/// per-connection weighted choice is all the routes ask for.
pub(crate) fn data_path(
    cfg: &LoadedConfig,
    svc: &Service,
    vs: Option<&VirtualService>,
) -> DataPath {
    let mut reasons: Vec<String> = Vec::new();
    if let Some(vs) = vs {
        for (i, r) in vs.spec.http.iter().enumerate() {
            http_reasons(i, r, &mut reasons);
        }
        if vs.per_request_split && !vs.spec.http.is_empty() {
            reasons.push(format!("{}: per-request", crate::config::annotation::SPLIT));
        }
    }

    // A hash on a header, cookie or query parameter needs the request. It
    // applies to the destinations of http rules (or of the default route
    // when no VirtualService routes the host); TCP rules only ever hash on
    // the source IP (istio-semantics §1.11).
    let targets: Vec<(&str, Option<&str>)> = match vs {
        Some(vs) => vs
            .spec
            .http
            .iter()
            .flat_map(|r| &r.route)
            .filter_map(|d| d.destination.as_ref())
            .filter_map(|d| Some((d.host.as_deref()?, d.subset.as_deref())))
            .collect(),
        None => vec![(svc.host.as_str(), None)],
    };
    for (host, subset) in targets {
        let Some(dest) = cfg.service(host) else {
            continue;
        };
        for port in dest.tcp_ports() {
            let policy = cfg.policy(host, subset, port.port);
            if let Some(key) = policy.load_balancer.as_ref().and_then(|lb| lb.hash_key())
                && key.needs_http()
            {
                reasons.push(format!("DestinationRule consistentHash.{}", key.field()));
            }
        }
    }

    let mut unique: Vec<String> = Vec::with_capacity(reasons.len());
    for r in reasons {
        if !unique.contains(&r) {
            unique.push(r);
        }
    }
    if unique.is_empty() {
        DataPath::Kernel
    } else {
        DataPath::Shim { reasons: unique }
    }
}

fn http_reasons(i: usize, r: &HttpRoute, reasons: &mut Vec<String>) {
    for m in r.matches.iter().flatten().filter(|m| m.applies_to_mesh()) {
        for field in m.condition_fields() {
            reasons.push(format!("http[{i}].match.{field}"));
        }
    }
    // An explicit 0% turns mirroring off (istio-semantics §1.6).
    let mirror_off = r.mirror_percentage.as_ref().and_then(|p| p.value) == Some(0.0)
        || (r.mirror_percentage.is_none() && r.mirror_percent == Some(0));
    let mirrors_off = r
        .mirrors
        .iter()
        .all(|m| m.percentage.as_ref().and_then(|p| p.value) == Some(0.0));
    // `attempts: 0` and `timeout: 0s` ask for nothing (no retries, no
    // timeout), which the kernel path already does.
    let retries_off = r.retries.as_ref().is_some_and(|x| x.attempts == Some(0));
    let timeout_off = r
        .timeout
        .as_deref()
        .and_then(duration::parse)
        .is_some_and(|d| d.is_zero());
    // In the Istio API's field order.
    let features = [
        ("redirect", r.redirect.is_some()),
        ("directResponse", r.direct_response.is_some()),
        ("rewrite", r.rewrite.is_some()),
        ("timeout", r.timeout.is_some() && !timeout_off),
        ("retries", r.retries.is_some() && !retries_off),
        ("fault", r.fault.is_some()),
        ("mirror", r.mirror.is_some() && !mirror_off),
        ("mirrors", !r.mirrors.is_empty() && !mirrors_off),
        ("corsPolicy", r.cors_policy.is_some()),
        ("headers", r.headers.is_some()),
    ];
    for (field, used) in features {
        if used {
            reasons.push(format!("http[{i}].{field}"));
        }
    }
    for (k, d) in r.route.iter().enumerate() {
        if d.headers.is_some() {
            reasons.push(format!("http[{i}].route[{k}].headers"));
        }
    }
}
