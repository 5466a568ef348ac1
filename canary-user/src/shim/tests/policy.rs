//! Timeouts, retries and outlier detection: per route as in Istio, per
//! destination through canary's annotation, and ejection of a failing
//! endpoint.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_policy_timeouts_and_retries() {
    let net = 6;
    let failures = Arc::new(AtomicUsize::new(0));
    let f = failures.clone();
    let v1 = handler(move |_| {
        let n = f.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                text(503, "busy")
            } else {
                text(200, "v1")
            }
        }
    });
    let v2 = handler(|_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        text(200, "v2")
    });
    let [a, b, c] = pods(net, Some(v1), Some(v2)).await;
    let w = World::new(
        load(&localize(&examples("per-route-policy"), net)),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut conn = w.h1().await;

    // Beta testers: v2 sleeps 3 s; per-try 1 s, one retry, 2 s overall.
    let t = Instant::now();
    let r = conn
        .get("/checkout", &[("user-group", "beta-testers")])
        .await;
    let took = t.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(2900),
        "{took:?}"
    );
    assert_eq!(c.hits(), 2, "exactly two attempts");
    let rec = w.recorder.records().pop().expect("record");
    assert_eq!(
        (rec.response_code, &*rec.response_flags, rec.attempts),
        (504, "UT", 2)
    );

    // Everyone else: v1 answers 503 twice, the third try succeeds.
    let r = conn.get("/checkout", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(a.hits() + b.hits(), 3);
    let rec = w.recorder.records().pop().expect("record");
    assert_eq!(
        (rec.response_code, rec.attempts, &*rec.response_flags),
        (200, 3, "-")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_and_dead_endpoints() {
    let net = 7;
    let v1 = handler(|_| async { text(503, "down") });
    // Only v1-a runs; v1-b and v2-a are dead addresses (connect fails).
    let a = backend(pod(net, 11), "v1-a", Some(v1)).await;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - match: [{headers: {x-dead: {exact: "1"}}}]
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}}]
  - route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}}]
    retries: {attempts: 2, retryOn: "connect-failure,503"}
"#;
    let w = World::new(
        with_vs("composite-routing", vs, net),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut conn = w.h1().await;
    // Every attempt fails (503 from v1-a, connect failure at v1-b): 503
    // with the retry limit flag.
    let r = conn.get("/", &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let rec = w.recorder.records().pop().expect("record");
    assert_eq!(rec.attempts, 3);
    assert!(rec.response_flags.contains("URX"), "{}", rec.response_flags);
    assert!(a.hits() >= 1);
    // The default policy retries connect failures twice, then UF.
    let r = conn.get("/", &[("x-dead", "1")]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let rec = w.recorder.records().pop().expect("record");
    assert_eq!(rec.attempts, 3);
    assert!(rec.response_flags.contains("UF"), "{}", rec.response_flags);
}

const ANNOTATED: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: checkout-service-vs
  namespace: prod
  annotations:
    canary.io/destination-policy: |
      - route: public-traffic-split
        subset: v2
        timeout: 500ms
        retries: {attempts: 0}
      - route: public-traffic-split
        subset: v1
        timeout: 10s
        retries: {attempts: 3, retryOn: 5xx}
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - name: public-traffic-split
    route:
    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}
      weight: 50
    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}
      weight: 50
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_destination_timeout_and_retries_from_the_annotation() {
    let net = 14;
    // v1-a always fails (retried on v1-b), v2 is slow (cut at 500 ms).
    let v1a = handler(|_| async { text(500, "oops") });
    let v2 = handler(|_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        text(200, "v2")
    });
    let a = backend(pod(net, 11), "v1-a", Some(v1a)).await;
    let _b = backend(pod(net, 12), "v1-b", None).await;
    let c = backend(pod(net, 21), "v2-a", Some(v2)).await;
    let w = World::new(
        with_vs("composite-routing", ANNOTATED, net),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut conn = w.h1().await;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                let r = conn.get("/", &[]).await;
                out.push((r.status, t.elapsed()));
            }
            out
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.expect("task"));
    }
    let records = w.recorder.records();
    let v2: Vec<_> = records
        .iter()
        .filter(|r| r.subset.as_deref() == Some("v2"))
        .collect();
    let v1: Vec<_> = records
        .iter()
        .filter(|r| r.subset.as_deref() == Some("v1"))
        .collect();
    assert!(!v1.is_empty() && !v2.is_empty(), "both destinations used");
    assert!(
        v2.iter()
            .all(|r| r.response_code == 504 && r.response_flags == "UT" && r.attempts == 1)
    );
    assert!(
        v1.iter().all(|r| r.response_code == 200),
        "v1 500s are retried: {v1:?}"
    );
    assert_eq!(c.hits(), v2.len(), "no retries on v2");
    assert!(a.hits() > 0 && v1.iter().any(|r| r.attempts == 2));
    for (status, took) in results {
        if status == StatusCode::GATEWAY_TIMEOUT {
            assert!(
                took < Duration::from_millis(2500),
                "cut at the destination timeout: {took:?}"
            );
        }
    }
}

