//! Validation of canary's annotations (`config::annotation`): parsed and
//! checked like the fields they extend, with the same kind of errors.

use std::collections::BTreeMap;

use super::http::{duration_field, retry};
use crate::config::annotation::{DESTINATION_POLICY, DestinationPolicy, SPLIT};
use crate::config::error::{Diagnostics, Origin};
use crate::config::host;
use crate::config::istio::VirtualServiceSpec;

const VALID: &str = "a YAML list of {route, host, subset, timeout, retries} entries, e.g. \
                     [{route: public-traffic-split, subset: v2, timeout: 2s}]";

/// `canary.io/split`: true for `per-request`, false for `per-connection` or
/// when absent; any other value is an error.
pub(super) fn per_request_split(
    at: &Origin,
    annotations: &BTreeMap<String, String>,
    diags: &mut Diagnostics,
) -> bool {
    match annotations.get(SPLIT).map(|v| v.trim()) {
        None | Some("per-connection") => false,
        Some("per-request") => true,
        Some(other) => {
            diags.error(
                at,
                &format!("metadata.annotations.{SPLIT}"),
                format!("unknown split mode {other:?}"),
                "per-connection (default: weighted http routes split in the kernel) or per-request (through the shim, as Istio)",
            );
            false
        }
    }
}

/// Parses and checks `canary.io/destination-policy`; returns the entries
/// with hosts resolved (none when the annotation is absent or broken).
pub(super) fn destination_policies(
    at: &Origin,
    annotations: &BTreeMap<String, String>,
    spec: &VirtualServiceSpec,
    namespace: &str,
    diags: &mut Diagnostics,
) -> Vec<DestinationPolicy> {
    let Some(text) = annotations.get(DESTINATION_POLICY) else {
        return Vec::new();
    };
    let f = format!("metadata.annotations.{DESTINATION_POLICY}");
    let mut entries: Vec<DestinationPolicy> = match serde_yaml::from_str(text) {
        Ok(Some(e)) => e,
        Ok(None) => Vec::new(),
        Err(e) => {
            diags.error(at, &f, format!("invalid: {e}"), VALID);
            return Vec::new();
        }
    };
    let names: Vec<&str> = spec.http.iter().filter_map(|r| r.name.as_deref()).collect();
    let mut ok = true;
    for (i, entry) in entries.iter_mut().enumerate() {
        let ef = format!("{f}[{i}]");
        let errors_before = diags.errors.len();
        if entry.host.is_none() && entry.subset.is_none() {
            diags.error(at, &ef, "names no destination", "a subset, a host, or both");
        }
        if entry.timeout.is_none() && entry.retries.is_none() {
            diags.error(at, &ef, "sets nothing", "timeout, retries, or both");
        }
        if let Some(h) = &entry.host {
            match host::resolve(h, namespace) {
                Ok(fqdn) => entry.host = Some(fqdn),
                Err(e) => diags.error(at, &format!("{ef}.host"), e.to_string(), "a service host"),
            }
        }
        if let Some(r) = &entry.route
            && !names.contains(&r.as_str())
        {
            diags.error(
                at,
                &format!("{ef}.route"),
                format!("no http route is named {r:?}"),
                if names.is_empty() {
                    "the name of an http route; this VirtualService names none".to_string()
                } else {
                    format!("one of: {}", names.join(", "))
                },
            );
        }
        if let Some(t) = &entry.timeout {
            duration_field(at, &format!("{ef}.timeout"), t, true, diags);
        }
        if let Some(r) = &entry.retries {
            retry(at, &format!("{ef}.retries"), r, diags);
        }
        if diags.errors.len() != errors_before {
            ok = false;
            continue;
        }
        let hits = spec.http.iter().any(|r| {
            r.route
                .iter()
                .filter_map(|d| d.destination.as_ref())
                .any(|d| {
                    entry.applies(
                        r.name.as_deref(),
                        d.host.as_deref().unwrap_or_default(),
                        d.subset.as_deref(),
                    )
                })
        });
        if !hits {
            let mut dests: Vec<String> = spec
                .http
                .iter()
                .filter(|r| entry.route.is_none() || r.name == entry.route)
                .flat_map(|r| &r.route)
                .filter_map(|d| d.destination.as_ref())
                .map(|d| match (&d.host, &d.subset) {
                    (Some(h), Some(s)) => format!("{} subset {s}", host::short_name(h)),
                    (Some(h), None) => host::short_name(h).to_string(),
                    _ => String::new(),
                })
                .collect();
            dests.sort();
            dests.dedup();
            diags.error(
                at,
                &ef,
                "matches no destination of the routes it names",
                format!("a destination of those routes: {}", dests.join(", ")),
            );
            ok = false;
        }
    }
    if ok { entries } else { Vec::new() }
}
