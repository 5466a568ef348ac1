//! The Prometheus kit on its own, before any agent: a real Prometheus
//! scrapes a static target every second, answers PromQL about it through
//! its HTTP API, promtool tells good text from bad, and nothing is left
//! behind.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use canary_tests::prometheus::{
    EXPECTED_FINDINGS, Prometheus, StaticServer, promtool_check, promtool_findings,
};
use canary_tests::require_root;

/// Istio-shaped series: 50 requests to `podinfo` (8 of them 5xx) and a
/// latency histogram whose 75th percentile interpolates to 19.375 ms.
const METRICS: &str = r#"# HELP istio_requests_total Requests served.
# TYPE istio_requests_total counter
istio_requests_total{reporter="destination",destination_workload="podinfo",destination_workload_namespace="test",response_code="200"} 42
istio_requests_total{reporter="destination",destination_workload="podinfo",destination_workload_namespace="test",response_code="503"} 8
istio_requests_total{reporter="source",destination_workload="podinfo",destination_workload_namespace="test",response_code="200"} 1000
# HELP istio_request_duration_milliseconds Request duration.
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{reporter="destination",destination_workload="podinfo",le="10"} 50
istio_request_duration_milliseconds_bucket{reporter="destination",destination_workload="podinfo",le="25"} 90
istio_request_duration_milliseconds_bucket{reporter="destination",destination_workload="podinfo",le="100"} 99
istio_request_duration_milliseconds_bucket{reporter="destination",destination_workload="podinfo",le="+Inf"} 100
istio_request_duration_milliseconds_sum{reporter="destination",destination_workload="podinfo"} 2000
istio_request_duration_milliseconds_count{reporter="destination",destination_workload="podinfo"} 100
"#;

fn single(samples: &[canary_tests::prometheus::Sample]) -> f64 {
    assert_eq!(samples.len(), 1, "{samples:?}");
    samples[0].1
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn prometheus_scrapes_a_static_target_and_answers_promql() -> Result<()> {
    require_root();
    promtool_check(METRICS)?;
    // Istio's millisecond histogram is the one naming finding allowed.
    assert_eq!(promtool_findings(METRICS)?, [EXPECTED_FINDINGS[0]]);
    // The check has teeth: a counter without `_total`, and broken syntax.
    let lint = promtool_check("# HELP x_requests R.\n# TYPE x_requests counter\nx_requests 1\n");
    assert!(lint.is_err(), "{lint:?}");
    assert!(promtool_check("istio_requests_total{ 1\n").is_err());

    let server = StaticServer::start(METRICS)?;
    let dir: PathBuf;
    let pid: u32;
    {
        let prom = Prometheus::start(server.addr())?;
        dir = prom.dir().to_owned();
        pid = prom.pid();
        assert!(dir.join("prometheus.yml").is_file());
        prom.wait_scraped(Duration::from_secs(30))?;

        let total = prom.wait_for(
            r#"sum(istio_requests_total{reporter="destination", destination_workload_namespace="test", destination_workload=~"podinfo"})"#,
            Duration::from_secs(20),
            |s| !s.is_empty(),
        )?;
        assert_eq!(single(&total), 50.0);
        let errors = prom
            .query(r#"sum(istio_requests_total{reporter="destination", response_code=~"5.*"})"#)?;
        assert_eq!(single(&errors), 8.0);
        let p75 = prom.query(
            r#"histogram_quantile(0.75, sum(istio_request_duration_milliseconds_bucket{reporter="destination", destination_workload=~"podinfo"}) by (le))"#,
        )?;
        assert!((single(&p75) - 19.375).abs() < 1e-9, "{p75:?}");
        // A scalar answer, and PromQL errors come back as errors.
        assert_eq!(single(&prom.query("scalar(vector(2.5))")?), 2.5);
        assert!(prom.query("sum(").is_err());

        // It keeps scraping, once a second.
        let before = server.requests();
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            server.requests() >= before + 2,
            "{} → {}",
            before,
            server.requests()
        );
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !PathBuf::from(format!("/proc/{pid}")).exists(),
        "prometheus ({pid}) still running"
    );
    Ok(())
}
