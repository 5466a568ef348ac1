//! gRPC over h2c: unary calls routed by header and retried on
//! UNAVAILABLE.

use super::*;
use crate::train::grpc_frame;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_over_h2c_is_routed_by_header_and_retried_on_unavailable() {
    let net = 8;
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let grpc = move |name: &'static str, fail_first: bool| {
        let n = n.clone();
        handler(move |req: Request<Bytes>| {
            let first = n.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                assert_eq!(req.version(), http::Version::HTTP_2, "h2c upstream");
                let mut body = req.into_body();
                let msg = if body.len() >= 5 {
                    body.advance(5);
                    body
                } else {
                    Bytes::new()
                };
                let mut resp = if fail_first && first {
                    // Trailers-only error, as gRPC servers send it.
                    let mut r = Response::new(Full::new(Bytes::new()).boxed());
                    r.headers_mut()
                        .insert("grpc-status", http::HeaderValue::from_static("14"));
                    r
                } else {
                    let mut reply = b"hello ".to_vec();
                    reply.extend_from_slice(&msg);
                    reply.extend_from_slice(format!(" from {name}").as_bytes());
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", http::HeaderValue::from_static("0"));
                    Response::new(
                        Full::new(grpc_frame(&reply))
                            .with_trailers(async move { Some(Ok(t)) })
                            .boxed(),
                    )
                };
                resp.headers_mut().insert(
                    "content-type",
                    http::HeaderValue::from_static("application/grpc"),
                );
                resp
            }
        })
    };
    let [_a, _b, c] = pods(net, Some(grpc("v1", false)), Some(grpc("v2", true))).await;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - name: grpc-canary
    match: [{headers: {x-canary-user: {exact: "true"}}}]
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}}]
  - route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}}]
"#;
    let w = World::new(
        with_vs("composite-routing", vs, net),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut client = w.h2().await;
    let call = |canary: bool| {
        let mut b = Request::builder()
            .method("POST")
            .uri(format!("http://{AUTHORITY}/checkout.Checkout/Place"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if canary {
            b = b.header("x-canary-user", "true");
        }
        b.body(Full::new(grpc_frame(b"order-1"))).expect("request")
    };
    client.ready().await.expect("ready");
    let resp = client.send_request(call(true)).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0")
    );
    let mut body = collected.to_bytes();
    body.advance(5);
    assert_eq!(body, Bytes::from("hello order-1 from v2"));
    assert_eq!(c.hits(), 2, "retried once on UNAVAILABLE, with the body");
    assert!(c.seen().iter().all(|s| s.body == grpc_frame(b"order-1")));
    let rec = w.recorder.records().pop().expect("record");
    assert_eq!(rec.protocol, "grpc");
    assert_eq!(rec.grpc_status.as_deref(), Some("0"));
    assert_eq!((rec.attempts, rec.subset.as_deref()), (2, Some("v2")));

    // Without the header: v1, same h2 connection.
    let resp = client.send_request(call(false)).await.expect("response");
    let mut body = resp.into_body().collect().await.expect("body").to_bytes();
    body.advance(5);
    assert_eq!(body, Bytes::from("hello order-1 from v1"));
}
