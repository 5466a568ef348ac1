//! Replies the shim makes itself: no route (404 NR), an empty subset
//! (503 UH), faults, redirects and direct responses.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_nr_and_an_empty_subset_is_503_uh() {
    let net = 9;
    let [_a, _b, _c] = pods(net, None, None).await;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - match: [{headers: {x-canary-user: {exact: "true"}}}]
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}}]
  - match: [{uri: {prefix: /v1}}]
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}}]
"#;
    // v2's only pod is not Ready: subset v2 has no endpoints.
    let mut cfg_text = String::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/composite-routing");
    for f in ["services.yaml", "pods.yaml", "destinationrule.yaml"] {
        cfg_text.push_str(&std::fs::read_to_string(dir.join(f)).expect("read"));
        cfg_text.push_str("\n---\n");
    }
    let idx = cfg_text
        .rfind("    status: \"True\"")
        .expect("v2 ready condition");
    let mut text = cfg_text.clone();
    text.replace_range(
        idx..idx + "    status: \"True\"".len(),
        "    status: \"False\"",
    );
    text.push_str(vs);
    let cfg = load_str("test.yaml", &localize(&text, net)).unwrap_or_else(|e| panic!("{e}"));
    let recorder = Arc::new(Recorder::default());
    let shim = Shim::new(ShimOptions::default(), Arc::new(Loopback), recorder.clone());
    shim.update(&cfg, &compile(&cfg));
    let w = World {
        front: {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let a = l.local_addr().expect("addr");
            let s = shim.clone();
            tokio::spawn(async move {
                while let Ok((stream, peer)) = l.accept().await {
                    let conn = ConnInfo {
                        orig_dst: VIP.parse().expect("vip"),
                        peer,
                        client_ip: None,
                        netns: 0,
                        source_pod: None,
                    };
                    tokio::spawn(s.clone().serve_connection(stream, conn));
                }
            });
            a
        },
        shim,
        recorder,
        table: compile(&cfg),
        cfg,
    };
    let mut conn = w.h1().await;
    let r = conn.get("/other", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        w.recorder.records().pop().expect("record").response_flags,
        "NR"
    );
    let r = conn.get("/v1/cart", &[]).await;
    assert_eq!(
        (r.status, r.backend().starts_with("v1")),
        (StatusCode::OK, true)
    );
    let r = conn.get("/", &[("x-canary-user", "true")]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let rec = w.recorder.records().pop().expect("record");
    assert_eq!(
        (&*rec.response_flags, rec.subset.as_deref()),
        ("UH", Some("v2"))
    );
    // gRPC clients get a gRPC status instead.
    let r = conn
        .get(
            "/",
            &[
                ("x-canary-user", "true"),
                ("content-type", "application/grpc"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("14")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_redirects_and_direct_responses() {
    let net = 10;
    let [_a, _b, c] = pods(net, None, None).await;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /abort}}]
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
  - match: [{uri: {prefix: /grpc-abort}}]
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
  - match: [{uri: {prefix: /delay}}]
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
  - match: [{uri: {prefix: /never}}]
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}}]
    fault: {abort: {httpStatus: 500}}
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - match: [{uri: {exact: /health}}]
    directResponse: {status: 200, body: {string: "ok"}}
  - route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}}]
"#;
    let w = World::new(
        with_vs("composite-routing", vs, net),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut conn = w.h1().await;
    let r = conn.get("/abort", &[]).await;
    assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(
        w.recorder.records().pop().expect("record").response_flags,
        "FI"
    );
    assert_eq!(c.hits(), 0, "an aborted request never reaches the backend");
    let r = conn
        .get("/grpc-abort", &[("content-type", "application/grpc")])
        .await;
    assert_eq!(
        r.headers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("14")
    );
    let t = Instant::now();
    let r = conn.get("/delay", &[]).await;
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!((r.status, r.backend()), (StatusCode::OK, "v2-a"));
    assert_eq!(
        w.recorder.records().pop().expect("record").response_flags,
        "DI"
    );
    // No percentage: no abort (Istio).
    assert_eq!(conn.get("/never", &[]).await.status, StatusCode::OK);
    let r = conn.get("/old?x=1", &[]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(
        r.headers.get("location").and_then(|v| v.to_str().ok()),
        Some("http://checkout-service.prod.svc.cluster.local:8080/new?x=1")
    );
    let r = conn.get("/health", &[]).await;
    assert_eq!(
        (r.status, r.body.as_ref()),
        (StatusCode::OK, b"ok".as_ref())
    );
}
