//! From the kernel's counters to Istio's TCP series: one sample per
//! service and destination workload (the pods behind a subset), for every
//! service the kernel serves. Services the shim serves report HTTP series
//! instead, as Istio does for HTTP traffic.

use std::collections::BTreeMap;

use crate::admin::protocol::{ServiceStatus, Totals};
use crate::compile::RoutingTable;
use crate::config::LoadedConfig;
use crate::metrics::{Metrics, TcpCounts, TcpSample, workload_of, workload_of_pod};
use crate::observe::Workload;

/// Hands the kernel counters (already joined into `services`) to metrics.
pub fn export(
    metrics: &Metrics,
    cfg: Option<&LoadedConfig>,
    table: &RoutingTable,
    services: &[ServiceStatus],
) {
    let mut samples: BTreeMap<(String, Option<String>, Workload), (TcpSample, Totals)> =
        BTreeMap::new();
    for svc in services {
        let no_endpoint: u64 = svc
            .ports
            .iter()
            .flat_map(|p| &p.destinations)
            .map(|d| d.counters.no_endpoint)
            .sum();
        metrics.kernel_no_endpoint(&svc.host, no_endpoint);
        if svc.path != "kernel" {
            continue;
        }
        let Some(compiled) = table.find(&svc.host) else {
            continue;
        };
        for d in svc.ports.iter().flat_map(|p| &p.destinations) {
            for e in &d.endpoints {
                let mut destination = cfg
                    .and_then(|c| {
                        // Endpoints are pods of the service's namespace.
                        c.pods.iter().find(|p| {
                            p.meta.name == e.pod && p.meta.namespace == compiled.namespace
                        })
                    })
                    .map(workload_of_pod)
                    .unwrap_or_else(|| {
                        workload_of(&e.pod, &compiled.namespace, &BTreeMap::new(), &[])
                    });
                if let Some(subset) = &d.subset {
                    destination.version = subset_version(cfg, &d.host, subset).into();
                }
                let key = (svc.host.clone(), d.subset.clone(), destination.clone());
                let entry = samples.entry(key).or_insert_with(|| {
                    (
                        TcpSample {
                            source: Workload::unknown(),
                            destination,
                            destination_service: svc.host.clone(),
                            destination_service_name: compiled.name.clone(),
                            destination_service_namespace: compiled.namespace.clone(),
                            subset: d.subset.clone(),
                            counts: TcpCounts::default(),
                        },
                        Totals::default(),
                    )
                });
                entry.1.add(&e.counters);
            }
        }
    }
    let samples: Vec<TcpSample> = samples
        .into_values()
        .map(|(mut s, totals)| {
            s.counts = TcpCounts::from(&totals);
            s
        })
        .collect();
    metrics.set_tcp(&samples);
}

/// Istio's `destination_version` for a subset: its `version` label, else
/// its name.
fn subset_version(cfg: Option<&LoadedConfig>, host: &str, subset: &str) -> String {
    cfg.and_then(|c| c.destination_rule(host))
        .and_then(|dr| dr.subset(subset))
        .and_then(|s| s.labels.get("version").cloned())
        .unwrap_or_else(|| subset.to_string())
}
