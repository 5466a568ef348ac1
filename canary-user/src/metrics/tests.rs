use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::admin::protocol::Totals;
use crate::config::OwnerReference;
use crate::observe::Workload;

const CHECKOUT: &str = "checkout-service.prod.svc.cluster.local";

fn workload(workload: &str, ns: &str, app: &str, version: &str) -> Workload {
    Workload {
        workload: workload.into(),
        namespace: ns.into(),
        app: app.into(),
        version: version.into(),
    }
}

fn frontend() -> Workload {
    workload("frontend", "prod", "frontend", "v1")
}

fn checkout(version: &str) -> Workload {
    workload(
        &format!("checkout-{version}"),
        "prod",
        "checkout-service",
        version,
    )
}

fn request(version: &str, code: u16, ms: u64) -> RequestRecord {
    RequestRecord {
        source: frontend(),
        destination: checkout(version),
        destination_service: CHECKOUT.into(),
        destination_service_name: "checkout-service".into(),
        destination_service_namespace: "prod".into(),
        subset: Some(version.into()),
        protocol: "http",
        response_code: code,
        grpc_status: None,
        response_flags: "-".into(),
        duration: Duration::from_millis(ms),
        request_bytes: 300,
        response_bytes: 1200,
        mirrored: false,
        attempts: 1,
    }
}

fn tcp(version: &str, opened: u64) -> TcpSample {
    TcpSample {
        source: Workload::unknown(),
        destination: checkout(version),
        destination_service: CHECKOUT.into(),
        destination_service_name: "checkout-service".into(),
        destination_service_namespace: "prod".into(),
        subset: Some(version.into()),
        counts: TcpCounts {
            opened,
            closed: opened.saturating_sub(1),
            sent_bytes: 10 * opened,
            received_bytes: 3 * opened,
        },
    }
}

/// The value of the one sample of `name` whose labels include all of
/// `want`; panics if there is none or more than one.
fn value(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = samples(text, name)
        .into_iter()
        .filter(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{name} {want:?}: {} samples in\n{text}",
        hits.len()
    );
    hits[0]
}

/// Every sample of exactly `name`, with its labels.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            (n == name).then(|| (parse_labels(labels), value.parse().expect("sample value")))
        })
        .collect()
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_string(), value);
        rest = &after[end..];
    }
    out
}

/// promtool's naming lint wants durations in seconds; Istio's histogram
/// (and canary's mirror twin of it) are in milliseconds by name.
const EXPECTED_FINDINGS: [&str; 2] = [
    r#"istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds""#,
    r#"canary_mirror_request_duration_milliseconds use base unit "seconds" instead of "milliseconds""#,
];

/// Runs `promtool check metrics` on `text`; panics unless it parses and
/// the lint finds nothing but [`EXPECTED_FINDINGS`].
fn promtool_check(text: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run promtool ({e}): it comes with Debian's `prometheus` package, which \
             `cargo xtask setup` installs"
        ),
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = text.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("waiting for promtool");
    writer
        .join()
        .expect("writer thread")
        .expect("writing to promtool");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit 3: parsed, with lint findings; 1: does not parse.
    let parsed =
        matches!(out.status.code(), Some(0 | 3)) && !output.contains("error while linting");
    let unexpected: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !EXPECTED_FINDINGS.contains(l))
        .collect();
    assert!(
        parsed && unexpected.is_empty(),
        "promtool check metrics ({}):\n{}\non:\n{text}",
        out.status,
        unexpected.join("\n")
    );
    // promtool does not catch a series exposed twice; check that here.
    let mut seen = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        assert!(seen.insert(series), "{series} exposed twice in\n{text}");
    }
}

