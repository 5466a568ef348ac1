//! Connections: what an idle one costs, upstream pooling and its idle
//! timeout, and the client idle timeout.

use super::*;

/// hyper keeps a box the size of the service's future for every open
/// connection, idle or not; the service must box its big request future.
#[test]
fn idle_connections_hold_a_small_service_future() {
    fn size<F: Future>(_: impl FnOnce(Request<Incoming>) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    let shim = Shim::new(
        ShimOptions::default(),
        Arc::new(Loopback),
        Arc::new(Recorder::default()),
    );
    let ctx = Arc::new(ConnCtx {
        info: ConnInfo {
            orig_dst: SocketAddr::from(([10, 96, 0, 10], 8080)),
            peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
            client_ip: None,
            netns: 0,
            source_pod: None,
        },
        source: Workload::unknown(),
        requests: std::sync::atomic::AtomicU64::new(0),
    });
    let unboxed = size(|req| {
        let (shim, ctx) = (shim.clone(), ctx.clone());
        async move {
            let (parts, body) = req.into_parts();
            shim.handle(parts, Some(body), &ctx).await
        }
    });
    let service = shim.service(ctx.clone());
    let boxed = size(|req| hyper::service::Service::call(&service, req));
    assert!(
        boxed <= 128 && unboxed > 4 * boxed,
        "service future {boxed} bytes, request future {unboxed} bytes"
    );
}

/// Every open connection is a task as big as `serve_connection`'s future:
/// the HTTP/1.1 connection is held inline with its request's future (a
/// boxed request future cost a 4.4 KB allocation and copy per request,
/// ~3% of the shim's CPU), the rarer h2c and undecided ones are boxed.
/// The HTTP/1.1 loop routes and forwards in its own body (5.1 KB; 5.6 KB
/// when each request went through two more async functions). The bound
/// catches growth: at 1000 idle connections each KiB is 1 MiB.
#[tokio::test]
async fn idle_connections_are_small_tasks() {
    let shim = Shim::new(
        ShimOptions::default(),
        Arc::new(Loopback),
        Arc::new(Recorder::default()),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stream = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let conn = ConnInfo {
        orig_dst: SocketAddr::from(([10, 96, 0, 10], 8080)),
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        client_ip: None,
        netns: 0,
        source_pod: None,
    };
    let task = shim.clone().serve_connection(stream, conn);
    let size = std::mem::size_of_val(&task);
    assert!(size <= 5248, "serve_connection future {size} bytes");
}

/// A pooled upstream connection is reused until it has been idle for the
/// DestinationRule's `connectionPool.http.idleTimeout`; and every pooled
/// connection of a client namespace that goes away is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_upstream_connections_expire_and_leave_with_their_namespace() {
    let net = 17;
    let [_a, _b, v2] = pods(net, None, None).await;
    let yaml = examples("composite-routing").replace(
        "  host: checkout-service.prod.svc.cluster.local\n  subsets:",
        "  host: checkout-service.prod.svc.cluster.local\n  trafficPolicy:\n    \
         connectionPool:\n      http:\n        idleTimeout: 300ms\n  subsets:",
    );
    assert!(yaml.contains("idleTimeout: 300ms"));
    let w = World::new(load(&localize(&yaml, net)), ShimOptions::default(), None).await;
    let to_v2 = [("x-canary-user", "true")];
    let mut conn = w.h1().await;

    // Reused while fresh.
    for _ in 0..3 {
        assert_eq!(conn.get("/", &to_v2).await.backend(), "v2-a");
    }
    assert_eq!(v2.conns.load(Ordering::SeqCst), 1);

    // Idle past the timeout: the sweep closes it, the next request opens
    // a new one.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(w.shim.expire_idle_upstreams(), 1);
    assert_eq!(w.shim.expire_idle_upstreams(), 0);
    assert_eq!(conn.get("/", &to_v2).await.backend(), "v2-a");
    assert_eq!(v2.conns.load(Ordering::SeqCst), 2);

    // Expired but not swept yet: not reused either.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(conn.get("/", &to_v2).await.backend(), "v2-a");
    assert_eq!(v2.conns.load(Ordering::SeqCst), 3);

    // The client's namespace (0 here) goes away: its pool is emptied.
    assert_eq!(w.shim.forget_namespace(0), 1);
    assert_eq!(w.shim.expire_idle_upstreams(), 0);
    assert_eq!(conn.get("/", &to_v2).await.backend(), "v2-a");
    assert_eq!(v2.conns.load(Ordering::SeqCst), 4);
}

#[test]
fn a_connection_pool_duration_that_is_not_one_is_named_and_defaulted() {
    let yaml = examples("composite-routing").replace(
        "  host: checkout-service.prod.svc.cluster.local\n  subsets:",
        "  host: checkout-service.prod.svc.cluster.local\n  trafficPolicy:\n    \
         connectionPool:\n      http:\n        idleTimeout: soon\n  subsets:",
    );
    let cfg = load(&localize(&yaml, 18));
    let shim = Shim::new(
        ShimOptions::default(),
        Arc::new(Loopback),
        Arc::new(Recorder::default()),
    );
    let warnings = shim.update(&cfg, &compile(&cfg));
    let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert!(
        text.iter().any(
            |w| w.contains("spec.trafficPolicy.connectionPool.http.idleTimeout")
                && w.contains("\"soon\" is not a duration")
        ),
        "{text:?}"
    );
}

/// A kept-alive client connection stays open while idle (hyper's own
/// header timeout would close it after 30 s), up to the client idle
/// timeout (closed within 1.25 of it); an h2c connection too (GOAWAY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_close_after_the_idle_timeout_only() {
    let net = 19;
    let _pods = pods(net, None, None).await;
    let cfg = load(&localize(&examples("composite-routing"), net));
    assert_eq!(
        ShimOptions::default().client_idle_timeout,
        Duration::from_secs(3600)
    );
    let options = ShimOptions {
        client_idle_timeout: Duration::from_millis(600),
        ..ShimOptions::default()
    };
    let w = World::new(cfg, options, None).await;
    let mut conn = w.h1().await;
    let mut h2 = w.h2().await;
    for _ in 0..3 {
        assert_eq!(conn.get("/", &[]).await.status, StatusCode::OK);
        h2.ready()
            .await
            .expect("h2c connection open between requests");
        let req = Request::builder()
            .uri(format!("http://{AUTHORITY}/"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = h2.send_request(req).await.expect("h2c answer");
        assert_eq!(resp.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.sender.ready())
        .await
        .expect("the shim answers or closes in time");
    assert!(
        closed.is_err(),
        "an idle connection outlived the idle timeout"
    );
    let h2_closed = tokio::time::timeout(Duration::from_secs(5), async {
        // The GOAWAY arrives on the connection task; poll until it lands.
        loop {
            if h2.ready().await.is_err() || h2.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        h2_closed.is_ok(),
        "an idle h2c connection outlived the idle timeout"
    );
}
