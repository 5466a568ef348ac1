//! End-to-end tests of the in-kernel fast path: the real `canary` agent
//! with its real eBPF programs attached to a test cgroup, real backends in
//! network namespaces, and a real client (`canary-probe`) making TCP/HTTP
//! connections to the Service VIP of `deploy/examples/`.
//!
//! Privileged: run with `cargo xtask test` (as root). They never skip.

use std::collections::BTreeMap;
use std::time::Duration;

use canary_tests::agent::{Agent, counter_total, destinations};
use canary_tests::checkout::{Checkout, vip4, vip6};
use canary_tests::e2e::*;
use canary_tests::probe::ProbeArgs;
use canary_tests::{require_root, unique_prefix};
use serde_json::Value;

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn weighted_split_follows_a_live_weight_change_without_failures() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    let agent = Agent::start(&prefix, &example("checkout"), &world.cgroup).expect("agent");
    assert_eq!(
        weights_of(&agent.status().expect("status")),
        pair("v1", 90, "v2", 10)
    );

    let before = probe(&world, ProbeArgs::count(vip4(), 2000));
    assert_clean(&before, 2000);
    assert_share(&before, "v2", 0.10);

    // A client keeps connecting while the operator changes the split.
    let background = BackgroundProbe::start(&world, &prefix, vip4());
    let answer = agent
        .weights("checkout-service", &["v1=50", "v2=50"])
        .expect("weights");
    assert!(
        answer.contains("v1=50") && answer.contains("v2=50"),
        "weights answer: {answer}"
    );

    let after = probe(&world, ProbeArgs::count(vip4(), 2000));
    assert_clean(&after, 2000);
    assert_share(&after, "v2", 0.50);

    background.finish_without_failures("across the change");

    // Status shows the override beside the file's weights.
    let status = agent.status().expect("status");
    assert_eq!(weights_of(&status), pair("v1", 50, "v2", 50));
    let file: Vec<u64> = destinations(&status, HOST)
        .iter()
        .map(|d| d["file_weight"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(file, vec![90, 10]);
    let port = &status["services"][0]["ports"][0];
    assert_eq!(port["overridden"], true, "{port:#}");

    // --reset returns to the file.
    agent
        .cli(&["weights", "checkout-service", "--reset"])
        .expect("reset");
    assert_eq!(
        weights_of(&agent.status().expect("status")),
        pair("v1", 90, "v2", 10)
    );
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn ipv6_service_splits_like_ipv4() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    let _agent = Agent::start(&prefix, &example("checkout"), &world.cgroup).expect("agent");
    let r = probe(&world, ProbeArgs::count(vip6(), 2000));
    assert_clean(&r, 2000);
    assert_share(&r, "v2", 0.10);
    // Both v1 pods serve (random pick inside the subset).
    assert!(
        r.by_pod.get("checkout-v1-a").copied().unwrap_or(0) > 500,
        "{:?}",
        r.by_pod
    );
    assert!(
        r.by_pod.get("checkout-v1-b").copied().unwrap_or(0) > 500,
        "{:?}",
        r.by_pod
    );
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn sockops_counters_equal_the_connections_made() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    let agent = Agent::start(&prefix, &example("checkout"), &world.cgroup).expect("agent");
    let mut made = probe(&world, ProbeArgs::count(vip4(), 600));
    made.merge(probe(&world, ProbeArgs::count(vip6(), 400)));
    assert_eq!(made.ok, 1000, "{made:?}");

    let opened = |s: &Value, field: &str| -> BTreeMap<String, u64> {
        destinations(s, HOST)
            .iter()
            .map(|d| {
                (
                    d["subset"].as_str().unwrap_or("").to_string(),
                    d["counters"][field].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    // Closes are counted when the kernel finishes each socket: wait for all.
    let status = wait_status(&agent, "every connection closed", |s| {
        opened(s, "closed").values().sum::<u64>() == 1000
    });
    let by_subset = opened(&status, "opened");
    assert_eq!(
        by_subset.get("v1").copied().unwrap_or(0),
        made.by_version["v1"],
        "{status:#}"
    );
    assert_eq!(
        by_subset.get("v2").copied().unwrap_or(0),
        made.by_version.get("v2").copied().unwrap_or(0)
    );
    assert_eq!(opened(&status, "failed").values().sum::<u64>(), 0);
    // Per endpoint too: each pod's counters (IPv4 and IPv6 address) equal
    // the answers it gave.
    let mut per_pod: BTreeMap<String, u64> = BTreeMap::new();
    for d in destinations(&status, HOST) {
        for e in d["endpoints"].as_array().expect("endpoints") {
            *per_pod
                .entry(e["pod"].as_str().expect("pod").to_string())
                .or_default() += e["counters"]["opened"].as_u64().unwrap_or(0);
        }
    }
    per_pod.retain(|_, n| *n > 0);
    assert_eq!(per_pod, made.by_pod);
    // Payload, as Istio counts it (TCP's own counters include the SYN and
    // FINs): the probe reads every response to the server's close, and the
    // servers acknowledged every request before answering.
    let received = counter_total(&status, HOST, "bytes_received");
    let sent = counter_total(&status, HOST, "bytes_sent");
    assert_eq!(received, made.bytes.received, "bytes received");
    assert_eq!(sent, made.bytes.sent, "bytes sent");
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn refused_connections_are_counted_as_failed_both_ways_of_marking_them() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    // Nothing listens on the target port: every pod answers the SYN with
    // a reset, so no connection ever establishes.
    let config = ConfigCopy::of("checkout", &prefix);
    config.edit("services.yaml", "targetPort: 8080", "targetPort: 8089");
    // Linux 6.12+ (this machine): connect4 marks the steered socket for
    // sockops; `--sockops-lookup`: sockops looks each connecting socket up,
    // the way kernels before 6.12 run.
    for extra in [&[][..], &["--sockops-lookup"][..]] {
        let run = format!("{prefix}{}", extra.len());
        let agent = Agent::start_at_with_args(
            &config.0,
            world.cgroup.path(),
            format!("/sys/fs/bpf/canary-test-{run}").into(),
            format!("/run/canary-test-{run}").into(),
            extra,
        )
        .expect("agent");
        let r = probe(&world, ProbeArgs::count(vip4(), 200));
        assert_eq!(r.failed, 200, "{extra:?}: {r:?}");
        assert_eq!(
            r.errors.keys().collect::<Vec<_>>(),
            vec!["ECONNREFUSED"],
            "{extra:?}: {r:?}"
        );
        let status = wait_status(&agent, "every refused connection counted", |s| {
            counter_total(s, HOST, "failed") == 200
        });
        assert_eq!(counter_total(&status, HOST, "opened"), 0, "{status:#}");
        assert_eq!(counter_total(&status, HOST, "closed"), 0, "{status:#}");
        drop(agent);
    }
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn a_dual_stack_socket_dialling_the_ipv4_vip_is_split_too() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    let _agent = Agent::start(&prefix, &example("checkout"), &world.cgroup).expect("agent");
    // gRPC's C core and Java dial IPv4 services through AF_INET6 sockets:
    // ::ffff:10.96.0.10 must be the IPv4 service.
    let script = r#"
import json, socket
seen, peers = {}, set()
for _ in range(400):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.connect(("::ffff:10.96.0.10", 8080))
    peers.add(s.getpeername()[0])
    s.sendall(REQUEST)
    version = answer(s)
    seen[version] = seen.get(version, 0) + 1
print(json.dumps({"by_version": seen, "peers": sorted(peers)}))
"#;
    let report = python_client(&world, script);
    assert_eq!(
        report["peers"],
        serde_json::json!(["::ffff:10.96.0.10"]),
        "getpeername shows the mapped VIP: {report}"
    );
    let v1 = report["by_version"]["v1"].as_u64().unwrap_or(0);
    let v2 = report["by_version"]["v2"].as_u64().unwrap_or(0);
    assert_eq!(v1 + v2, 400, "{report}");
    // 90/10 within 4σ (σ = 6 over 400).
    assert!((16..=64).contains(&v2), "v2 answered {v2} of 400: {report}");
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn flows_beyond_the_slots_go_to_the_overflow_map_and_still_show_the_vip_and_count() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    // One flow slot: of 100 connections held open at once, 99 find it taken
    // and go to the overflow hash map, as a connection does that outlives
    // 262,144 newer cookies.
    let agent = Agent::start_at_with_args(
        &example("checkout"),
        world.cgroup.path(),
        format!("/sys/fs/bpf/canary-test-{prefix}").into(),
        format!("/run/canary-test-{prefix}").into(),
        &["--flow-slots", "1"],
    )
    .expect("agent");
    let script = r#"
import json, socket
socks = [socket.create_connection(("10.96.0.10", 8080)) for _ in range(100)]
peers = sorted({s.getpeername()[0] + ":" + str(s.getpeername()[1]) for s in socks})
seen = {}
for s in socks:
    s.sendall(REQUEST)
for s in socks:
    version = answer(s)
    seen[version] = seen.get(version, 0) + 1
print(json.dumps({"by_version": seen, "peers": peers}))
"#;
    let report = python_client(&world, script);
    assert_eq!(
        report["peers"],
        serde_json::json!(["10.96.0.10:8080"]),
        "getpeername shows the VIP for every flow, slot or overflow: {report}"
    );
    let v1 = report["by_version"]["v1"].as_u64().unwrap_or(0);
    let v2 = report["by_version"]["v2"].as_u64().unwrap_or(0);
    assert_eq!(v1 + v2, 100, "{report}");
    let status = wait_status(&agent, "every connection closed", |s| {
        counter_total(s, HOST, "closed") == 100
    });
    assert_eq!(counter_total(&status, HOST, "opened"), 100, "{status:#}");
    assert_eq!(counter_total(&status, HOST, "failed"), 0, "{status:#}");
}

/// What every Python client script starts with: the request, and reading
/// a `canary-backend` answer to the server's close.
const PYTHON_PRELUDE: &str = r#"
REQUEST = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"

def answer(s):
    """The version that answered on socket s, read to the end; closes s."""
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.split(b"\r\n\r\n", 1)[1].split()[0].decode()
"#;

/// Runs a Python client (after `PYTHON_PRELUDE`) in the client namespace
/// and cgroup; its one line of JSON output.
fn python_client(world: &Checkout, script: &str) -> Value {
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", &format!("{PYTHON_PRELUDE}{script}")]);
    let out = canary_tests::run_in(
        cmd,
        Some(world.client.netns()),
        Some(&world.cgroup),
        Duration::from_secs(60),
    )
    .expect("python client");
    serde_json::from_str(&out).expect("json")
}