/// Representative traffic: both subsets, errors, gRPC, a mirror, flags,
/// TCP counters, every `canary_` series.
fn busy_metrics() -> Arc<Metrics> {
    let m = Metrics::new();
    for i in 0..20 {
        m.on_request(&request("v1", 200, 3 + i));
    }
    m.on_request(&request("v2", 200, 40));
    m.on_request(&request("v2", 503, 2));
    let mut grpc = request("v2", 200, 7);
    grpc.protocol = "grpc";
    grpc.grpc_status = Some("14".into());
    m.on_request(&grpc);
    let mut no_route = request("v1", 404, 0);
    no_route.response_flags = "NR".into();
    no_route.destination = Workload::unknown();
    no_route.subset = None;
    m.on_request(&no_route);
    let mut odd = request("v1", 200, 1);
    odd.source = workload("we\"ird\\na\nme", "prod", "unknown", "unknown");
    m.on_request(&odd);
    let mut mirror = request("v2", 500, 9);
    mirror.mirrored = true;
    m.on_request(&mirror);
    m.set_tcp(&[tcp("v1", 90), tcp("v2", 10)]);
    m.kernel_no_endpoint(CHECKOUT, 4);
    m.config_reload(true);
    m.config_reload(false);
    m.map_update(0.0012);
    m.on_event(&ShimEvent::MirrorDropped {
        destination_service: CHECKOUT.into(),
    });
    m.on_event(&ShimEvent::EndpointEjected {
        destination_service: CHECKOUT.into(),
        subset: Some("v2".into()),
        endpoint: "10.0.0.12:8080".parse().expect("literal"),
    });
    m
}

// === the exposition ===

#[test]
fn rendered_metrics_pass_promtool() {
    let text = busy_metrics().render();
    promtool_check(&text);
    // And an idle agent's, with only descriptors.
    promtool_check(&Metrics::new().render());
}

#[test]
fn families_have_exactly_istios_names() {
    let text = busy_metrics().render();
    let types: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    for (name, kind) in [
        ("istio_requests_total", "counter"),
        ("istio_request_duration_milliseconds", "histogram"),
        ("istio_request_bytes", "histogram"),
        ("istio_response_bytes", "histogram"),
        ("istio_tcp_connections_opened_total", "counter"),
        ("istio_tcp_connections_closed_total", "counter"),
        ("istio_tcp_sent_bytes_total", "counter"),
        ("istio_tcp_received_bytes_total", "counter"),
        ("canary_mirror_requests_total", "counter"),
        ("canary_mirror_request_duration_milliseconds", "histogram"),
        ("canary_config_reloads_total", "counter"),
        ("canary_config_last_reload_successful", "gauge"),
        ("canary_map_update_duration_seconds", "histogram"),
        ("canary_mirror_dropped_total", "counter"),
        ("canary_outlier_ejections_total", "counter"),
        ("canary_kernel_no_endpoint_total", "counter"),
    ] {
        assert_eq!(types.get(name), Some(&kind), "{name} in\n{text}");
    }
    assert_eq!(types.len(), 16, "{types:?}");
    assert!(!text.contains("_total_total"));
}

