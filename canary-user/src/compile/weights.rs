//! Live weight overrides (`canary weights HOST SUBSET=W ...`).

use std::collections::BTreeSet;

use super::model::{CompiledDestination, CompiledService, KernelRoute, RoutingTable};
use crate::config::host::short_name;

const WEIGHT_VALID: &str = "an integer >= 0; weights are normalised by their sum";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    #[error("unknown service {host:?} (valid: {valid})")]
    UnknownHost { host: String, valid: String },
    #[error("service {host} has no route named {route:?} (valid: {valid})")]
    UnknownRoute {
        host: String,
        route: String,
        valid: String,
    },
    #[error("{route} of {host} has no destination {name:?} (valid: {valid})")]
    UnknownSubset {
        host: String,
        route: String,
        name: String,
        valid: String,
    },
    #[error("{name:?} names several destinations of {route} of {host} (valid: one of {valid})")]
    AmbiguousSubset {
        host: String,
        route: String,
        name: String,
        valid: String,
    },
    #[error("{name:?} is given twice (valid: each destination once)")]
    DuplicateSubset { name: String },
    #[error("weight {weight} for {name} is negative (valid: {WEIGHT_VALID})")]
    NegativeWeight { name: String, weight: i64 },
    #[error("weights add up to {total} (valid: a total of at most 4294967295)")]
    WeightTooLarge { total: i128 },
    #[error(
        "all weights are 0, so no destination would receive traffic (valid: at least one weight > 0)"
    )]
    AllZero,
    #[error("no weights given (valid: SUBSET=WEIGHT for one or more of: {valid})")]
    NoWeights { valid: String },
}

/// Returns a new table in which `host`'s route (every port's, or only the
/// route named `route`) splits by `weights`. Each entry names a destination
/// by subset, or by host when it has no subset (`host/subset` when a
/// subset name alone is ambiguous). Destinations not named get 0.
/// `file_weight` is kept, so status can show the override.
pub fn apply_weights(
    table: &RoutingTable,
    host: &str,
    route: Option<&str>,
    weights: &[(String, i64)],
) -> Result<RoutingTable, WeightsError> {
    let svc = table.find(host).ok_or_else(|| WeightsError::UnknownHost {
        host: host.to_string(),
        valid: if table.services.is_empty() {
            "none: no service is routed".into()
        } else {
            let hosts: Vec<&str> = table.services.iter().map(|s| s.host.as_str()).collect();
            hosts.join(", ")
        },
    })?;
    let first_route = svc.ports.first().map(|p| &p.route);
    if weights.is_empty() {
        return Err(WeightsError::NoWeights {
            valid: first_route.map(names).unwrap_or_default(),
        });
    }
    let mut seen = BTreeSet::new();
    let mut total: i128 = 0;
    for (name, weight) in weights {
        if !seen.insert(name.as_str()) {
            return Err(WeightsError::DuplicateSubset { name: name.clone() });
        }
        if *weight < 0 {
            return Err(WeightsError::NegativeWeight {
                name: name.clone(),
                weight: *weight,
            });
        }
        total += i128::from(*weight);
    }
    if total > i128::from(u32::MAX) {
        return Err(WeightsError::WeightTooLarge { total });
    }

    // The kernel route of every port (or of the ports whose route has that
    // name), and the shim's http rules: those with that name, or (no name
    // given) those that are some port's kernel route, so both stay in step.
    let selected: Vec<usize> = svc
        .ports
        .iter()
        .enumerate()
        .filter(|(_, p)| route.is_none_or(|r| p.route.name.as_deref() == Some(r)))
        .map(|(i, _)| i)
        .collect();
    let selected_http: Vec<usize> = svc
        .http_routes
        .iter()
        .enumerate()
        .filter(|(_, h)| match route {
            Some(r) => h.name.as_deref() == Some(r),
            None => svc.ports.iter().any(|p| p.route.origin == h.origin),
        })
        .map(|(i, _)| i)
        .collect();
    if let Some(r) = route
        && selected.is_empty()
        && selected_http.is_empty()
    {
        let named: BTreeSet<&str> = svc
            .ports
            .iter()
            .map(|p| &p.route)
            .chain(&svc.http_routes)
            .filter_map(|r| r.name.as_deref())
            .collect();
        return Err(WeightsError::UnknownRoute {
            host: svc.host.clone(),
            route: r.to_string(),
            valid: if named.is_empty() {
                "none: this service's routes have no name; give no route".into()
            } else {
                named.into_iter().collect::<Vec<_>>().join(", ")
            },
        });
    }

    // Resolve every name on every selected route before changing anything.
    let mut plans: Vec<(usize, Vec<u32>)> = Vec::new();
    for &i in &selected {
        let port = &svc.ports[i];
        let describe = || match &port.route.name {
            Some(n) => format!("port {} route {n:?} ({})", port.port, port.route.origin),
            None => format!("port {} route ({})", port.port, port.route.origin),
        };
        plans.push((i, plan(svc, &port.route, weights, describe)?));
    }
    let mut http_plans: Vec<(usize, Vec<u32>)> = Vec::new();
    for &i in &selected_http {
        let r = &svc.http_routes[i];
        let describe = || match &r.name {
            Some(n) => format!("route {n:?} ({})", r.origin),
            None => format!("route ({})", r.origin),
        };
        http_plans.push((i, plan(svc, r, weights, describe)?));
    }

    let mut out = table.clone();
    if let Some(target) = out.services.iter_mut().find(|s| s.host == svc.host) {
        for (i, new) in plans {
            for (d, w) in target.ports[i].route.destinations.iter_mut().zip(new) {
                d.weight = w;
            }
        }
        for (i, new) in http_plans {
            for (d, w) in target.http_routes[i].destinations.iter_mut().zip(new) {
                d.weight = w;
            }
        }
    }
    Ok(out)
}

