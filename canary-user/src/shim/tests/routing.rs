//! Routing: the seed's composite split (a header to v2, the rest 95/5),
//! `sourceLabels` matched against the client pod at run time, `canary
//! weights` on named http routes, and a route update on a kept-alive
//! connection.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_routing_header_to_v2_else_95_5() {
    let net = 1;
    let [a, b, c] = pods(net, None, None).await;
    let w = World::new(
        load(&localize(&examples("composite-routing"), net)),
        ShimOptions::default(),
        None,
    )
    .await;

    // The header always reaches v2, also interleaved with other requests
    // on the same kept-alive connection.
    let mut conn = w.h1().await;
    for i in 0..100 {
        let with = conn.get("/cart", &[("x-canary-user", "true")]).await;
        assert_eq!(
            (with.status, with.backend()),
            (StatusCode::OK, "v2-a"),
            "request {i}"
        );
        let _ = conn.get("/cart", &[]).await;
    }
    let v2_before = c.hits();

    // Without it: 95/5 per request over 2400 requests on 4 connections.
    let n_conns = 4;
    let per_conn = 600;
    let mut tasks = Vec::new();
    for _ in 0..n_conns {
        let mut conn = w.h1().await;
        tasks.push(tokio::spawn(async move {
            let mut v2 = 0usize;
            for _ in 0..per_conn {
                let a = conn.get("/cart", &[("x-canary-user", "false")]).await;
                assert_eq!(a.status, StatusCode::OK);
                if a.backend() == "v2-a" {
                    v2 += 1;
                }
            }
            v2
        }));
    }
    let mut v2 = 0;
    for t in tasks {
        v2 += t.await.expect("task");
    }
    let n = n_conns * per_conn;
    assert!(within_sigma(v2, n, 0.05, 4.0), "v2 got {v2} of {n}");
    assert_eq!(a.hits() + b.hits() + c.hits(), 200 + n);
    assert_eq!(c.hits() - v2_before, v2);
    // Upstream connections are pooled and kept alive.
    let conns = [&a, &b, &c]
        .iter()
        .map(|x| x.conns.load(Ordering::SeqCst))
        .sum::<usize>();
    assert!(
        conns <= 3 * n_conns,
        "{conns} upstream connections for {} requests",
        200 + n
    );
    // Both v1 pods share the v1 traffic.
    assert!(
        a.hits() > 100 && b.hits() > 100,
        "{} {}",
        a.hits(),
        b.hits()
    );
    let records = w.recorder.records();
    assert_eq!(records.len(), 200 + n);
    let r = records
        .iter()
        .find(|r| r.subset.as_deref() == Some("v2"))
        .expect("v2 record");
    assert_eq!(r.destination_service, HOST.into());
    assert_eq!(r.destination.version, "v2".into());
    assert_eq!(r.response_flags, "-");
    assert_eq!(r.protocol, "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_labels_match_the_client_pod_at_runtime() {
    let net = 12;
    let [_a, _b, _c] = pods(net, None, None).await;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - name: internal-service-canary
    match: [{sourceLabels: {app: qa-tools}}]
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}}]
  - route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}}]
"#;
    let qa = SourcePod {
        name: "qa-tools-7d9f8b6c5d-x2x9z".into(),
        namespace: "prod".into(),
        labels: BTreeMap::from([("app".to_string(), "qa-tools".to_string())]),
    };
    let w = World::new(
        with_vs("composite-routing", vs, net),
        ShimOptions::default(),
        Some(qa),
    )
    .await;
    let mut conn = w.h1().await;
    assert_eq!(conn.get("/", &[]).await.backend(), "v2-a");
    let rec = w.recorder.records().pop().expect("record");
    assert_eq!(
        rec.source.workload,
        "qa-tools-7d9f8b6c5d".rsplit_once('-').expect("rs").0.into()
    );
    assert_eq!(rec.source.app, "qa-tools".into());
    let other = World::new(
        with_vs("composite-routing", vs, net),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut conn = other.h1().await;
    assert!(conn.get("/", &[]).await.backend().starts_with("v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_overrides_address_named_http_routes() {
    let net = 13;
    let [_a, _b, _c] = pods(net, None, None).await;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - name: beta-split
    match: [{headers: {x-beta: {exact: "1"}}}]
    route:
    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}
      weight: 100
    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}
      weight: 0
  - name: public-traffic-split
    route:
    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}
      weight: 100
    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}
      weight: 0
"#;
    let mut w = World::new(
        with_vs("composite-routing", vs, net),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut conn = w.h1().await;
    assert!(
        conn.get("/", &[("x-beta", "1")])
            .await
            .backend()
            .starts_with("v1")
    );
    w.set_weights(Some("beta-split"), &[("v2", 100)]);
    for _ in 0..20 {
        assert_eq!(conn.get("/", &[("x-beta", "1")]).await.backend(), "v2-a");
        assert!(
            conn.get("/", &[]).await.backend().starts_with("v1"),
            "other routes keep theirs"
        );
    }
    // The catch-all (the port's kernel route) by default.
    w.set_weights(None, &[("v1", 0), ("v2", 1)]);
    for _ in 0..20 {
        assert_eq!(conn.get("/", &[]).await.backend(), "v2-a");
    }
    let err =
        apply_weights(&w.table, HOST, Some("nope"), &[("v1".into(), 1)]).expect_err("unknown");
    assert!(err.to_string().contains("beta-split"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_swaps_routes_for_the_next_request_on_a_kept_alive_connection() {
    let net = 16;
    let [_a, _b, _c] = pods(net, None, None).await;
    let mut w = World::new(
        load(&localize(&examples("checkout"), net)),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut conn = w.h1().await;
    w.set_weights(None, &[("v1", 1), ("v2", 0)]);
    for _ in 0..10 {
        assert!(conn.get("/", &[]).await.backend().starts_with("v1"));
    }
    w.set_weights(None, &[("v1", 0), ("v2", 1)]);
    for _ in 0..10 {
        assert_eq!(conn.get("/", &[]).await.backend(), "v2-a");
    }
    // The checkout example is a kernel service: the shim can still serve
    // it (a connection racing a config change), but does not claim it.
    assert!(!w.shim.serves(VIP.parse().expect("vip")));
}
