//! Header operations and URI/authority rewrites.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_operations_and_rewrites() {
    let net = 11;
    let [a, b, _c] = pods(net, None, None).await;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/, authority: checkout.internal}
    headers:
      request:
        set: {x-route: api}
        add: {x-added: one}
        remove: [x-canary-user]
      response:
        set: {x-served-by: canary}
    route:
    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}
      headers:
        request: {set: {x-dest: v1}}
        response: {remove: [x-backend-secret]}
  - match: [{uri: {regex: "/items/([0-9]+)"}}]
    rewrite: {uriRegexRewrite: {match: "/items/([0-9]+)", rewrite: "/catalog/\\1/detail"}}
    route: [{destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}}]
"#;
    let w = World::new(
        with_vs("composite-routing", vs, net),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut conn = w.h1().await;
    let r = conn
        .get(
            "/api/cart?id=7",
            &[("x-canary-user", "true"), ("x-added", "zero")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers.get("x-served-by").and_then(|v| v.to_str().ok()),
        Some("canary")
    );
    let seen: Vec<Seen> = a.seen().into_iter().chain(b.seen()).collect();
    let s = &seen[0];
    assert_eq!(s.path, "/v2/cart?id=7");
    let h = |k: &str| {
        s.headers
            .get_all(k)
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(h("host"), vec!["checkout.internal"]);
    assert_eq!(h("x-route"), vec!["api"]);
    assert_eq!(h("x-dest"), vec!["v1"]);
    assert_eq!(h("x-added"), vec!["zero", "one"]);
    assert!(h("x-canary-user").is_empty());
    let r = conn.get("/items/42", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen: Vec<Seen> = a.seen().into_iter().chain(b.seen()).collect();
    assert!(
        seen.iter().any(|s| s.path == "/catalog/42/detail"),
        "{seen:?}"
    );
}
