//! gRPC through the shim: a real grpcio client and servers (h2c), a unary
//! call routed by a metadata header and retried on `unavailable` by Istio's
//! default retry policy — with the composite-routing example as written.
//!
//! Privileged: run with `cargo xtask test` (as root).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use canary_tests::agent::Agent;
use canary_tests::checkout::{PODS, VIP4};
use canary_tests::e2e::example;
use canary_tests::{
    ChildGuard, TestCgroup, Topology, require_root, run_in, spawn_in, unique_prefix, wait_for_tcp,
};

fn echo_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/echo.py")
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn grpc_unary_is_routed_by_header_and_retried_on_unavailable() {
    require_root();
    let prefix = unique_prefix();
    let log = std::env::temp_dir().join(format!("canary-{prefix}-grpc-v2.log"));
    let mut topology = Topology::new(&prefix).expect("topology");
    let mut servers: Vec<ChildGuard> = Vec::new();
    let mut hosts = Vec::new();
    for (version, pod, v4, _) in PODS {
        let host = topology
            .add_host(pod.trim_start_matches("checkout-"), &[format!("{v4}/16")])
            .expect("host");
        let mut cmd = Command::new("python3");
        cmd.arg(echo_py()).args([
            "serve",
            "--listen",
            &format!("{v4}:8080"),
            "--version",
            version,
            "--pod",
            pod,
        ]);
        if version == "v2" {
            // The canary's first call fails with UNAVAILABLE.
            cmd.args(["--unavailable-first", "1", "--log"]).arg(&log);
        }
        cmd.stdin(Stdio::null());
        servers.push(spawn_in(cmd, Some(host.netns()), None).expect("grpc server"));
        wait_for_tcp(
            Some(host.netns()),
            format!("{v4}:8080").parse().expect("addr"),
            Duration::from_secs(20),
        )
        .expect("grpc server listening");
        hosts.push(host);
    }
    let client = topology
        .add_host("client", &["10.77.0.100/16"])
        .expect("client");
    let cgroup = TestCgroup::new(&prefix, "client").expect("cgroup");
    let _agent = Agent::start(&prefix, &example("composite-routing"), &cgroup).expect("agent");

    let call = |metadata: &[&str], calls: u32| -> serde_json::Value {
        let mut cmd = Command::new("python3");
        cmd.arg(echo_py())
            .args(["call", "--target", VIP4, "--calls", &calls.to_string()]);
        for m in metadata {
            cmd.args(["--metadata", m]);
        }
        let out = run_in(
            cmd,
            Some(client.netns()),
            Some(&cgroup),
            Duration::from_secs(60),
        )
        .expect("grpc call");
        serde_json::from_str(&out).expect("report")
    };

    // x-canary-user: true → v2, whose first call is UNAVAILABLE: the shim
    // retries (Istio's default policy retries `unavailable`), the client
    // sees OK.
    let canary = call(&["x-canary-user=true"], 5);
    assert_eq!(canary["codes"]["OK"], 5, "{canary}");
    assert_eq!(canary["by_version"]["v2"], 5, "{canary}");
    let attempts = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count();
    assert_eq!(
        attempts, 6,
        "5 calls plus one retry of the UNAVAILABLE one reach v2"
    );

    // Without the header: the 95/5 split, mostly v1.
    let public = call(&[], 40);
    assert_eq!(public["codes"]["OK"], 40, "{public}");
    assert!(
        public["by_version"]["v1"].as_u64().unwrap_or(0) >= 30,
        "{public}"
    );

    let _ = std::fs::remove_file(&log);
    drop(servers);
}
