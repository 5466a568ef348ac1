//! The human summary `canary validate` prints: one line per service port.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::model::{CompiledDestination, CompiledService, DataPath, RoutingTable, StickyKey};
use crate::config::host::short_name;

/// One line per service port: host, VIPs:port, data path (kernel, or shim
/// and why), each destination's share with its endpoint count (pods: a
/// dual-stack pod has an IPv4 and an IPv6 endpoint but counts once),
/// stickiness and where the split comes from.
///
/// `checkout-service.prod.svc.cluster.local  10.96.0.10:8080  kernel  v1 90% (2 endpoints)  v2 10% (1 endpoint)  via virtualservice http[0]`
pub fn summary(table: &RoutingTable) -> String {
    if table.services.is_empty() {
        return "no services to route\n".to_string();
    }
    let mut out = String::new();
    for s in &table.services {
        let path = match &s.path {
            DataPath::Kernel => "kernel".to_string(),
            DataPath::Shim { reasons } => format!("shim ({})", reasons.join(", ")),
        };
        for p in &s.ports {
            let vips: Vec<String> = s
                .vips
                .iter()
                .map(|ip| SocketAddr::new(*ip, p.port).to_string())
                .collect();
            let _ = write!(out, "{}  {}  {path}", s.host, vips.join(","));
            let route = &p.route;
            let total: u64 = route.destinations.iter().map(|d| u64::from(d.weight)).sum();
            let file_total: u64 = route
                .destinations
                .iter()
                .map(|d| u64::from(d.file_weight))
                .sum();
            for d in &route.destinations {
                let mut pods: Vec<(&str, &str)> = d
                    .endpoints
                    .iter()
                    .map(|e| (e.namespace.as_str(), e.pod.as_str()))
                    .collect();
                pods.dedup();
                let n = pods.len();
                let _ = write!(
                    out,
                    "  {} {} ({n} endpoint{}",
                    label(s, d),
                    percent(d.weight, total),
                    if n == 1 { "" } else { "s" }
                );
                if d.weight != d.file_weight {
                    let _ = write!(out, "; file {}", percent(d.file_weight, file_total));
                }
                out.push(')');
            }
            if let Some(StickyKey::SourceIp) = route.sticky {
                out.push_str("  sticky: source IP");
            }
            let _ = write!(out, "  via {}", route.origin);
            if let Some(name) = &route.name {
                let _ = write!(out, " {name:?}");
            }
            out.push('\n');
        }
    }
    out
}

fn label(s: &CompiledService, d: &CompiledDestination) -> String {
    match (&d.subset, d.host == s.host) {
        (Some(subset), true) => subset.clone(),
        (Some(subset), false) => format!("{}/{subset}", short_name(&d.host)),
        (None, _) => short_name(&d.host).to_string(),
    }
}

/// `90%`, `33.33%`, `0%`.
fn percent(weight: u32, total: u64) -> String {
    if total == 0 {
        return "0%".into();
    }
    let hundredths = (u64::from(weight) * 10_000 + total / 2) / total;
    if hundredths.is_multiple_of(100) {
        format!("{}%", hundredths / 100)
    } else {
        let s = format!("{}.{:02}", hundredths / 100, hundredths % 100);
        format!("{}%", s.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::percent;

    #[test]
    fn percentages() {
        assert_eq!(percent(90, 100), "90%");
        assert_eq!(percent(1, 3), "33.33%");
        assert_eq!(percent(1, 8), "12.5%");
        assert_eq!(percent(0, 0), "0%");
        assert_eq!(percent(5, 5), "100%");
    }
}
