//! `consistentHash.useSourceIp` on the kernel path: a client's address
//! decides both its subset (against fixed-order cumulative bands) and its
//! endpoint (Maglev), so it stays put across connections, and a weight
//! change moves only the clients in the band that changed hands.
//!
//! Privileged: run with `cargo xtask test` (as root).

use std::collections::BTreeMap;
use std::net::IpAddr;

use canary_common::{source_hash, subset_point};
use canary_tests::agent::Agent;
use canary_tests::checkout::{PODS, vip4};
use canary_tests::e2e::*;
use canary_tests::probe::ProbeArgs;
use canary_tests::{require_root, unique_prefix};

const CLIENTS: u8 = 60;
const CONNECTIONS_EACH: u64 = 20;

/// The point on the [0, 10000) weight scale the kernel computes for a
/// socket bound to `ip` (the hash is shared code: canary-common).
fn point(ip: IpAddr) -> u32 {
    let IpAddr::V4(v4) = ip else {
        unreachable!("IPv4 clients")
    };
    subset_point(source_hash(&[u32::from_ne_bytes(v4.octets()), 0, 0, 0]))
}

fn version_of(pod: &str) -> &'static str {
    PODS.iter().find(|p| p.1 == pod).map(|p| p.0).unwrap_or("?")
}

/// source → the one pod that answered all its connections.
fn sticky_pods(r: &canary_tests::probe::ProbeReport) -> BTreeMap<IpAddr, String> {
    let by_source = r.by_source.as_ref().expect("--bind gives by_source");
    assert_eq!(by_source.len(), CLIENTS as usize);
    by_source
        .iter()
        .map(|(src, pods)| {
            assert_eq!(pods.len(), 1, "client {src} was split across {pods:?}");
            let (pod, n) = pods.iter().next().expect("one pod");
            assert_eq!(*n, CONNECTIONS_EACH);
            (src.parse().expect("ip"), pod.clone())
        })
        .collect()
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn source_ip_affinity_sticks_and_a_weight_change_moves_only_the_band() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    let sources: Vec<IpAddr> = (1..=CLIENTS)
        .map(|i| format!("10.77.1.{i}").parse().expect("ip"))
        .collect();
    let addrs: Vec<String> = sources.iter().map(|s| format!("{s}/16")).collect();
    world.client.add_addrs(&addrs).expect("client addresses");
    let agent =
        Agent::start(&prefix, &example("source-ip-affinity"), &world.cgroup).expect("agent");
    assert_eq!(
        weights_of(&agent.status().expect("status")),
        pair("v1", 90, "v2", 10)
    );

    let n = u64::from(CLIENTS) * CONNECTIONS_EACH;
    let args = ProbeArgs::count(vip4(), n).binds(sources.clone());
    let first = probe(&world, args.clone());
    assert_clean(&first, n);
    let before = sticky_pods(&first);
    for (src, pod) in &before {
        let expect = if point(*src) < 9000 { "v1" } else { "v2" };
        assert_eq!(
            version_of(pod),
            expect,
            "client {src} (point {})",
            point(*src)
        );
    }

    agent
        .weights("checkout-service", &["v1=70", "v2=30"])
        .expect("weights");
    let second = probe(&world, args);
    assert_clean(&second, n);
    let after = sticky_pods(&second);

    let mut moved = 0;
    for src in &sources {
        let (old, new) = (&before[src], &after[src]);
        let in_band = (7000..9000).contains(&point(*src));
        if in_band {
            assert_eq!(
                (version_of(old), version_of(new)),
                ("v1", "v2"),
                "client {src} is in the moved band"
            );
            moved += 1;
        } else {
            // Outside the band nothing changes, not even the endpoint.
            assert_eq!(
                old,
                new,
                "client {src} (point {}) moved without cause",
                point(*src)
            );
        }
        assert!(
            !(version_of(old) == "v2" && version_of(new) == "v1"),
            "client {src} went back from v2 to v1"
        );
    }
    assert!(
        moved > 0,
        "no client fell in the 20% band; choose more clients"
    );
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn unbound_sockets_hash_like_their_namespace_address() {
    require_root();
    let prefix = unique_prefix();
    let mut world = start(&prefix);
    // Pods that never bind(): at connect() they have no source address, so
    // the kernel hashes their network namespace, which the agent maps to
    // the namespace's address.
    // Four pods whose address hashes into v2's 10% band and four into v1's,
    // so a kernel that ignored the mapping would be caught (it would send
    // the v2 ones to v2 only by a 1-in-10 chance each).
    let candidates = (1..=254u8).map(|i| -> IpAddr { format!("10.77.2.{i}").parse().expect("ip") });
    let v2: Vec<IpAddr> = candidates
        .clone()
        .filter(|ip| point(*ip) >= 9000)
        .take(4)
        .collect();
    let v1: Vec<IpAddr> = candidates.filter(|ip| point(*ip) < 9000).take(4).collect();
    let pods: Vec<(canary_tests::Host, IpAddr)> = v2
        .into_iter()
        .chain(v1)
        .enumerate()
        .map(|(i, ip)| {
            let host = world
                .topology
                .add_host(&format!("p{i}"), &[format!("{ip}/16")])
                .expect("pod netns");
            (host, ip)
        })
        .collect();
    let _agent =
        Agent::start(&prefix, &example("source-ip-affinity"), &world.cgroup).expect("agent");
    let bin = canary_tests::bin_path("canary-probe").expect("probe");
    for (host, ip) in &pods {
        let r = canary_tests::probe::run_probe(
            &bin,
            Some(host.netns()),
            Some(&world.cgroup),
            &ProbeArgs::count(vip4(), CONNECTIONS_EACH),
        )
        .expect("probe");
        assert_clean(&r, CONNECTIONS_EACH);
        assert_eq!(
            r.by_pod.len(),
            1,
            "pod {ip} was split across {:?}",
            r.by_pod
        );
        let pod = r.by_pod.keys().next().expect("pod");
        let expect = if point(*ip) < 9000 { "v1" } else { "v2" };
        assert_eq!(
            version_of(pod),
            expect,
            "pod {ip} (point {}) answered by {pod}",
            point(*ip)
        );
    }
}
