//! Helpers shared by the end-to-end test files: example configs, probes
//! from the client, and the statistical checks a user would make.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::{Agent, destinations};
use crate::bin_path;
use crate::checkout::Checkout;
use crate::probe::{ProbeArgs, ProbeReport, run_probe};

pub const HOST: &str = "checkout-service.prod.svc.cluster.local";

/// `deploy/examples/<name>`: the YAML a user would copy.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

/// A copy of an example directory that a test may edit; removed on drop.
pub struct ConfigCopy(pub PathBuf);

impl ConfigCopy {
    pub fn of(name: &str, prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("canary-{prefix}-config"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for entry in std::fs::read_dir(example(name)).expect("example") {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
        }
        Self(dir)
    }

    /// Replaces `from` by `to` in one file (panics if `from` is absent, so
    /// a test can never silently edit nothing).
    pub fn edit(&self, file: &str, from: &str, to: &str) {
        let path = self.0.join(file);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.contains(from),
            "{file} does not contain {from:?}:\n{text}"
        );
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write");
    }
}

impl Drop for ConfigCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn start(prefix: &str) -> Checkout {
    Checkout::start(prefix, &bin_path("canary-backend").expect("backend bin")).expect("topology")
}

pub fn probe(world: &Checkout, args: ProbeArgs) -> ProbeReport {
    let bin = bin_path("canary-probe").expect("probe bin");
    run_probe(&bin, Some(world.client.netns()), Some(&world.cgroup), &args).expect("probe run")
}

/// Every connection connected, got an answer, and saw the VIP as its peer.
pub fn assert_clean(r: &ProbeReport, n: u64) {
    assert_eq!(r.attempted, n, "{r:?}");
    assert_eq!(r.failed, 0, "failed connections: {:?}", r.errors);
    assert_eq!(r.ok, n, "{r:?}");
    assert_eq!(
        r.peer_is_target, n,
        "getpeername() must show the VIP: {r:?}"
    );
    assert_eq!(r.peer_mismatch, 0);
}

/// The share of `version` is within 4 binomial standard deviations of `p`.
pub fn assert_share(r: &ProbeReport, version: &str, p: f64) {
    let n = r.ok as f64;
    let got = *r.by_version.get(version).unwrap_or(&0) as f64;
    let sigma = (n * p * (1.0 - p)).sqrt();
    assert!(
        (got - n * p).abs() <= 4.0 * sigma,
        "{version}: {got} of {n} connections, expected {:.0} ± {:.0} (4σ): {:?}",
        n * p,
        4.0 * sigma,
        r.by_version
    );
}

pub fn weights_of(status: &Value) -> Vec<(String, u64)> {
    destinations(status, HOST)
        .iter()
        .map(|d| {
            (
                d["subset"].as_str().unwrap_or("").to_string(),
                d["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

pub fn pair(a: &str, wa: u64, b: &str, wb: u64) -> Vec<(String, u64)> {
    vec![(a.into(), wa), (b.into(), wb)]
}

/// Polls `canary status --json` until `done` holds (or 10 s pass).
pub fn wait_status(agent: &Agent, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = agent.status().expect("status");
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client that keeps connecting to `target` from the world's client
/// until told to stop: for "zero failed connections while X happens".
pub struct BackgroundProbe {
    child: Option<crate::ChildGuard>,
    stop: PathBuf,
}

impl BackgroundProbe {
    pub fn start(world: &Checkout, prefix: &str, target: std::net::SocketAddr) -> Self {
        let stop = std::env::temp_dir().join(format!("canary-{prefix}-stop"));
        let bin = bin_path("canary-probe").expect("probe bin");
        let child = crate::probe::spawn_probe(
            &bin,
            Some(world.client.netns()),
            Some(&world.cgroup),
            &ProbeArgs::until_file(target, &stop, 120),
        )
        .expect("background probe");
        // Let it get going before the change under test.
        std::thread::sleep(Duration::from_millis(300));
        Self {
            child: Some(child),
            stop,
        }
    }

    /// Stops the client and checks that it ran and nothing failed.
    pub fn finish_without_failures(mut self, during: &str) -> ProbeReport {
        std::fs::write(&self.stop, b"").expect("stop file");
        let child = self.child.take().expect("running");
        let report = ProbeReport::wait(child, Duration::from_secs(30)).expect("background report");
        assert!(
            report.ok > 100,
            "the background client barely ran: {report:?}"
        );
        assert_eq!(
            report.failed, 0,
            "connections failed {during}: {:?}",
            report.errors
        );
        assert_eq!(report.peer_mismatch, 0);
        report
    }
}

impl Drop for BackgroundProbe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.stop);
    }
}
