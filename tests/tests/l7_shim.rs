//! End-to-end tests of the L7 path: the kernel redirects connections to a
//! service whose routes need HTTP to the shim on the client's own loopback;
//! the shim routes each request as Istio would. Real agent, real kernel
//! redirect, real backends, real clients (`canary-http`, curl), and the
//! seed article's patterns as written in `deploy/examples/`.
//!
//! Privileged: run with `cargo xtask test` (as root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use canary_tests::agent::Agent;
use canary_tests::backend::BackendSpec;
use canary_tests::checkout::{Checkout, VIP4, VIP6};
use canary_tests::e2e::*;
use canary_tests::httpclient::{HttpArgs, HttpReport, run_http};
use canary_tests::{bin_path, require_root, run_in, unique_prefix};

fn world_with(prefix: &str, customize: impl Fn(&str, BackendSpec) -> BackendSpec) -> Checkout {
    Checkout::start_with(
        prefix,
        &bin_path("canary-backend").expect("backend bin"),
        customize,
    )
    .expect("topology")
}

fn http(world: &Checkout, args: HttpArgs) -> HttpReport {
    let bin = bin_path("canary-http").expect("canary-http bin");
    run_http(
        &bin,
        Some(world.client.netns()),
        Some(&world.cgroup),
        &args,
        Duration::from_secs(120),
    )
    .expect("canary-http")
}

/// Within 4 binomial σ of `p` over `n` trials.
fn assert_binomial(got: u64, n: u64, p: f64, what: &str) {
    let (n, got) = (n as f64, got as f64);
    let sigma = (n * p * (1.0 - p)).sqrt();
    assert!(
        (got - n * p).abs() <= 4.0 * sigma,
        "{what}: {got} of {n}, expected {:.0} ± {:.0} (4σ)",
        n * p,
        4.0 * sigma
    );
}

