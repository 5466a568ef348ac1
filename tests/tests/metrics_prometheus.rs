//! Istio-standard metrics, judged by a real Prometheus: the seed article's
//! queries and Flagger's built-in Istio checks, unchanged (only their
//! template variables filled in), against a running agent while the test
//! drives traffic, and answers checked against what the test sent.
//!
//! Privileged: run with `cargo xtask test` (as root).

use std::time::Duration;

use canary_tests::agent::Agent;
use canary_tests::checkout::{Checkout, VIP4};
use canary_tests::e2e::*;
use canary_tests::httpclient::{HttpArgs, run_http};
use canary_tests::probe::ProbeArgs;
use canary_tests::prometheus::{Prometheus, Sample, promtool_check};
use canary_tests::{bin_path, require_root, unique_prefix};

const SVC: &str = "checkout-service.prod.svc.cluster.local";

fn value(samples: &[Sample]) -> f64 {
    samples.iter().map(|(_, v)| *v).sum()
}

fn query(prom: &Prometheus, q: &str) -> f64 {
    value(&prom.query(q).unwrap_or_else(|e| panic!("{q}: {e:#}")))
}

/// `/metrics` as Prometheus scrapes it.
fn scrape(agent: &Agent) -> String {
    let mut s = std::net::TcpStream::connect(agent.metrics_addr).expect("metrics port");
    use std::io::{Read, Write};
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn seed_and_flagger_queries_see_the_v2_error_rate_and_latency_that_were_sent() {
    require_root();
    let prefix = unique_prefix();
    // v2 answers after 120 ms and fails every 5th request with 503: the
    // queries must report a 20% error rate and a p99 in the 100–250 ms
    // bucket of Envoy's boundaries.
    let world = Checkout::start_with(
        &prefix,
        &bin_path("canary-backend").expect("backend"),
        |pod, s| {
            if pod.contains("v2") {
                s.delay(Duration::from_millis(120)).fail_every(5, 503)
            } else {
                s
            }
        },
    )
    .expect("topology");
    let agent = Agent::start(&prefix, &example("composite-routing"), &world.cgroup).expect("agent");
    let prom = Prometheus::start(agent.metrics_addr).expect("prometheus");
    prom.wait_scraped(Duration::from_secs(20)).expect("scraped");

    let bin = bin_path("canary-http").expect("canary-http");
    let run = |args: HttpArgs| {
        run_http(
            &bin,
            Some(world.client.netns()),
            Some(&world.cgroup),
            &args,
            Duration::from_secs(120),
        )
        .expect("traffic")
    };
    let canary = run(HttpArgs::new(VIP4, 20, 25)
        .header("x-canary-user: true")
        .concurrency(8));
    let public = run(HttpArgs::new(VIP4, 20, 50).concurrency(8));
    let v2_sent = canary.requests + public.version("v2") + public.status(503);
    let v2_failed = canary.status(503) + public.status(503);
    assert_eq!(canary.requests, 500);
    assert!(v2_failed > 0 && v2_sent >= 500, "{canary:?}");

    // Wait until Prometheus has every request in its last scrape.
    let total = format!("sum(istio_requests_total{{destination_service=\"{SVC}\"}})");
    prom.wait_for(&total, Duration::from_secs(30), |s| value(s) >= 1500.0)
        .expect("all requests scraped");
    std::thread::sleep(Duration::from_secs(3));

    // The seed article's queries, verbatim.
    let errors = query(
        &prom,
        r#"sum(rate(istio_requests_total{destination_service="checkout-service.prod.svc.cluster.local", destination_version="v2", response_code=~"5.."}[1m]))"#,
    );
    let all_v2 = query(
        &prom,
        r#"sum(rate(istio_requests_total{destination_service="checkout-service.prod.svc.cluster.local", destination_version="v2"}[1m]))"#,
    );
    let sent_rate = v2_failed as f64 / v2_sent as f64;
    assert!(
        errors > 0.0,
        "the seed's error-rate query found no v2 errors"
    );
    assert!(
        (errors / all_v2 - sent_rate).abs() < 0.02,
        "v2 error share from Prometheus {:.3}, sent {sent_rate:.3}",
        errors / all_v2
    );
    let p99 = query(
        &prom,
        r#"histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{destination_service="checkout-service.prod.svc.cluster.local", destination_version="v2"}[5m])) by (le))"#,
    );
    assert!(
        (100.0..=250.0).contains(&p99),
        "v2 p99 {p99} ms is not in the 100–250 ms bucket"
    );

    // Flagger's built-in Istio checks (pkg/metrics/observers/istio.go) with
    // namespace=prod, target=checkout-service-v2 (the v2 workload), interval=1m.
    let success = query(
        &prom,
        r#"sum(rate(istio_requests_total{reporter="destination", destination_workload_namespace="prod", destination_workload=~"checkout-service-v2", response_code!~"5.*"}[1m])) / sum(rate(istio_requests_total{reporter="destination", destination_workload_namespace="prod", destination_workload=~"checkout-service-v2"}[1m])) * 100"#,
    );
    assert!(
        (success - 100.0 * (1.0 - sent_rate)).abs() < 2.0,
        "Flagger success rate {success:.1}%, sent {:.1}%",
        100.0 * (1.0 - sent_rate)
    );
    let duration = query(
        &prom,
        r#"histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter="destination", destination_workload_namespace="prod", destination_workload=~"checkout-service-v2"}[1m])) by (le))"#,
    );
    assert!(
        (100.0..=250.0).contains(&duration),
        "Flagger request-duration {duration} ms"
    );
    // v1 is healthy and fast.
    let v1_errors = query(
        &prom,
        &format!(
            "sum(istio_requests_total{{destination_service=\"{SVC}\", destination_version=\"v1\", response_code=~\"5..\"}})"
        ),
    );
    assert_eq!(v1_errors, 0.0);

    promtool_check(&scrape(&agent)).expect("promtool check metrics");
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn kernel_tcp_series_equal_the_connections_opened_per_subset() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    let agent = Agent::start(&prefix, &example("checkout"), &world.cgroup).expect("agent");
    let prom = Prometheus::start(agent.metrics_addr).expect("prometheus");
    let made = probe(
        &world,
        ProbeArgs::count(canary_tests::checkout::vip4(), 800),
    );
    assert_eq!(made.ok, 800);
    for version in ["v1", "v2"] {
        let sent = made.by_version.get(version).copied().unwrap_or(0) as f64;
        let q = format!(
            "sum(istio_tcp_connections_opened_total{{reporter=\"destination\", destination_service=\"{SVC}\", destination_version=\"{version}\"}})"
        );
        prom.wait_for(&q, Duration::from_secs(30), |s| value(s) == sent)
            .unwrap_or_else(|e| panic!("{version}: {e:#}"));
        let closed = q.replace("opened", "closed");
        prom.wait_for(&closed, Duration::from_secs(30), |s| value(s) == sent)
            .unwrap_or_else(|e| panic!("{version} closed: {e:#}"));
    }
    let received = query(
        &prom,
        &format!("sum(istio_tcp_received_bytes_total{{destination_service=\"{SVC}\"}})"),
    );
    let sent = query(
        &prom,
        &format!("sum(istio_tcp_sent_bytes_total{{destination_service=\"{SVC}\"}})"),
    );
    assert!(
        received > 800.0 * 40.0 && sent > 800.0 * 40.0,
        "bytes: received {received}, sent {sent}"
    );
    promtool_check(&scrape(&agent)).expect("promtool check metrics");
}
