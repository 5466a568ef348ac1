//! VirtualServices: hosts, ordered `http` and `tcp` rules, destinations and
//! weights (Istio ≥ 1.15 rules, istio-semantics §1.2-1.5, §1.11). The HTTP
//! features of a rule are checked in `http`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use canary_common::MAX_SUBSETS;

use super::http::{
    direct_response, duration_field, fault_injection, headers, http_redirect, match_request,
    percentage, retry, rewrite,
};
use super::kube::port_number;
use super::{Refs, object_meta, unknown_fields};
use crate::config::error::{Diagnostics, Origin};
use crate::config::host;
use crate::config::istio::{Destination, HttpRoute, TcpRoute, VirtualServiceObject};
use crate::config::load::Parsed;
use crate::config::model::{ObjectKind, VirtualService};

const HOST_VALID: &str =
    "a service host such as checkout-service or checkout-service.prod.svc.cluster.local";
const WEIGHT_VALID: &str = "an integer >= 0; weights are normalised by their sum";

const HTTP_ROUTE_FIELDS: &[&str] = &[
    "name",
    "match",
    "route",
    "redirect",
    "directResponse",
    "delegate",
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrors",
    "mirrorPercent",
    "mirrorPercentage",
    "corsPolicy",
    "headers",
];

pub(super) fn validate_all(
    parsed: Vec<Parsed<VirtualServiceObject>>,
    refs: &Refs<'_>,
    diags: &mut Diagnostics,
) -> Vec<VirtualService> {
    let mut out: Vec<VirtualService> = Vec::new();
    // host → (VirtualService, file) of the first claim.
    let mut claimed: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
    for p in parsed {
        let Some(vs) = virtual_service(p, refs, diags) else {
            continue;
        };
        let at = vs.meta.origin();
        for (i, h) in vs.hosts.iter().enumerate() {
            match claimed.get(h) {
                Some((id, file)) => diags.error(
                    &at,
                    &format!("spec.hosts[{i}]"),
                    format!(
                        "host {h} is already routed by {id} (in {}); two VirtualServices for one \
                         host conflict on the mesh (Istio IST0109)",
                        file.display()
                    ),
                    "one VirtualService per host; merge their routes into one",
                ),
                None => {
                    claimed.insert(h.clone(), (vs.meta.id(), vs.meta.file.clone()));
                }
            }
        }
        out.push(vs);
    }
    out
}

/// What route checks need to know about the VirtualService they are in.
struct Ctx<'a> {
    refs: &'a Refs<'a>,
    at: &'a Origin,
    namespace: &'a str,
    /// Check hosts, subsets and ports against the other objects. Off for a
    /// VirtualService bound only to gateways (its hosts are not services).
    cross: bool,
    /// Hosts already reported missing in this VirtualService: one error per
    /// host is enough.
    missing: RefCell<BTreeSet<String>>,
}

impl Ctx<'_> {
    /// Reports `host` as no Service, once per VirtualService.
    fn missing_service(&self, f: &str, host: &str, diags: &mut Diagnostics) {
        if self.refs.broken_services.contains(host)
            || !self.missing.borrow_mut().insert(host.to_string())
        {
            return;
        }
        diags.error(
            self.at,
            f,
            format!("missing service: no Service {host} in the config"),
            self.refs.valid_service_hosts(),
        );
    }
}

