//! The status report: the live routing table joined with the kernel's
//! counters (per service, port, subset and endpoint) and the live rates.

use std::collections::HashMap;

use canary_common::{CounterKey, Counters};

use super::overrides::Overrides;
use crate::admin::protocol::*;
use crate::compile::{DataPath, EndpointPick, RoutingTable};
use crate::dataplane::encode::{backend, service_key};
use crate::metrics::Metrics;

/// Adds the live request and connection rates to each destination.
pub(super) fn with_live(mut services: Vec<ServiceStatus>, metrics: &Metrics) -> Vec<ServiceStatus> {
    for svc in &mut services {
        for d in svc.ports.iter_mut().flat_map(|p| &mut p.destinations) {
            d.live = Some(metrics.live(&svc.host, d.subset.as_deref()));
        }
    }
    services
}

/// Joins the live table with the kernel counters.
pub(super) fn service_status(
    table: &RoutingTable,
    counters: &[(CounterKey, Counters)],
    overrides: &Overrides,
) -> Vec<ServiceStatus> {
    let index: HashMap<CounterKey, &Counters> = counters.iter().map(|(k, c)| (*k, c)).collect();
    table
        .services
        .iter()
        .map(|svc| {
            let (path, path_reasons) = match &svc.path {
                DataPath::Kernel => ("kernel".to_string(), Vec::new()),
                DataPath::Shim { reasons } => ("shim".to_string(), reasons.clone()),
            };
            let ports = svc
                .ports
                .iter()
                .map(|port| {
                    let route = &port.route;
                    let total: u64 = route.destinations.iter().map(|d| u64::from(d.weight)).sum();
                    let single = route.destinations.len() == 1;
                    let destinations = route
                        .destinations
                        .iter()
                        .enumerate()
                        .map(|(i, d)| {
                            let mut counters = Totals::default();
                            let endpoints = d
                                .endpoints
                                .iter()
                                .map(|e| {
                                    let mut t = Totals::default();
                                    for vip in
                                        svc.vips.iter().filter(|v| v.is_ipv4() == e.addr.is_ipv4())
                                    {
                                        let key = CounterKey {
                                            service: service_key(std::net::SocketAddr::new(
                                                *vip, port.port,
                                            )),
                                            backend: backend(e.addr),
                                            subset: i as u32,
                                        };
                                        if let Some(c) = index.get(&key) {
                                            t.add(&Totals::from(*c));
                                        }
                                    }
                                    counters.add(&t);
                                    EndpointStatus {
                                        addr: e.addr.to_string(),
                                        pod: e.pod.clone(),
                                        counters: t,
                                    }
                                })
                                .collect();
                            // Refusals are counted per subset, not per endpoint.
                            for vip in &svc.vips {
                                let key = CounterKey {
                                    service: service_key(std::net::SocketAddr::new(
                                        *vip, port.port,
                                    )),
                                    backend: Default::default(),
                                    subset: i as u32,
                                };
                                if let Some(c) = index.get(&key) {
                                    counters.no_endpoint += c.no_endpoint;
                                }
                            }
                            let percent = if single {
                                100.0
                            } else if total == 0 {
                                0.0
                            } else {
                                100.0 * f64::from(d.weight) / total as f64
                            };
                            DestinationStatus {
                                host: d.host.clone(),
                                subset: d.subset.clone(),
                                weight: d.weight,
                                file_weight: d.file_weight,
                                percent,
                                pick: match d.pick {
                                    EndpointPick::Random => "random".into(),
                                    EndpointPick::Maglev => "maglev".into(),
                                },
                                counters,
                                endpoints,
                                live: None,
                            }
                        })
                        .collect();
                    PortStatus {
                        port: port.port,
                        route_name: route.name.clone(),
                        origin: route.origin.clone(),
                        sticky: route.sticky.map(|_| "source_ip".to_string()),
                        overridden: overrides.contains(&svc.host, route.name.as_deref()),
                        destinations,
                    }
                })
                .collect();
            ServiceStatus {
                host: svc.host.clone(),
                vips: svc.vips.iter().map(|v| v.to_string()).collect(),
                path,
                path_reasons,
                virtual_service: svc.virtual_service.clone(),
                destination_rule: svc.destination_rule.clone(),
                ports,
            }
        })
        .collect()
}
