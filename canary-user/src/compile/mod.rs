//! The second half of the config path: a validated config becomes one
//! immutable `RoutingTable`. Pure functions, no kernel: for every served
//! Service port, the weighted split the kernel applies per connection, with
//! its endpoints, and whether the kernel alone can serve the service or the
//! L7 shim must.

mod bands;
mod endpoints;
pub mod model;
mod path;
mod route;
mod summary;
mod weights;

pub use bands::bands;
pub use endpoints::endpoints;
pub use model::{
    CompiledDestination, CompiledPort, CompiledService, DataPath, Endpoint, EndpointPick,
    KernelRoute, RoutingTable, StickyKey,
};
pub use summary::summary;
pub use weights::{WeightsError, apply_weights};

use crate::config::{ConfigWarning, LoadedConfig};

/// Compiles a validated config into the routing table the node serves.
pub fn compile(cfg: &LoadedConfig) -> RoutingTable {
    compile_with_warnings(cfg).0
}

/// `compile`, plus what the operator should know about the result: pods
/// skipped, subsets without endpoints, ports that fall back to the service
/// default. `config::load_path` already puts these in
/// `LoadedConfig::warnings`.
pub fn compile_with_warnings(cfg: &LoadedConfig) -> (RoutingTable, Vec<ConfigWarning>) {
    let mut warnings = Vec::new();
    let mut services = Vec::new();
    for svc in cfg.services.iter().filter(|s| s.is_served()) {
        let vs = cfg.virtual_service(&svc.host);
        let path = path::data_path(cfg, svc, vs);
        let ports: Vec<CompiledPort> = svc
            .tcp_ports()
            .map(|port| CompiledPort {
                port: port.port,
                name: port.name.clone(),
                route: route::kernel_route(cfg, svc, vs, port.port, &path, &mut warnings),
            })
            .collect();
        if ports.is_empty() {
            // No TCP port: nothing for canary to serve (validation said so).
            continue;
        }
        services.push(CompiledService {
            host: svc.host.clone(),
            name: svc.meta.name.clone(),
            namespace: svc.meta.namespace.clone(),
            vips: svc.vips.clone(),
            path,
            virtual_service: vs.map(|v| v.meta.key()),
            destination_rule: cfg.destination_rule(&svc.host).map(|d| d.meta.key()),
            ports,
            http_routes: vs.map(|v| route::http_routes(cfg, v)).unwrap_or_default(),
        });
    }
    services.sort_by(|a, b| a.host.cmp(&b.host));
    crate::config::dedup_warnings(&mut warnings);
    (RoutingTable { services }, warnings)
}

#[cfg(test)]
mod tests;