/// Requests a backend logged (`--log`), as JSON values.
fn logged(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn log_path(prefix: &str, pod: &str) -> PathBuf {
    std::env::temp_dir().join(format!("canary-{prefix}-{pod}.log"))
}

/// Removes the backend logs of a test.
struct Logs(Vec<PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn path_of(agent: &Agent) -> String {
    let status = agent.status().expect("status");
    status["services"][0]["path"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn composite_routing_header_to_v2_and_95_5_for_the_rest() {
    require_root();
    let prefix = unique_prefix();
    let world = world_with(&prefix, |_, s| s);
    let agent = Agent::start(&prefix, &example("composite-routing"), &world.cgroup).expect("agent");
    assert_eq!(path_of(&agent), "shim");

    let canary_users = http(
        &world,
        HttpArgs::new(VIP4, 20, 10).header("x-canary-user: true"),
    );
    assert_eq!(canary_users.ok, 200, "{canary_users:?}");
    assert_eq!(
        canary_users.version("v2"),
        200,
        "x-canary-user: true must always reach v2: {:?}",
        canary_users.by_version
    );

    // Everyone else: 95/5 per request, on kept-alive connections.
    let public = http(&world, HttpArgs::new(VIP4, 100, 25));
    assert_eq!(public.ok, 2500, "{public:?}");
    assert_binomial(
        public.version("v2"),
        2500,
        0.05,
        "v2 share without the header",
    );
    // A header with another value is "the rest" too.
    let other = http(
        &world,
        HttpArgs::new(VIP6, 10, 10).header("x-canary-user: false"),
    );
    assert_eq!(other.ok, 100);
    assert!(other.version("v1") > 80, "{:?}", other.by_version);

    // curl, as a user would check it.
    let mut curl = Command::new("curl");
    curl.args([
        "-s",
        "-H",
        "x-canary-user: true",
        &format!("http://{VIP4}/"),
    ]);
    let out = run_in(
        curl,
        Some(world.client.netns()),
        Some(&world.cgroup),
        Duration::from_secs(10),
    )
    .expect("curl");
    assert!(out.starts_with("v2 "), "curl got {out:?}");
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn mirroring_copies_10_percent_with_shadow_host_and_never_slows_the_primary() {
    require_root();
    let prefix = unique_prefix();
    let v2_log = log_path(&prefix, "v2");
    let _logs = Logs(vec![v2_log.clone()]);
    let log = v2_log.clone();
    let world = world_with(
        &prefix,
        move |pod, s| if pod.contains("v2") { s.log(&log) } else { s },
    );
    let agent = Agent::start(&prefix, &example("mirroring"), &world.cgroup).expect("agent");
    assert_eq!(path_of(&agent), "shim");

    let run = http(&world, HttpArgs::new(VIP4, 50, 40));
    assert_eq!(run.ok, 2000, "{run:?}");
    assert_eq!(
        run.version("v1"),
        2000,
        "all answers come from v1: {:?}",
        run.by_version
    );
    // Mirrors are fire-and-forget: wait for the stragglers to land.
    std::thread::sleep(Duration::from_millis(500));
    let copies = logged(&v2_log);
    assert_binomial(copies.len() as u64, 2000, 0.10, "mirrored copies at v2");
    for c in &copies {
        // Envoy's rule: `host:port` becomes `host-shadow:port`.
        let host = c["host"].as_str().unwrap_or("");
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
        assert!(
            name.ends_with("-shadow"),
            "mirror host {host:?} lacks the -shadow suffix"
        );
    }
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn a_hanging_mirror_target_does_not_delay_or_fail_the_primary() {
    require_root();
    let prefix = unique_prefix();
    // v2 (the mirror target) answers only after 5 s.
    let world = world_with(&prefix, |pod, s| {
        if pod.contains("v2") {
            s.delay(Duration::from_secs(5))
        } else {
            s
        }
    });
    // Baseline: the same route through the shim with mirroring off
    // (mirrorPercentage 0), then on, against the hanging target.
    let config = ConfigCopy::of("mirroring", &prefix);
    config.edit("virtualservice.yaml", "value: 10.0", "value: 0.0");
    let agent = Agent::start(&prefix, &config.0, &world.cgroup).expect("agent");
    let unmirrored = http(&world, HttpArgs::new(VIP4, 20, 25));
    assert_eq!(unmirrored.ok, 500, "{unmirrored:?}");

    config.edit("virtualservice.yaml", "value: 0.0", "value: 10.0");
    wait_status(&agent, "the mirror to be configured", |s| {
        s["generation"].as_u64() >= Some(2)
    });
    let mirrored = http(&world, HttpArgs::new(VIP4, 20, 25));
    assert_eq!(
        mirrored.ok, 500,
        "no primary request may fail: {mirrored:?}"
    );
    // Ratios, not absolute times. A primary that waited for its mirror
    // would put the 5 s delay into the p99 (10% of requests are mirrored),
    // a thousand times the un-mirrored p99; scheduling noise on a busy
    // machine stays well under ten times (floored at 10 ms).
    let median_ratio = mirrored.p50_ms / unmirrored.p50_ms.max(0.5);
    let p99_ratio = mirrored.p99_ms / unmirrored.p99_ms.max(10.0);
    assert!(
        median_ratio < 5.0 && p99_ratio < 10.0,
        "with a hanging mirror: p50 {:.2} ms, p99 {:.2} ms; without: p50 {:.2} ms, p99 {:.2} ms",
        mirrored.p50_ms,
        mirrored.p99_ms,
        unmirrored.p50_ms,
        unmirrored.p99_ms
    );
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn session_id_sessions_never_change_version() {
    require_root();
    let prefix = unique_prefix();
    let world = world_with(&prefix, |_, s| s);
    let _agent = Agent::start(&prefix, &example("session-affinity"), &world.cgroup).expect("agent");
    // 200 sessions × 20 requests, spread over 400 connections.
    let r = http(
        &world,
        HttpArgs::new(VIP4, 400, 10)
            .header("session-id: user-{s}")
            .sessions(200)
            .concurrency(8),
    );
    assert_eq!(r.ok, 4000, "{r:?}");
    assert_eq!(r.by_session.len(), 200);
    for (session, versions) in &r.by_session {
        assert_eq!(versions.len(), 1, "session {session} saw {versions:?}");
        assert_eq!(versions.values().sum::<u64>(), 20);
    }
    // 50/50 by session, not everyone on one side.
    let on_v2 = r
        .by_session
        .values()
        .filter(|v| v.contains_key("v2"))
        .count() as u64;
    assert_binomial(on_v2, 200, 0.5, "sessions on v2");
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn per_route_policy_beta_testers_time_out_on_v2_and_default_users_are_retried_on_v1() {
    require_root();
    let prefix = unique_prefix();
    let (v2_log, v1a_log, v1b_log) = (
        log_path(&prefix, "v2"),
        log_path(&prefix, "v1a"),
        log_path(&prefix, "v1b"),
    );
    let _logs = Logs(vec![v2_log.clone(), v1a_log.clone(), v1b_log.clone()]);
    let (l2, la, lb) = (v2_log.clone(), v1a_log.clone(), v1b_log.clone());
    let world = world_with(&prefix, move |pod, s| match pod {
        // The canary is slow: 3 s per answer.
        "checkout-v2-a" => s.delay(Duration::from_secs(3)).log(&l2),
        // Each stable pod fails its first request with 503.
        "checkout-v1-a" => s.fail_first(1, 503).log(&la),
        _ => s.fail_first(1, 503).log(&lb),
    });
    let _agent = Agent::start(&prefix, &example("per-route-policy"), &world.cgroup).expect("agent");

    let beta = http(
        &world,
        HttpArgs::new(VIP4, 1, 1).header("user-group: beta-testers"),
    );
    // v2 would answer 200 after 3 s: a 504 can only come from the route's
    // 2 s timeout.
    assert_eq!(
        beta.status(504),
        1,
        "beta tester must get 504 from the 2 s timeout: {beta:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        logged(&v2_log).len(),
        2,
        "v2 must see exactly 2 attempts (1 + 1 retry)"
    );

    let user = http(&world, HttpArgs::new(VIP4, 1, 1));
    assert_eq!(
        user.status(200),
        1,
        "default user must get 200 after retries: {user:?}"
    );
    assert_eq!(user.version("v1"), 1);
    let attempts = logged(&v1a_log).len() + logged(&v1b_log).len();
    assert_eq!(attempts, 3, "two 503s then a 200: three attempts on v1");
}
