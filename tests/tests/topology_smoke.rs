//! The test kit on its own, without canary: a bridge, backends and a client
//! in their own namespaces, the probe talking to real backend addresses,
//! and nothing left behind afterwards.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use canary_tests::backend::BackendSpec;
use canary_tests::probe::{ProbeArgs, ProbeReport, run_probe, spawn_probe};
use canary_tests::{
    TestCgroup, Topology, in_netns, require_root, run_in, unique_prefix, wait_for_tcp,
};

const BACKEND: &str = env!("CARGO_BIN_EXE_canary-backend");
const PROBE: &str = env!("CARGO_BIN_EXE_canary-probe");

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

fn netns_names() -> Result<String> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn assert_gone(prefix: &str, cgroup: &Path) -> Result<()> {
    let names = netns_names()?;
    assert!(
        !names.lines().any(|l| l.starts_with(&format!("{prefix}-"))),
        "namespaces of {prefix} left behind:\n{names}"
    );
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
    Ok(())
}

fn assert_all_from(report: &ProbeReport, n: u64, version: &str, pod: &str) {
    assert_eq!(report.attempted, n, "{report:?}");
    assert_eq!(report.ok, n, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.peer_is_target, n, "{report:?}");
    assert_eq!(report.peer_mismatch, 0, "{report:?}");
    assert_eq!(report.by_version.get(version), Some(&n), "{report:?}");
    assert_eq!(report.by_pod.get(pod), Some(&n), "{report:?}");
    assert_eq!(report.by_pod.len(), 1, "{report:?}");
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn probe_reaches_backends_directly_and_everything_is_removed() -> Result<()> {
    require_root();
    let prefix = unique_prefix();
    let probe = Path::new(PROBE);
    // The library's own lookup finds the same binaries.
    assert_eq!(canary_tests::bin_path("canary-probe")?, probe);
    let cgroup_path: PathBuf;
    {
        let mut topo = Topology::new(&prefix)?;
        let b1 = topo.add_host("backend1", &["10.77.0.11/16", "fd00:77::11/64"])?;
        let b2 = topo.add_host("backend2", &["10.77.0.12/16", "fd00:77::12/64"])?;
        let client = topo.add_host("client", &["10.77.0.2/16", "fd00:77::2/64"])?;
        let sources: Vec<String> = (1..=60).map(|i| format!("10.77.1.{i}/16")).collect();
        client.add_addrs(&sources)?;
        assert_eq!(client.addrs().len(), 62);
        assert_eq!(client.ipv4(), Some([10, 77, 0, 2].into()));

        let cgroup = TestCgroup::new(&prefix, "client")?;
        cgroup_path = cgroup.path().to_owned();

        let mut be1 = BackendSpec::new("v1", "checkout-v1-a")
            .listen(addr("10.77.0.11:8080"))
            .listen(addr("[fd00:77::11]:8080"))
            .spawn(Path::new(BACKEND), Some(b1.netns()), None)?;
        let _be2 = BackendSpec::new("v2", "checkout-v2-a")
            .listen(addr("10.77.0.12:8080"))
            .listen(addr("[fd00:77::12]:8080"))
            .spawn(Path::new(BACKEND), Some(b2.netns()), None)?;

        // The client reaches both backends over the bridge, both families.
        wait_for_tcp(
            Some(client.netns()),
            addr("10.77.0.12:8080"),
            Duration::from_secs(5),
        )?;
        let ns = client.netns();
        let v4 = run_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::count(addr("10.77.0.11:8080"), 200),
        )?;
        assert_all_from(&v4, 200, "v1", "checkout-v1-a");
        assert!(v4.by_source.is_none());
        let v6 = run_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::count(addr("[fd00:77::12]:8080"), 200),
        )?;
        assert_all_from(&v6, 200, "v2", "checkout-v2-a");

        // Round-robin over 60 source addresses: every one seen twice.
        let binds = (1..=60).map(|i| [10, 77, 1, i].into());
        let by_source = run_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::count(addr("10.77.0.11:8080"), 120).binds(binds),
        )?;
        assert_all_from(&by_source, 120, "v1", "checkout-v1-a");
        let sources = by_source.by_source.as_ref().context("by_source")?;
        assert_eq!(sources.len(), 60);
        assert!(
            sources
                .values()
                .all(|pods| pods.get("checkout-v1-a") == Some(&2))
        );

        // Throughput: sequential, then 64 at a time.
        let seq = run_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::count(addr("10.77.0.11:8080"), 5000),
        )?;
        assert_all_from(&seq, 5000, "v1", "checkout-v1-a");
        let par = run_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::count(addr("[fd00:77::11]:8080"), 5000).concurrency(64),
        )?;
        assert_all_from(&par, 5000, "v1", "checkout-v1-a");
        eprintln!(
            "direct HTTP: sequential {:.0} conn/s, 64 concurrent {:.0} conn/s",
            seq.conns_per_sec(),
            par.conns_per_sec()
        );

        // Connect-only mode, and named errors: nothing listens on 9 and
        // nobody holds 10.77.0.99.
        let connect = run_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::count(addr("10.77.0.11:8080"), 1000).connect_only(),
        )?;
        assert_eq!(
            (connect.ok, connect.peer_is_target),
            (1000, 1000),
            "{connect:?}"
        );
        eprintln!("direct connect-only: {:.0} conn/s", connect.conns_per_sec());
        let refused = run_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::count(addr("10.77.0.11:9"), 5),
        )?;
        assert_eq!(refused.errors.get("ECONNREFUSED"), Some(&5), "{refused:?}");
        let absent = run_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::count(addr("10.77.0.99:8080"), 1).timeout(Duration::from_millis(300)),
        )?;
        assert_eq!(absent.failed, 1, "{absent:?}");

        // --until-file: runs until the file appears.
        let stop = std::env::temp_dir().join(format!("{prefix}-stop"));
        let _ = std::fs::remove_file(&stop);
        let running = spawn_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::until_file(addr("10.77.0.12:8080"), &stop, 30),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&stop, b"")?;
        let until = ProbeReport::wait(running, Duration::from_secs(10))?;
        std::fs::remove_file(&stop)?;
        assert!(until.ok > 10 && until.failed == 0, "{until:?}");

        // Backend: Host echo, keep-alive and --fail-first, seen with curl.
        let mut curl = Command::new("curl");
        curl.args([
            "-s",
            "-i",
            "-H",
            "Host: checkout.shop",
            "http://10.77.0.12:8080/",
            "http://10.77.0.12:8080/x",
        ]);
        let out = run_in(curl, Some(ns), Some(&cgroup), Duration::from_secs(10))?;
        assert_eq!(
            out.matches("x-canary-host: checkout.shop").count(),
            2,
            "{out}"
        );
        assert_eq!(out.matches("v2 checkout-v2-a\n").count(), 2, "{out}");
        let b3 = topo.add_host("backend3", &["10.77.0.13/16"])?;
        let _failing = BackendSpec::new("v3", "checkout-v3-a")
            .listen(addr("10.77.0.13:8080"))
            .fail_first(3, 503)
            .spawn(Path::new(BACKEND), Some(b3.netns()), None)?;
        let failing = run_probe(
            probe,
            Some(ns),
            None,
            &ProbeArgs::count(addr("10.77.0.13:8080"), 10),
        )?;
        assert_eq!(failing.errors.get("http_503"), Some(&3), "{failing:?}");
        assert_eq!(failing.ok, 7, "{failing:?}");

        // Hundreds of connections open at once: 300 in flight, each held
        // 100 ms by the backend.
        let b4 = topo.add_host("backend4", &["10.77.0.14/16"])?;
        let _slow = BackendSpec::new("v4", "checkout-v4-a")
            .listen(addr("10.77.0.14:8080"))
            .delay(Duration::from_millis(100))
            .spawn(Path::new(BACKEND), Some(b4.netns()), None)?;
        let wide = run_probe(
            probe,
            Some(ns),
            Some(&cgroup),
            &ProbeArgs::count(addr("10.77.0.14:8080"), 900).concurrency(300),
        )?;
        assert_all_from(&wide, 900, "v4", "checkout-v4-a");
        assert!(wide.elapsed_ms < 5000, "{wide:?}");

        // A namespaced thread sees the client's addresses, not ours.
        let links = in_netns(ns, || {
            std::fs::read_to_string("/proc/thread-self/net/if_inet6")
        })??;
        assert!(
            links.contains("fd000077000000000000000000000002"),
            "{links}"
        );

        // SIGTERM stops a backend cleanly.
        let status = be1.terminate(Duration::from_secs(5))?;
        assert!(status.success(), "backend exit: {status}");

        // A process that escaped its guard is still killed with the cgroup.
        let mut sh = Command::new("sh");
        sh.args(["-c", "sleep 600 >/dev/null 2>&1 & echo $!"]);
        let orphan = run_in(sh, Some(ns), Some(&cgroup), Duration::from_secs(5))?;
        let orphan: i32 = orphan.trim().parse()?;
        assert!(cgroup.procs()?.contains(&orphan));
        assert!(netns_names()?.contains(&format!("{prefix}-client")));
    }
    assert_gone(&prefix, &cgroup_path)
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn guards_clean_up_when_a_test_panics() -> Result<()> {
    require_root();
    let prefix = unique_prefix();
    let cgroup_path = std::sync::Mutex::new(PathBuf::new());
    let panicked = std::panic::catch_unwind(|| {
        let mut topo = Topology::new(&prefix).expect("topology");
        let host = topo.add_host("a", &["10.78.0.1/24"]).expect("host");
        let cgroup = TestCgroup::new(&prefix, "a").expect("cgroup");
        *cgroup_path.lock().expect("lock") = cgroup.path().to_owned();
        let _sleep = canary_tests::spawn_in(
            {
                let mut c = Command::new("sleep");
                c.arg("600");
                c
            },
            Some(host.netns()),
            Some(&cgroup),
        )
        .expect("sleep");
        panic!("deliberate panic inside the topology");
    });
    assert!(panicked.is_err());
    let path = cgroup_path.into_inner().expect("lock");
    assert_gone(&prefix, &path)
}