/// The new weights of `r`'s destinations, in its order.
fn plan(
    svc: &CompiledService,
    r: &KernelRoute,
    weights: &[(String, i64)],
    describe: impl Fn() -> String,
) -> Result<Vec<u32>, WeightsError> {
    let mut new = vec![0u32; r.destinations.len()];
    for (name, weight) in weights {
        let hits: Vec<usize> = r
            .destinations
            .iter()
            .enumerate()
            .filter(|(_, d)| is_named(d, name))
            .map(|(k, _)| k)
            .collect();
        match hits.as_slice() {
            [k] => new[*k] = u32::try_from(*weight).unwrap_or(u32::MAX),
            [] => {
                return Err(WeightsError::UnknownSubset {
                    host: svc.host.clone(),
                    route: describe(),
                    name: name.clone(),
                    valid: names(r),
                });
            }
            _ => {
                return Err(WeightsError::AmbiguousSubset {
                    host: svc.host.clone(),
                    route: describe(),
                    name: name.clone(),
                    valid: qualified_names(r),
                });
            }
        }
    }
    if new.iter().all(|w| *w == 0) {
        return Err(WeightsError::AllZero);
    }
    Ok(new)
}

/// How the CLI names a destination: its subset, or its service name.
fn label(d: &CompiledDestination) -> &str {
    d.subset.as_deref().unwrap_or_else(|| short_name(&d.host))
}

fn is_named(d: &CompiledDestination, name: &str) -> bool {
    let qualified = |prefix: &str| match &d.subset {
        Some(s) => format!("{prefix}/{s}") == name,
        None => false,
    };
    match &d.subset {
        Some(s) if s == name => return true,
        _ => {}
    }
    if qualified(&d.host) || qualified(short_name(&d.host)) {
        return true;
    }
    d.subset.is_none() && {
        let short = short_name(&d.host);
        let ns_form = d.host.strip_suffix(".svc.cluster.local").unwrap_or(&d.host);
        name == d.host || name == short || name == ns_form || name == format!("{ns_form}.svc")
    }
}

fn names(r: &KernelRoute) -> String {
    let names: Vec<&str> = r.destinations.iter().map(label).collect();
    names.join(", ")
}

fn qualified_names(r: &KernelRoute) -> String {
    let names: Vec<String> = r
        .destinations
        .iter()
        .map(|d| match &d.subset {
            Some(s) => format!("{}/{s}", short_name(&d.host)),
            None => short_name(&d.host).to_string(),
        })
        .collect();
    names.join(", ")
}