#[test]
fn request_series_carry_istios_labels() {
    let text = busy_metrics().render();
    let all = samples(&text, "istio_requests_total");
    let labels: Vec<&str> = all[0].0.keys().map(String::as_str).collect();
    assert_eq!(
        labels,
        [
            "connection_security_policy",
            "destination_app",
            "destination_service",
            "destination_service_name",
            "destination_service_namespace",
            "destination_version",
            "destination_workload",
            "destination_workload_namespace",
            "grpc_response_status",
            "reporter",
            "request_protocol",
            "response_code",
            "response_flags",
            "source_app",
            "source_version",
            "source_workload",
            "source_workload_namespace",
        ]
    );
    for (labels, _) in &all {
        assert_eq!(labels["reporter"], "destination");
        assert_eq!(labels["connection_security_policy"], "unknown");
    }
    let v2_ok = [
        ("destination_workload", "checkout-v2"),
        ("destination_version", "v2"),
        ("response_code", "200"),
        ("request_protocol", "http"),
    ];
    assert_eq!(value(&text, "istio_requests_total", &v2_ok), 1.0);
    assert_eq!(
        value(
            &text,
            "istio_requests_total",
            &[("destination_version", "v2"), ("response_code", "503")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "istio_requests_total",
            &[("request_protocol", "grpc"), ("grpc_response_status", "14")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "istio_requests_total",
            &[
                ("response_flags", "NR"),
                ("destination_workload", "unknown")
            ]
        ),
        1.0
    );
    // 20 records to v1 with code 200 from frontend: one series.
    assert_eq!(
        value(
            &text,
            "istio_requests_total",
            &[
                ("destination_version", "v1"),
                ("response_code", "200"),
                ("source_workload", "frontend")
            ]
        ),
        20.0
    );
    // Escaped, and read back intact.
    assert_eq!(
        value(
            &text,
            "istio_requests_total",
            &[("source_workload", "we\"ird\\na\nme")]
        ),
        1.0
    );
    assert_eq!(all.len(), 6, "{all:?}");
}

#[test]
fn histograms_use_envoys_buckets_in_milliseconds() {
    let m = Metrics::new();
    for ms in [3, 7, 40, 40, 1200] {
        m.on_request(&request("v2", 200, ms));
    }
    let text = m.render();
    let name = "istio_request_duration_milliseconds_bucket";
    let buckets = samples(&text, name);
    let les: Vec<&str> = buckets.iter().map(|(l, _)| l["le"].as_str()).collect();
    assert_eq!(
        les,
        [
            "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000",
            "10000", "30000", "60000", "300000", "600000", "1.8e+06", "3.6e+06", "+Inf"
        ]
    );
    let at = |le: &str| value(&text, name, &[("le", le)]);
    assert_eq!(at("1"), 0.0);
    assert_eq!(at("5"), 1.0);
    assert_eq!(at("10"), 2.0);
    assert_eq!(at("25"), 2.0);
    assert_eq!(at("50"), 4.0);
    assert_eq!(at("1000"), 4.0);
    assert_eq!(at("2500"), 5.0);
    assert_eq!(at("+Inf"), 5.0);
    assert_eq!(
        value(&text, "istio_request_duration_milliseconds_count", &[]),
        5.0
    );
    assert_eq!(
        value(&text, "istio_request_duration_milliseconds_sum", &[]),
        1290.0
    );
    // `le` is inclusive: exactly 1000 bytes is in the 1000 bucket.
    let mut exact = request("v1", 200, 1);
    exact.request_bytes = 1000;
    m.on_request(&exact);
    let text = m.render();
    let v1 = [("destination_version", "v1")];
    let with = |le| [v1[0], ("le", le)];
    assert_eq!(
        value(&text, "istio_request_bytes_bucket", &with("500")),
        0.0
    );
    assert_eq!(
        value(&text, "istio_request_bytes_bucket", &with("1000")),
        1.0
    );
    assert_eq!(value(&text, "istio_request_bytes_sum", &v1), 1000.0);
    assert_eq!(value(&text, "istio_response_bytes_sum", &v1), 1200.0);
}

#[test]
fn mirrored_requests_never_reach_istio_series_or_the_live_view() {
    let clock = Arc::new(ManualClock::new(Duration::from_secs(100)));
    let m = Metrics::with_clock(clock.clone());
    let mut mirror = request("v2", 500, 9);
    mirror.mirrored = true;
    for _ in 0..3 {
        m.on_request(&mirror);
    }
    clock.advance(Duration::from_secs(1));
    let text = m.render();
    assert!(samples(&text, "istio_requests_total").is_empty(), "{text}");
    assert!(samples(&text, "istio_request_duration_milliseconds_count").is_empty());
    let v2 = [("destination_version", "v2"), ("response_code", "500")];
    assert_eq!(value(&text, "canary_mirror_requests_total", &v2), 3.0);
    assert_eq!(
        value(
            &text,
            "canary_mirror_request_duration_milliseconds_count",
            &v2
        ),
        3.0
    );
    assert_eq!(m.live(CHECKOUT, Some("v2")), LiveStats::default());
}

#[test]
fn tcp_series_come_from_kernel_totals() {
    let m = Metrics::new();
    // Two endpoints of one workload add up; bytes are turned to the
    // destination's point of view.
    let client_side = Totals {
        opened: 5,
        closed: 4,
        bytes_sent: 100,
        bytes_received: 7000,
        ..Default::default()
    };
    let mut a = tcp("v1", 0);
    a.counts = TcpCounts::from(&client_side);
    let b = tcp("v1", 2);
    m.set_tcp(&[a, b, tcp("v2", 1)]);
    let text = m.render();
    let v1 = [("destination_workload", "checkout-v1")];
    assert_eq!(value(&text, "istio_tcp_connections_opened_total", &v1), 7.0);
    assert_eq!(value(&text, "istio_tcp_connections_closed_total", &v1), 5.0);
    assert_eq!(value(&text, "istio_tcp_sent_bytes_total", &v1), 7020.0);
    assert_eq!(value(&text, "istio_tcp_received_bytes_total", &v1), 106.0);
    let series = samples(&text, "istio_tcp_connections_opened_total");
    assert_eq!(series.len(), 2);
    for (labels, _) in &series {
        assert_eq!(labels["reporter"], "destination");
        assert_eq!(labels["request_protocol"], "tcp");
        assert_eq!(labels["response_flags"], "-");
        assert_eq!(labels["source_workload"], "unknown");
        assert!(!labels.contains_key("response_code"), "{labels:?}");
        assert!(!labels.contains_key("grpc_response_status"), "{labels:?}");
    }
    // A new snapshot replaces the old one: v2 is gone.
    m.set_tcp(&[tcp("v1", 9)]);
    let text = m.render();
    assert_eq!(
        samples(&text, "istio_tcp_connections_opened_total").len(),
        1
    );
    assert_eq!(value(&text, "istio_tcp_connections_opened_total", &v1), 9.0);
}

#[test]
fn canary_series_count_what_the_agent_and_shim_report() {
    let text = busy_metrics().render();
    let svc = [("destination_service", CHECKOUT)];
    assert_eq!(value(&text, "canary_kernel_no_endpoint_total", &svc), 4.0);
    assert_eq!(value(&text, "canary_mirror_dropped_total", &svc), 1.0);
    assert_eq!(
        value(
            &text,
            "canary_outlier_ejections_total",
            &[svc[0], ("destination_subset", "v2")]
        ),
        1.0
    );
    let reloads = "canary_config_reloads_total";
    assert_eq!(value(&text, reloads, &[("result", "applied")]), 1.0);
    assert_eq!(value(&text, reloads, &[("result", "rejected")]), 1.0);
    assert_eq!(
        value(&text, "canary_config_last_reload_successful", &[]),
        0.0
    );
    assert_eq!(
        value(
            &text,
            "canary_map_update_duration_seconds_bucket",
            &[("le", "0.0025")]
        ),
        1.0
    );
}

#[test]
fn the_scrape_hook_runs_before_every_render() {
    let m = Metrics::new();
    let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = reads.clone();
    m.on_scrape(move |m| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        m.set_tcp(&[tcp("v1", n * 10)]);
    });
    let v1 = [("destination_version", "v1")];
    assert_eq!(
        value(&m.render(), "istio_tcp_connections_opened_total", &v1),
        10.0
    );
    assert_eq!(
        value(&m.render(), "istio_tcp_connections_opened_total", &v1),
        20.0
    );
}

#[test]
fn records_differing_in_any_label_get_their_own_series() {
    let m = Metrics::new();
    let base = request("v1", 200, 1);
    let mut other_ns = base.clone();
    other_ns.source.namespace = "staging".into();
    let mut other_app = base.clone();
    other_app.destination.app = "checkout".into();
    let mut grpc = base.clone();
    grpc.grpc_status = Some("0".into());
    for r in [&base, &other_ns, &other_app, &grpc, &base] {
        m.on_request(r);
    }
    let text = m.render();
    let all = samples(&text, "istio_requests_total");
    assert_eq!(all.len(), 4, "{all:?}");
    assert_eq!(
        value(
            &text,
            "istio_requests_total",
            &[
                ("source_workload_namespace", "prod"),
                ("destination_app", "checkout-service"),
                ("grpc_response_status", "")
            ]
        ),
        2.0
    );
}

#[test]
fn concurrent_requests_are_all_counted() {
    let m = Metrics::new();
    std::thread::scope(|s| {
        for t in 0..4u16 {
            let m = &m;
            s.spawn(move || {
                for i in 0..1000u64 {
                    // Two codes per thread: series are created while
                    // others count.
                    m.on_request(&request("v1", 200 + (t % 2) * 300, i % 50));
                }
            });
        }
    });
    let text = m.render();
    let ok = value(&text, "istio_requests_total", &[("response_code", "200")]);
    let err = value(&text, "istio_requests_total", &[("response_code", "500")]);
    assert_eq!((ok, err), (2000.0, 2000.0));
    assert_eq!(
        value(
            &text,
            "istio_request_duration_milliseconds_count",
            &[("response_code", "500")]
        ),
        2000.0
    );
}

// === the live view ===

#[test]
fn live_stats_cover_the_last_complete_seconds() {
    let clock = Arc::new(ManualClock::new(Duration::from_millis(50_200)));
    let m = Metrics::with_clock(clock.clone());
    // Nothing recorded yet.
    assert_eq!(m.live(CHECKOUT, Some("v2")), LiveStats::default());

    // 5 s at 100 requests/s: 2% 5xx, 1% slow (400 ms), the rest 10 ms.
    for _ in 0..5 {
        for i in 0..100 {
            let (code, ms) = match i {
                0 | 1 => (503, 10),
                2 => (200, 400),
                _ => (200, 10),
            };
            m.on_request(&request("v2", code, ms));
        }
        clock.advance(Duration::from_secs(1));
    }
    // A request in the current second is not counted yet; nor is v1.
    m.on_request(&request("v2", 500, 10));
    m.on_request(&request("v1", 200, 10));

    let live = m.live(CHECKOUT, Some("v2"));
    assert_eq!(live.window_secs, 5, "{live:?}");
    assert_eq!(live.requests, 500);
    assert!((live.requests_per_sec - 100.0).abs() < 1e-9, "{live:?}");
    assert!((live.error_rate - 0.02).abs() < 1e-9, "{live:?}");
    // The 99th of 100 is a 10 ms one; the 1% at 400 ms is above it.
    let p99 = live.p99_ms.expect("p99");
    assert!((9.5..=11.0).contains(&p99), "{live:?}");

    // 2% slow: the p99 is now one of them.
    for _ in 0..100 {
        m.on_request(&request("v2", 200, 400));
    }
    clock.advance(Duration::from_secs(1));
    let p99 = m.live(CHECKOUT, Some("v2")).p99_ms.expect("p99");
    assert!((370.0..=430.0).contains(&p99), "p99 {p99}");

    // 20 quiet seconds later the window is empty again.
    clock.advance(Duration::from_secs(20));
    let live = m.live(CHECKOUT, Some("v2"));
    assert_eq!(live.window_secs, WINDOW_SECS);
    assert_eq!(live.requests, 0);
    assert_eq!(live.requests_per_sec, 0.0);
    assert_eq!(live.p99_ms, None);
}

#[test]
fn live_stats_are_per_subset() {
    let clock = Arc::new(ManualClock::new(Duration::from_secs(7)));
    let m = Metrics::with_clock(clock.clone());
    for _ in 0..30 {
        m.on_request(&request("v1", 200, 5));
    }
    for _ in 0..10 {
        m.on_request(&request("v2", 500, 5));
    }
    // Same labels as v2 but another subset name (version label shared):
    // one Prometheus series, two live rows.
    let mut canary = request("v2", 500, 5);
    canary.subset = Some("v2-canary".into());
    m.on_request(&canary);
    clock.advance(Duration::from_secs(1));
    let v1 = m.live(CHECKOUT, Some("v1"));
    let v2 = m.live(CHECKOUT, Some("v2"));
    assert_eq!((v1.requests, v1.error_rate), (30, 0.0));
    assert_eq!((v2.requests, v2.error_rate), (10, 1.0));
    assert_eq!(m.live(CHECKOUT, Some("v2-canary")).requests, 1);
    assert_eq!(m.live(CHECKOUT, None).requests, 0);
    assert_eq!(
        m.live("other.prod.svc.cluster.local", Some("v1")).requests,
        0
    );
    let text = m.render();
    assert_eq!(
        value(
            &text,
            "istio_requests_total",
            &[("destination_version", "v2")]
        ),
        11.0
    );
}

#[test]
fn connections_per_second_come_from_successive_kernel_snapshots() {
    let clock = Arc::new(ManualClock::new(Duration::from_secs(1000)));
    let m = Metrics::with_clock(clock.clone());
    m.set_tcp(&[tcp("v1", 1000), tcp("v2", 50)]);
    // One snapshot: no rate yet.
    assert_eq!(m.live(CHECKOUT, Some("v1")).connections_per_sec, None);
    // 9 per second on v1 (two endpoints' samples add up), 1 on v2.
    for s in 1..=15u64 {
        clock.advance(Duration::from_secs(1));
        let half = (1000 + 9 * s) / 2;
        m.set_tcp(&[
            tcp("v1", half),
            tcp("v1", 1000 + 9 * s - half),
            tcp("v2", 50 + s),
        ]);
    }
    let v1 = m.live(CHECKOUT, Some("v1")).connections_per_sec;
    let v2 = m.live(CHECKOUT, Some("v2")).connections_per_sec;
    assert!(v1.is_some_and(|r| (r - 9.0).abs() < 1e-9), "{v1:?}");
    assert!(v2.is_some_and(|r| (r - 1.0).abs() < 1e-9), "{v2:?}");
    // Nobody reads the kernel any more: no number rather than an old one.
    clock.advance(Duration::from_secs(30));
    assert_eq!(m.live(CHECKOUT, Some("v1")).connections_per_sec, None);
}

#[test]
fn live_stats_serialize_for_the_admin_socket() {
    let stats = LiveStats {
        window_secs: 10,
        requests: 5,
        requests_per_sec: 0.5,
        error_rate: 0.2,
        p99_ms: Some(12.5),
        connections_per_sec: None,
    };
    let json = serde_json::to_string(&stats).expect("serializes");
    let back: LiveStats = serde_json::from_str(&json).expect("parses");
    assert_eq!(back, stats);
}

// === workload names ===

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn owner(kind: &str, name: &str, controller: bool) -> OwnerReference {
    OwnerReference {
        kind: kind.into(),
        name: name.into(),
        controller,
    }
}

#[test]
fn workload_is_the_deployment_behind_a_replicaset() {
    let l = labels(&[
        ("app", "checkout-service"),
        ("version", "v2"),
        ("pod-template-hash", "7d9f8b6c5"),
    ]);
    let rs = [owner("ReplicaSet", "checkout-v2-7d9f8b6c5", true)];
    let w = workload_of("checkout-v2-7d9f8b6c5-x2x9q", "prod", &l, &rs);
    assert_eq!(w, workload("checkout-v2", "prod", "checkout-service", "v2"));

    // Without the hash label, a hash-like last segment still goes.
    let bare = labels(&[("app", "podinfo")]);
    let w = workload_of("podinfo-5b667bcbf8-abcde", "test", &bare, &rs);
    assert_eq!(w.workload, "checkout-v2".into());
    let flagger = [owner("ReplicaSet", "podinfo-primary-5b667bcbf8", true)];
    assert_eq!(
        workload_of("p", "test", &bare, &flagger).workload,
        "podinfo-primary".into()
    );
    // A word is not a hash.
    let plain = [owner("ReplicaSet", "web-frontend", true)];
    assert_eq!(
        workload_of("p", "test", &bare, &plain).workload,
        "web-frontend".into()
    );
    // Argo Rollouts.
    let l = labels(&[("rollouts-pod-template-hash", "6f4b9c8d7")]);
    let ro = [owner("ReplicaSet", "checkout-6f4b9c8d7", true)];
    assert_eq!(
        workload_of("p", "prod", &l, &ro).workload,
        "checkout".into()
    );
}

#[test]
fn workload_follows_other_owners_and_overrides() {
    let none = BTreeMap::new();
    let job = [owner("Job", "nightly-report-28930415", true)];
    assert_eq!(
        workload_of("p", "ops", &none, &job).workload,
        "nightly-report".into()
    );
    let job = [owner("Job", "migrate-db", true)];
    assert_eq!(
        workload_of("p", "ops", &none, &job).workload,
        "migrate-db".into()
    );
    let sts = [owner("StatefulSet", "redis", true)];
    assert_eq!(
        workload_of("redis-0", "db", &none, &sts).workload,
        "redis".into()
    );
    let dc = labels(&[("deploymentconfig", "legacy")]);
    let rc = [owner("ReplicationController", "legacy-3", true)];
    assert_eq!(workload_of("p", "ns", &dc, &rc).workload, "legacy".into());
    // The controller wins over other owners; without one, an only owner
    // counts, several do not.
    let owners = [
        owner("ConfigMap", "x", false),
        owner("ReplicaSet", "api-7c5ddbdf54", true),
    ];
    assert_eq!(
        workload_of("p", "ns", &none, &owners).workload,
        "api".into()
    );
    let one = [owner("ReplicaSet", "api-7c5ddbdf54", false)];
    assert_eq!(workload_of("p", "ns", &none, &one).workload, "api".into());
    let two = [owner("A", "a", false), owner("B", "b", false)];
    assert_eq!(workload_of("p", "ns", &none, &two).workload, "p".into());
    // Istio's explicit override beats everything.
    let l = labels(&[("service.istio.io/workload-name", "named")]);
    assert_eq!(workload_of("p", "ns", &l, &owners).workload, "named".into());
}

#[test]
fn a_pod_without_owner_is_named_by_app_and_version() {
    let l = labels(&[("app", "checkout-service"), ("version", "v2")]);
    assert_eq!(
        workload_of("checkout-v2-a", "prod", &l, &[]),
        workload("checkout-service-v2", "prod", "checkout-service", "v2")
    );
    // Flagger's convention: app=podinfo-primary, no version label.
    let l = labels(&[("app", "podinfo-primary")]);
    assert_eq!(
        workload_of("podinfo-primary-a", "test", &l, &[]).workload,
        "podinfo-primary".into()
    );
    // Already suffixed: not twice.
    let l = labels(&[("app", "reviews-v2"), ("version", "v2")]);
    assert_eq!(
        workload_of("r", "ns", &l, &[]).workload,
        "reviews-v2".into()
    );
    // Kubernetes' recommended labels.
    let l = labels(&[
        ("app.kubernetes.io/name", "cart"),
        ("app.kubernetes.io/version", "1.4"),
    ]);
    let w = workload_of("cart-x", "shop", &l, &[]);
    assert_eq!(w, workload("cart-1.4", "shop", "cart", "1.4"));
    // Nothing to go on: the pod's name, and unknown labels.
    assert_eq!(
        workload_of("lonely", "", &BTreeMap::new(), &[]),
        workload("lonely", "unknown", "unknown", "unknown")
    );
}

#[test]
fn owner_references_load_from_pod_yaml() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata:
  name: checkout-v2-7d9f8b6c5-x2x9q
  namespace: prod
  labels: {app: checkout-service, version: v2, pod-template-hash: 7d9f8b6c5}
  ownerReferences:
  - apiVersion: apps/v1
    kind: ReplicaSet
    name: checkout-v2-7d9f8b6c5
    uid: 0f7c1c0e-0000-4000-8000-000000000001
    controller: true
    blockOwnerDeletion: true
status:
  phase: Running
  podIP: 10.0.0.12
---
apiVersion: v1
kind: Pod
metadata:
  name: checkout-v1-a
  namespace: prod
  labels: {app: checkout-service, version: v1}
status:
  phase: Running
  podIP: 10.0.0.11
"#;
    let cfg = crate::config::load_str("pods.yaml", yaml).expect("loads");
    let pod = |name: &str| {
        cfg.pods
            .iter()
            .find(|p| p.meta.name == name)
            .expect("pod loaded")
    };
    let v2 = pod("checkout-v2-7d9f8b6c5-x2x9q");
    assert_eq!(
        v2.owners,
        [owner("ReplicaSet", "checkout-v2-7d9f8b6c5", true)]
    );
    assert_eq!(workload_of_pod(v2).workload, "checkout-v2".into());
    let v1 = pod("checkout-v1-a");
    assert!(v1.owners.is_empty());
    assert_eq!(workload_of_pod(v1).workload, "checkout-service-v1".into());
    // Through a subset: its version label, else its name.
    let subset = labels(&[("version", "v2"), ("track", "canary")]);
    assert_eq!(
        destination_workload(v2, Some(("canary", &subset))).version,
        "v2".into()
    );
    let unlabeled = BTreeMap::new();
    assert_eq!(
        destination_workload(v1, Some(("stable", &unlabeled))).version,
        "stable".into()
    );
    assert_eq!(destination_workload(v1, None).version, "v1".into());
}