fn virtual_service(
    mut p: Parsed<VirtualServiceObject>,
    refs: &Refs<'_>,
    diags: &mut Diagnostics,
) -> Option<VirtualService> {
    let meta = object_meta(ObjectKind::VirtualService, &p, &p.object.metadata);
    let at = meta.origin();
    let annotations = std::mem::take(&mut p.object.metadata.annotations);
    let mut spec = p.object.spec;
    unknown_fields(
        diags,
        &at,
        "spec",
        &spec.extra,
        &["hosts", "gateways", "http", "tcp", "tls", "exportTo"],
    );
    if spec.hosts.is_empty() {
        diags.warn(
            &at,
            "spec.hosts",
            "no hosts (a delegate VirtualService?); delegation is not supported by canary; ignored",
        );
        return None;
    }
    let mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    if !mesh {
        diags.warn(
            &at,
            "spec.gateways",
            format!(
                "applies only to gateways {}, not to sidecars (list mesh too to apply it on the \
                 node); ignored",
                spec.gateways.join(", ")
            ),
        );
    }

    let ctx = Ctx {
        refs,
        at: &at,
        namespace: &meta.namespace,
        cross: mesh,
        missing: RefCell::new(BTreeSet::new()),
    };
    let mut hosts: Vec<String> = Vec::new();
    if mesh {
        for (i, h) in spec.hosts.iter().enumerate() {
            let f = format!("spec.hosts[{i}]");
            let fqdn = match host::resolve(h, &meta.namespace) {
                Ok(fqdn) => fqdn,
                Err(e) => {
                    diags.error(&at, &f, e.to_string(), HOST_VALID);
                    continue;
                }
            };
            match refs.service(&fqdn) {
                None => ctx.missing_service(&f, &fqdn, diags),
                Some(svc) if !svc.is_served() => diags.warn(
                    &at,
                    &f,
                    format!("Service {fqdn} has no cluster IP, so canary does not route it"),
                ),
                _ => {}
            }
            if !hosts.contains(&fqdn) {
                hosts.push(fqdn);
            }
        }
        spec.hosts = hosts.clone();
    }
    if !spec.tls.is_empty() {
        diags.warn(
            &at,
            "spec.tls",
            "tls routes are not supported by canary; ignored",
        );
    }

    for (i, r) in spec.http.iter_mut().enumerate() {
        http_route(&ctx, i, r, diags);
    }
    if let Some(i) = spec.http.iter().position(|r| r.catches_all_on(None)) {
        for j in i + 1..spec.http.len() {
            diags.warn(
                &at,
                &format!("spec.http[{j}]"),
                format!("unreachable: http[{i}] has no match and takes every request first"),
            );
        }
    }
    for (i, r) in spec.tcp.iter_mut().enumerate() {
        tcp_route(&ctx, i, r, diags);
    }
    if let Some(i) = spec.tcp.iter().position(|r| r.matches.is_empty()) {
        for j in i + 1..spec.tcp.len() {
            diags.warn(
                &at,
                &format!("spec.tcp[{j}]"),
                format!("unreachable: tcp[{i}] has no match and takes every connection first"),
            );
        }
    }
    if mesh && spec.http.is_empty() && spec.tcp.is_empty() {
        diags.warn(
            &at,
            "spec",
            "no http or tcp routes; its hosts get the service default (all ready pods)",
        );
    }

    let destination_policies =
        super::annotation::destination_policies(&at, &annotations, &spec, &meta.namespace, diags);
    let per_request_split = super::annotation::per_request_split(&at, &annotations, diags);
    mesh.then_some(VirtualService {
        meta,
        hosts,
        spec,
        destination_policies,
        per_request_split,
    })
}

