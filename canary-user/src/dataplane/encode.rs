//! Turns the compiled routing table into the exact entries the kernel maps
//! hold: one route per (VIP, port), endpoints filtered to the VIP's family.
//! Pure, so it is tested without a kernel.

use std::net::{IpAddr, SocketAddr};

use canary_common::*;

use crate::compile::{DataPath, EndpointPick, RoutingTable, StickyKey, bands};

use super::maglev;

/// The kernel's view of one service address.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedRoute {
    pub key: ServiceKey,
    /// Which service and port this is, for status and counters.
    pub host: String,
    pub vip: SocketAddr,
    pub flags: u32,
    /// Set for services the L7 shim serves: the kernel redirects their
    /// connections to this port on the client's loopback.
    pub shim_port: Option<u16>,
    pub subsets: Vec<EncodedSubset>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EncodedSubset {
    pub upper: u32,
    pub backends: Vec<Backend>,
    /// Present when endpoints are picked by client hash.
    pub maglev: Option<Vec<u16>>,
}

impl EncodedRoute {
    pub fn backend_count(&self) -> u32 {
        self.subsets.iter().map(|s| s.backends.len() as u32).sum()
    }
}

/// Every (VIP, port) of every service, in table order. Services whose
/// path is the shim are redirected to `shim_port` when one is given.
pub fn encode(table: &RoutingTable, shim_port: Option<u16>) -> Vec<EncodedRoute> {
    let mut out = Vec::new();
    for service in &table.services {
        for vip in &service.vips {
            for port in &service.ports {
                let route = &port.route;
                let weights: Vec<u32> = route.destinations.iter().map(|d| d.weight).collect();
                let uppers = bands(&weights);
                let subsets = route
                    .destinations
                    .iter()
                    .zip(uppers)
                    .take(MAX_SUBSETS)
                    .map(|(dest, upper)| {
                        let endpoints: Vec<_> = dest
                            .endpoints
                            .iter()
                            .filter(|e| e.addr.is_ipv4() == vip.is_ipv4())
                            .collect();
                        let backends = endpoints.iter().map(|e| backend(e.addr)).collect();
                        let maglev = (dest.pick == EndpointPick::Maglev).then(|| {
                            let names: Vec<String> = endpoints
                                .iter()
                                .map(|e| format!("{}/{}", e.pod, e.addr))
                                .collect();
                            maglev::build(&names)
                        });
                        EncodedSubset {
                            upper,
                            backends,
                            maglev,
                        }
                    })
                    .collect();
                let flags = match route.sticky {
                    Some(StickyKey::SourceIp) => TABLE_HASH_SUBSET,
                    None => 0,
                };
                out.push(EncodedRoute {
                    key: service_key(SocketAddr::new(*vip, port.port)),
                    host: service.host.clone(),
                    vip: SocketAddr::new(*vip, port.port),
                    flags,
                    shim_port: match service.path {
                        DataPath::Shim { .. } => shim_port,
                        DataPath::Kernel => None,
                    },
                    subsets,
                });
            }
        }
    }
    out
}

/// Network-order words, as the kernel hands addresses to sock_addr hooks.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

pub fn service_key(addr: SocketAddr) -> ServiceKey {
    ServiceKey {
        addr: addr_words(addr.ip()),
        port: addr.port().to_be(),
        family: family(addr.ip()),
        proto: PROTO_TCP,
    }
}

pub fn backend(addr: SocketAddr) -> Backend {
    Backend {
        addr: addr_words(addr.ip()),
        port: addr.port().to_be(),
        family: family(addr.ip()),
        _pad: 0,
    }
}

pub fn backend_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(words_addr(b.addr, b.family), u16::from_be(b.port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::*;

    fn endpoint(addr: &str, pod: &str) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            pod: pod.into(),
            namespace: "prod".into(),
        }
    }

    fn table(sticky: bool) -> RoutingTable {
        let dest = |subset: &str, weight, eps: Vec<Endpoint>| CompiledDestination {
            host: "checkout.prod.svc.cluster.local".into(),
            subset: Some(subset.into()),
            weight,
            file_weight: weight,
            pick: if sticky {
                EndpointPick::Maglev
            } else {
                EndpointPick::Random
            },
            endpoints: eps,
        };
        RoutingTable {
            services: vec![CompiledService {
                host: "checkout.prod.svc.cluster.local".into(),
                name: "checkout".into(),
                namespace: "prod".into(),
                vips: vec![
                    "10.96.0.10".parse().unwrap(),
                    "fd00:96::10".parse().unwrap(),
                ],
                path: DataPath::Kernel,
                virtual_service: None,
                destination_rule: None,
                http_routes: Vec::new(),
                ports: vec![CompiledPort {
                    port: 8080,
                    name: None,
                    route: KernelRoute {
                        name: None,
                        origin: "test".into(),
                        sticky: sticky.then_some(StickyKey::SourceIp),
                        destinations: vec![
                            dest(
                                "v1",
                                90,
                                vec![
                                    endpoint("10.77.0.11:8080", "a"),
                                    endpoint("[fd00:77::11]:8080", "a"),
                                    endpoint("10.77.0.12:8080", "b"),
                                ],
                            ),
                            dest("v2", 10, vec![endpoint("10.77.0.21:8080", "c")]),
                        ],
                    },
                }],
            }],
        }
    }

    #[test]
    fn one_route_per_vip_with_family_filtered_endpoints() {
        let routes = encode(&table(false), None);
        assert_eq!(routes.len(), 2);
        let v4 = &routes[0];
        assert_eq!(v4.vip, "10.96.0.10:8080".parse().unwrap());
        assert_eq!(v4.subsets[0].upper, 9000);
        assert_eq!(v4.subsets[1].upper, 10_000);
        assert_eq!(v4.subsets[0].backends.len(), 2);
        assert_eq!(v4.flags, 0);
        assert!(v4.subsets[0].maglev.is_none());
        let v6 = &routes[1];
        assert_eq!(v6.subsets[0].backends.len(), 1);
        assert_eq!(v6.subsets[1].backends.len(), 0, "v2 has no IPv6 endpoint");
        assert_eq!(
            backend_addr(&v6.subsets[0].backends[0]),
            "[fd00:77::11]:8080".parse().unwrap()
        );
    }

    #[test]
    fn sticky_routes_hash_the_subset_and_carry_maglev() {
        let routes = encode(&table(true), None);
        assert_eq!(routes[0].flags, TABLE_HASH_SUBSET);
        let m = routes[0].subsets[0].maglev.as_ref().unwrap();
        assert_eq!(m.len(), MAGLEV_SIZE as usize);
        assert!(m.iter().all(|i| *i < 2));
    }

    #[test]
    fn keys_use_network_order_like_the_kernel() {
        let key = service_key("10.96.0.10:8080".parse().unwrap());
        // Memory layout must be the wire bytes: 10.96.0.10, port 0x1f90.
        assert_eq!(key.addr[0].to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0x1f, 0x90]);
        let ip: IpAddr = "fd00:96::10".parse().unwrap();
        assert_eq!(words_addr(addr_words(ip), FAMILY_V6), ip);
    }
}