// === the HTTP endpoint ===

async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("writes");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("reads");
    let raw = String::from_utf8(raw).expect("utf-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, head.to_string(), body.to_string())
}

#[tokio::test]
async fn server_answers_metrics_health_and_readiness() {
    let metrics = busy_metrics();
    let ready_now = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready_now.clone();
    let ready: Readiness = Arc::new(move || {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err("programs not attached yet".into())
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve_listener(listener, metrics.clone(), ready));

    let (status, head, body) = get(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert_eq!(
        value(&body, "istio_requests_total", &[("response_code", "503")]),
        1.0
    );
    promtool_check(&body);

    assert_eq!(get(addr, "GET", "/healthz").await.0, 200);
    let (status, _, body) = get(addr, "GET", "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: programs not attached yet\n")
    );
    ready_now.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(addr, "GET", "/readyz").await.0, 200);
    let (status, head, body) = get(addr, "HEAD", "/metrics").await;
    assert_eq!((status, body.as_str()), (200, ""), "{head}");
    assert_eq!(get(addr, "GET", "/nope").await.0, 404);
    let (status, head, _) = get(addr, "POST", "/metrics").await;
    assert_eq!(status, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    server.abort();
}

#[tokio::test]
async fn serve_reports_a_taken_address() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = taken.local_addr().expect("addr");
    let err = serve(addr, Metrics::new(), Arc::new(|| Ok(())))
        .await
        .expect_err("address in use");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