fn http_route(ctx: &Ctx<'_>, i: usize, r: &mut HttpRoute, diags: &mut Diagnostics) {
    let at = ctx.at;
    let f = format!("spec.http[{i}]");
    unknown_fields(diags, at, &f, &r.extra, HTTP_ROUTE_FIELDS);

    if r.delegate.is_some() {
        diags.error(
            at,
            &format!("{f}.delegate"),
            "delegate is not supported by canary",
            "the delegate VirtualService's http routes, written here",
        );
    }
    let actions: Vec<&str> = [
        ("route", !r.route.is_empty()),
        ("redirect", r.redirect.is_some()),
        ("directResponse", r.direct_response.is_some()),
        ("delegate", r.delegate.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    match actions.len() {
        0 => diags.error(
            at,
            &format!("{f}.route"),
            "route has no destination",
            "at least one route[].destination, or a redirect or directResponse",
        ),
        1 => {}
        _ => diags.error(
            at,
            &f,
            format!(
                "{} are {} set",
                actions.join(" and "),
                if actions.len() == 2 { "both" } else { "all" }
            ),
            "exactly one of route, redirect, directResponse or delegate",
        ),
    }
    for (local, other) in [
        ("redirect", r.redirect.is_some()),
        ("directResponse", r.direct_response.is_some()),
    ] {
        for (name, set) in [
            ("fault", r.fault.is_some()),
            ("rewrite", r.rewrite.is_some()),
        ] {
            if other && set {
                diags.error(
                    at,
                    &format!("{f}.{name}"),
                    format!("{name} cannot be combined with {local}"),
                    "fault and rewrite only on a rule that forwards (route)",
                );
            }
        }
    }

    for (j, m) in r.matches.iter().flatten().enumerate() {
        match_request(at, &format!("{f}.match[{j}]"), m, diags);
    }

    let dests = r
        .route
        .iter_mut()
        .enumerate()
        .map(|(k, d)| (format!("{f}.route[{k}]"), &mut d.destination, d.weight))
        .collect();
    destinations(ctx, &f, dests, diags);
    for (k, d) in r.route.iter().enumerate() {
        let df = format!("{f}.route[{k}]");
        unknown_fields(
            diags,
            at,
            &df,
            &d.extra,
            &["destination", "weight", "headers"],
        );
        if let Some(h) = &d.headers {
            headers(at, &format!("{df}.headers"), h, diags);
        }
    }

    if r.mirror.is_some() && !r.mirrors.is_empty() {
        diags.error(
            at,
            &f,
            "mirror and mirrors are both set",
            "one of mirror or mirrors",
        );
    }
    if let Some(m) = &mut r.mirror {
        destination(ctx, &format!("{f}.mirror"), m, diags);
    }
    for (k, m) in r.mirrors.iter_mut().enumerate() {
        let mf = format!("{f}.mirrors[{k}]");
        match &mut m.destination {
            Some(d) => destination(ctx, &format!("{mf}.destination"), d, diags),
            None => diags.error(
                at,
                &format!("{mf}.destination"),
                "missing",
                "a destination with a host",
            ),
        }
        percentage(at, &format!("{mf}.percentage"), &m.percentage, diags);
    }
    percentage(
        at,
        &format!("{f}.mirrorPercentage"),
        &r.mirror_percentage,
        diags,
    );
    if let Some(p) = r.mirror_percent {
        diags.warn(
            at,
            &format!("{f}.mirrorPercent"),
            "deprecated; use mirrorPercentage: {value: ...}",
        );
        if !(0..=100).contains(&p) {
            diags.error(
                at,
                &format!("{f}.mirrorPercent"),
                format!("{p} is out of range"),
                "a percentage from 0 to 100",
            );
        }
    }
    if (r.mirror_percentage.is_some() || r.mirror_percent.is_some()) && r.mirror.is_none() {
        diags.warn(
            at,
            &format!("{f}.mirrorPercentage"),
            "set without mirror; ignored",
        );
    }

    if let Some(t) = &r.timeout {
        duration_field(at, &format!("{f}.timeout"), t, true, diags);
    }
    if let Some(retries) = &r.retries {
        retry(at, &format!("{f}.retries"), retries, diags);
    }
    if let Some(fault) = &r.fault {
        fault_injection(at, &format!("{f}.fault"), fault, diags);
    }
    if let Some(redirect) = &r.redirect {
        http_redirect(at, &format!("{f}.redirect"), redirect, diags);
    }
    if let Some(dr) = &r.direct_response {
        direct_response(at, &format!("{f}.directResponse"), dr, diags);
    }
    if let Some(rw) = &r.rewrite {
        rewrite(at, &format!("{f}.rewrite"), rw, diags);
    }
    if let Some(h) = &r.headers {
        headers(at, &format!("{f}.headers"), h, diags);
    }
}

fn tcp_route(ctx: &Ctx<'_>, i: usize, r: &mut TcpRoute, diags: &mut Diagnostics) {
    let at = ctx.at;
    let f = format!("spec.tcp[{i}]");
    unknown_fields(diags, at, &f, &r.extra, &["match", "route"]);
    if r.route.is_empty() {
        diags.error(
            at,
            &format!("{f}.route"),
            "route has no destination",
            "at least one route[].destination",
        );
    }
    for (j, m) in r.matches.iter().enumerate() {
        let mf = format!("{f}.match[{j}]");
        unknown_fields(
            diags,
            at,
            &mf,
            &m.extra,
            &[
                "destinationSubnets",
                "port",
                "sourceLabels",
                "gateways",
                "sourceNamespace",
                "sourceSubnet",
            ],
        );
        if m.port.is_some() {
            port_number(m.port, &format!("{mf}.port"), at, diags);
        }
    }
    let dests = r
        .route
        .iter_mut()
        .enumerate()
        .map(|(k, d)| (format!("{f}.route[{k}]"), &mut d.destination, d.weight))
        .collect();
    destinations(ctx, &f, dests, diags);
    for (k, d) in r.route.iter().enumerate() {
        unknown_fields(
            diags,
            at,
            &format!("{f}.route[{k}]"),
            &d.extra,
            &["destination", "weight"],
        );
    }
}

/// The weighted destinations of one rule (validation.go L2403-L2448): each
/// weight ≥ 0, a missing weight is 0, and with two or more destinations the
/// total must be positive. They need not sum to 100.
fn destinations(
    ctx: &Ctx<'_>,
    f: &str,
    mut dests: Vec<(String, &mut Option<Destination>, Option<i64>)>,
    diags: &mut Diagnostics,
) {
    let at = ctx.at;
    if dests.len() > MAX_SUBSETS {
        diags.error(
            at,
            &format!("{f}.route"),
            format!(
                "{} destinations in one route; canary splits between at most {MAX_SUBSETS}",
                dests.len()
            ),
            format!("at most {MAX_SUBSETS} destinations per route"),
        );
    }
    let mut total: i128 = 0;
    let mut negative = false;
    for (df, dest, weight) in dests.iter_mut() {
        if let Some(w) = *weight {
            if w < 0 {
                negative = true;
                diags.error(
                    at,
                    &format!("{df}.weight"),
                    format!("weight {w} is negative"),
                    WEIGHT_VALID,
                );
            } else if w > i64::from(u32::MAX) {
                diags.error(
                    at,
                    &format!("{df}.weight"),
                    format!("weight {w} is too large"),
                    "an integer from 0 to 4294967295",
                );
            } else {
                total += i128::from(w);
            }
        }
        match dest {
            Some(d) => destination(ctx, &format!("{df}.destination"), d, diags),
            None => diags.error(
                at,
                &format!("{df}.destination"),
                "missing",
                "a destination with a host, such as {host: checkout-service, subset: v1}",
            ),
        }
    }
    if dests.len() >= 2 && total == 0 && !negative {
        diags.error(
            at,
            &format!("{f}.route"),
            "total destination weight = 0",
            "at least one destination with a weight > 0; a missing weight counts as 0",
        );
    }
    if total > i128::from(u32::MAX) {
        diags.error(
            at,
            &format!("{f}.route"),
            format!("total destination weight {total} is too large"),
            "weights that add up to at most 4294967295",
        );
    }
    let mut seen: BTreeMap<(String, Option<String>), &str> = BTreeMap::new();
    for (df, dest, _) in &dests {
        let Some(Destination {
            host: Some(h),
            subset,
            ..
        }) = dest.as_ref()
        else {
            continue;
        };
        let first = *seen
            .entry((h.clone(), subset.clone()))
            .or_insert(df.as_str());
        if first != df.as_str() {
            let label = match subset {
                Some(s) => format!("{h} subset {s}"),
                None => h.clone(),
            };
            diags.error(
                at,
                &format!("{df}.destination"),
                format!("{label} appears twice in this rule (also {first})"),
                "each destination once; put the combined weight on one entry",
            );
        }
    }
}

/// Resolves the destination's host in place and checks it against the
/// Services and DestinationRules.
fn destination(ctx: &Ctx<'_>, f: &str, d: &mut Destination, diags: &mut Diagnostics) {
    let at = ctx.at;
    unknown_fields(diags, at, f, &d.extra, &["host", "subset", "port"]);
    let port = d
        .port
        .as_ref()
        .and_then(|p| port_number(p.number, &format!("{f}.port.number"), at, diags));
    let Some(h) = d.host.as_deref().filter(|h| !h.trim().is_empty()) else {
        diags.error(at, &format!("{f}.host"), "missing", HOST_VALID);
        return;
    };
    let fqdn = match host::resolve(h, ctx.namespace) {
        Ok(fqdn) => fqdn,
        Err(e) => {
            diags.error(at, &format!("{f}.host"), e.to_string(), HOST_VALID);
            return;
        }
    };
    d.host = Some(fqdn.clone());
    if !ctx.cross {
        return;
    }
    let refs = ctx.refs;
    match refs.service(&fqdn) {
        None => ctx.missing_service(&format!("{f}.host"), &fqdn, diags),
        Some(svc) => {
            if let Some(n) = port
                && svc.port(n).is_none()
            {
                diags.error(
                    at,
                    &format!("{f}.port.number"),
                    format!("Service {fqdn} has no port {n}"),
                    format!("one of its ports: {}", svc.port_list()),
                );
            }
        }
    }
    let Some(subset) = &d.subset else {
        return;
    };
    match refs.destination_rule(&fqdn) {
        None if refs.broken_destination_rules.contains(&fqdn) => {}
        None => diags.error(
            at,
            &format!("{f}.subset"),
            format!("subset {subset:?} is not defined: no DestinationRule has host {fqdn}"),
            format!("a DestinationRule for {fqdn} that defines subset {subset}, or no subset for the whole service"),
        ),
        Some(dr) if dr.subset(subset).is_none() => {
            let names = dr.subset_names();
            diags.error(
                at,
                &format!("{f}.subset"),
                format!("subset {subset:?} is not defined by {}", dr.meta.id()),
                if names.is_empty() {
                    format!("a subset that {} defines; it defines none", dr.meta.id())
                } else {
                    format!("one of its subsets: {}", names.join(", "))
                },
            );
        }
        Some(_) => {}
    }
}
