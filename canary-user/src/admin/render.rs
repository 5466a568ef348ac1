//! Human-readable views of a status report, for the CLI.

use std::fmt::Write as _;

use super::protocol::{PortStatus, StatusReport};

/// The `canary status` table.
pub fn status_table(s: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "config {}  generation {}  reloads {} (rejected {})  cgroup {}",
        s.config, s.generation, s.reloads, s.rejected_reloads, s.cgroup
    );
    if let Some(e) = &s.last_error {
        let _ = writeln!(
            out,
            "LAST RELOAD REJECTED (previous config still in force):\n{e}"
        );
    }
    for svc in &s.services {
        let _ = writeln!(out);
        let path = if svc.path_reasons.is_empty() {
            svc.path.clone()
        } else {
            format!("{} ({})", svc.path, svc.path_reasons.join(", "))
        };
        let _ = writeln!(
            out,
            "{}  [{}]  path: {}",
            svc.host,
            svc.vips.join(", "),
            path
        );
        for port in &svc.ports {
            let _ = writeln!(out, "  port {}  {}", port.port, route_line(port));
            let _ = writeln!(
                out,
                "    {:<12} {:>7} {:>8} {:>9} {:>8} {:>8} {:>8} {:>5} {:>8} {:>8} {:>6} {:>9}",
                "SUBSET",
                "WEIGHT",
                "SHARE",
                "OPENED",
                "ACTIVE",
                "FAILED",
                "NO-EP",
                "PODS",
                "CONN/S",
                "REQ/S",
                "5XX%",
                "P99(ms)"
            );
            for d in &port.destinations {
                let name = d.subset.clone().unwrap_or_else(|| d.host.clone());
                let weight = if d.weight != d.file_weight {
                    format!("{}*", d.weight)
                } else {
                    d.weight.to_string()
                };
                let live = d.live.unwrap_or_default();
                let rate = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
                let _ = writeln!(
                    out,
                    "    {:<12} {:>7} {:>7.1}% {:>9} {:>8} {:>8} {:>8} {:>5} {:>8} {:>8} {:>6} {:>9}",
                    name,
                    weight,
                    d.percent,
                    d.counters.opened,
                    d.counters.active,
                    d.counters.failed,
                    d.counters.no_endpoint,
                    pods(d),
                    rate(live.connections_per_sec),
                    rate((live.requests > 0).then_some(live.requests_per_sec)),
                    rate((live.requests > 0).then_some(100.0 * live.error_rate)),
                    rate(live.p99_ms),
                );
            }
        }
    }
    if s.services
        .iter()
        .any(|s| s.ports.iter().any(|p| p.overridden))
    {
        let _ = writeln!(
            out,
            "\n* live override from `canary weights` (file weight differs); \
             `canary weights HOST --reset` returns to the file"
        );
    }
    out
}

/// Distinct pods behind a destination (a dual-stack pod has two addresses).
fn pods(d: &super::protocol::DestinationStatus) -> usize {
    d.endpoints
        .iter()
        .map(|e| e.pod.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn route_line(p: &PortStatus) -> String {
    let mut parts = vec![format!("route {}", p.route_name.as_deref().unwrap_or("-"))];
    parts.push(format!("from {}", p.origin));
    if let Some(s) = &p.sticky {
        parts.push(format!("sticky by {s}"));
    }
    if p.overridden {
        parts.push("OVERRIDDEN".into());
    }
    parts.join("  ")
}

/// One line per port: the split now in force.
pub fn split_line(host: &str, port: &PortStatus) -> String {
    let split: Vec<String> = port
        .destinations
        .iter()
        .map(|d| {
            let name = d.subset.clone().unwrap_or_else(|| d.host.clone());
            format!("{name}={} ({:.1}%)", d.weight, d.percent)
        })
        .collect();
    let tag = if port.overridden { "override" } else { "file" };
    format!("{host}:{}  {}  [{tag}]", port.port, split.join("  "))
}