#[test]
fn the_annotation_is_validated_like_istio_fields() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/composite-routing");
    let mut text = String::new();
    for f in ["services.yaml", "pods.yaml", "destinationrule.yaml"] {
        text.push_str(&std::fs::read_to_string(base.join(f)).expect("read"));
        text.push_str("\n---\n");
    }
    let ok = load(&format!("{text}{ANNOTATED}"));
    let vs = &ok.virtual_services[0];
    assert_eq!(vs.destination_policies.len(), 2);
    assert_eq!(vs.destination_policies[0].subset.as_deref(), Some("v2"));
    for (bad, want) in [
        (
            "route: nope\n        subset: v2\n        timeout: 1s",
            "no http route is named \"nope\"",
        ),
        ("subset: v3\n        timeout: 1s", "matches no destination"),
        ("subset: v2\n        timeout: soon", "is not a duration"),
        (
            "subset: v2\n        retries: {attempts: 1, retryOn: \"5xx, reset\"}",
            "is not a retry condition",
        ),
        ("subset: v2", "sets nothing"),
        ("subset: v2\n        timout: 1s", "unknown field"),
    ] {
        let vs = ANNOTATED.replace(
            "      - route: public-traffic-split\n        subset: v2\n        timeout: 500ms\n        retries: {attempts: 0}",
            &format!("      - {bad}"),
        );
        let err = load_str("bad.yaml", &format!("{text}{vs}"))
            .expect_err(bad)
            .to_string();
        assert!(err.contains("canary.io/destination-policy"), "{err}");
        assert!(err.contains(want), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint() {
    let net = 15;
    let v1a = handler(|_| async { text(500, "broken") });
    let a = backend(pod(net, 11), "v1-a", Some(v1a)).await;
    let b = backend(pod(net, 12), "v1-b", None).await;
    let _c = backend(pod(net, 21), "v2-a", None).await;
    let dr = r#"
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 1s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
  subsets:"#;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}}]
    retries: {attempts: 0}
    timeout: 5s
"#;
    let text = localize(
        &format!(
            "{}\n---\n{}\n---\n{}\n---\n{vs}",
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../deploy/examples/composite-routing/services.yaml")
            )
            .expect("read"),
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../deploy/examples/composite-routing/pods.yaml")
            )
            .expect("read"),
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../deploy/examples/composite-routing/destinationrule.yaml")
            )
            .expect("read")
            .replace("\n  subsets:", dr),
        ),
        net,
    );
    let w = World::new(load(&text), ShimOptions::default(), None).await;
    let mut conn = w.h1().await;
    for _ in 0..40 {
        let _ = conn.get("/", &[]).await;
        if !w.shim.ejected().is_empty() {
            break;
        }
    }
    assert_eq!(
        w.shim.ejected(),
        vec![(HOST.to_string(), Some("v1".to_string()), pod(net, 11))]
    );
    assert!(w.recorder.events().iter().any(|e| matches!(
        e,
        ShimEvent::EndpointEjected { endpoint, subset, .. } if *endpoint == pod(net, 11) && subset.as_deref() == Some("v1")
    )));
    let before = a.hits();
    for _ in 0..30 {
        assert_eq!(conn.get("/", &[]).await.backend(), "v1-b");
    }
    assert_eq!(a.hits(), before, "the ejected endpoint gets nothing");
    assert!(b.hits() >= 30);
}
