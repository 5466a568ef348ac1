//! Shim scenarios on real sockets: hyper backends on 127.<n>.0.x stand in
//! for the pods of `deploy/examples/*` (all of 127/8 is loopback on
//! Linux), a loopback listener hands connections to `serve_connection` as
//! the agent does, and real HTTP/1.1 and h2c clients talk to it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::compile::{RoutingTable, apply_weights, compile};
use crate::config::{LoadedConfig, load_str};
use crate::observe::{RequestRecord, ShimEvent};

const HOST: &str = "checkout-service.prod.svc.cluster.local";
const AUTHORITY: &str = "checkout-service.prod.svc.cluster.local:8080";
const VIP: &str = "10.96.0.10:8080";
/// The backends' port (the pods' `containerPort` after the rewrite).
const POD_PORT: u16 = 18080;

// === Test kit ===

type Body = BoxBody<Bytes, Infallible>;
type Handler = Arc<
    dyn Fn(Request<Bytes>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

fn text(status: u16, s: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    r
}

/// A request as a backend saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

struct Backend {
    hits: Arc<AtomicUsize>,
    /// TCP connections accepted.
    conns: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

/// Serves HTTP/1.1 and h2c on `addr`; answers with `handler`, which sees
/// the whole request body. Default: 200 with the pod's name as body and
/// in `x-backend`.
async fn backend(addr: SocketAddr, name: &'static str, handler: Option<Handler>) -> Backend {
    let listener = TcpListener::bind(addr).await.expect("bind backend");
    let hits = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (h, s, n) = (hits.clone(), seen.clone(), conns.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            n.fetch_add(1, Ordering::SeqCst);
            let (hits, seen, handler) = (h.clone(), s.clone(), handler.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (hits, seen, handler) = (hits.clone(), seen.clone(), handler.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        hits.fetch_add(1, Ordering::SeqCst);
                        seen.lock().expect("lock").push(Seen {
                            path: parts
                                .uri
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            headers: parts.headers.clone(),
                            body: body.clone(),
                        });
                        let mut resp = match &handler {
                            Some(h) => h(Request::from_parts(parts, body)).await,
                            None => text(200, name),
                        };
                        resp.headers_mut()
                            .insert("x-backend", http::HeaderValue::from_static(name));
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Backend { hits, conns, seen }
}

// Upstream connections straight to the loopback pods.
use crate::train::Loopback;

#[derive(Default)]
struct Recorder {
    records: Mutex<Vec<RequestRecord>>,
    events: Mutex<Vec<ShimEvent>>,
}

impl RequestObserver for Recorder {
    fn on_request(&self, record: &RequestRecord) {
        self.records.lock().expect("lock").push(record.clone());
    }
    fn on_event(&self, event: &ShimEvent) {
        self.events.lock().expect("lock").push(event.clone());
    }
}

impl Recorder {
    fn records(&self) -> Vec<RequestRecord> {
        self.records.lock().expect("lock").clone()
    }
    fn events(&self) -> Vec<ShimEvent> {
        self.events.lock().expect("lock").clone()
    }
}

/// A shim behind a loopback listener, as the agent runs it.
struct World {
    shim: Arc<Shim>,
    front: SocketAddr,
    recorder: Arc<Recorder>,
    cfg: LoadedConfig,
    table: RoutingTable,
}

impl World {
    async fn new(cfg: LoadedConfig, options: ShimOptions, source: Option<SourcePod>) -> World {
        let recorder = Arc::new(Recorder::default());
        let shim = Shim::new(options, Arc::new(Loopback), recorder.clone());
        let table = compile(&cfg);
        let warnings = shim.update(&cfg, &table);
        assert!(warnings.is_empty(), "{warnings:?}");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
        let front = listener.local_addr().expect("addr");
        let s = shim.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                let conn = ConnInfo {
                    orig_dst: VIP.parse().expect("vip"),
                    peer,
                    client_ip: Some(peer.ip()),
                    netns: 0,
                    source_pod: source.clone(),
                };
                tokio::spawn(s.clone().serve_connection(stream, conn));
            }
        });
        World {
            shim,
            front,
            recorder,
            cfg,
            table,
        }
    }

    fn set_weights(&mut self, route: Option<&str>, weights: &[(&str, i64)]) {
        let w: Vec<(String, i64)> = weights.iter().map(|(n, w)| (n.to_string(), *w)).collect();
        self.table = apply_weights(&self.table, HOST, route, &w).expect("weights");
        assert!(self.shim.update(&self.cfg, &self.table).is_empty());
    }

    async fn h1(&self) -> H1 {
        let stream = TcpStream::connect(self.front).await.expect("connect front");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        H1 { sender }
    }

    async fn h2(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let stream = TcpStream::connect(self.front).await.expect("connect front");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        sender
    }
}

/// A kept-alive HTTP/1.1 client connection.
struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    }
}

impl H1 {
    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send("GET", path, headers, Bytes::new()).await
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Answer {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", AUTHORITY);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body)).expect("request");
        self.sender.ready().await.expect("ready");
        let resp = self.sender.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

fn examples(name: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("example dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read"))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Pod IPs 10.77.0.x → 127.`net`.0.x, and the pods' port → `POD_PORT`.
fn localize(yaml: &str, net: u8) -> String {
    crate::train::localize(yaml, net, POD_PORT)
}

fn load(yaml: &str) -> LoadedConfig {
    load_str("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"))
}

/// The example's Services, Pods and DestinationRule with `vs` instead of
/// its VirtualService.
fn with_vs(example: &str, vs: &str, net: u8) -> LoadedConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(example);
    let mut text = String::new();
    for f in ["services.yaml", "pods.yaml", "destinationrule.yaml"] {
        text.push_str(&std::fs::read_to_string(dir.join(f)).expect("read"));
        text.push_str("\n---\n");
    }
    text.push_str(vs);
    load(&localize(&text, net))
}

fn pod(net: u8, last: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([127, net, 0, last]), POD_PORT)
}

/// v1-a, v1-b and v2-a of the examples, with default handlers unless given.
async fn pods(net: u8, v1: Option<Handler>, v2: Option<Handler>) -> [Backend; 3] {
    [
        backend(pod(net, 11), "v1-a", v1.clone()).await,
        backend(pod(net, 12), "v1-b", v1).await,
        backend(pod(net, 21), "v2-a", v2).await,
    ]
}

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    Arc::new(move |r| Box::pin(f(r)))
}

/// Within `k` binomial standard deviations of `n·p`.
fn within_sigma(count: usize, n: usize, p: f64, k: f64) -> bool {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - mean).abs() <= k * sigma
}

async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    check()
}

// === Seed pattern 1: composite routing ===

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

// === Seed pattern 2: mirroring ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_copies_10_percent_with_shadow_host_and_never_slows_the_primary() {
    let net = 2;
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = hang.clone();
    let v2 = handler(move |_| {
        let hang = h.load(Ordering::SeqCst);
        async move {
            if hang {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            text(200, "v2")
        }
    });
    let [a, b, c] = pods(net, None, Some(v2)).await;
    let w = World::new(
        load(&localize(&examples("mirroring"), net)),
        ShimOptions::default(),
        None,
    )
    .await;

    let n = 2000;
    let mut conn = w.h1().await;
    let mut plain = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let r = conn
            .send(
                "POST",
                &format!("/order/{i}"),
                &[("content-type", "text/plain")],
                Bytes::from("item=1"),
            )
            .await;
        plain.push(t.elapsed());
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.backend().starts_with("v1-"),
            "primary answered by {}",
            r.backend()
        );
    }
    assert_eq!(a.hits() + b.hits(), n);
    assert!(
        eventually(|| w.recorder.records().iter().filter(|r| r.mirrored).count() == c.hits()).await
    );
    let copies = c.hits();
    assert!(
        within_sigma(copies, n, 0.10, 4.0),
        "v2 got {copies} copies of {n}"
    );
    for s in c.seen() {
        assert_eq!(
            s.headers.get("host").and_then(|v| v.to_str().ok()),
            Some("checkout-service.prod.svc.cluster.local-shadow:8080")
        );
        assert!(s.path.starts_with("/order/"));
        assert_eq!(s.body, Bytes::from("item=1"), "the copy carries the body");
    }
    let mirrored: Vec<_> = w
        .recorder
        .records()
        .into_iter()
        .filter(|r| r.mirrored)
        .collect();
    assert!(
        mirrored
            .iter()
            .all(|r| r.subset.as_deref() == Some("v2") && r.response_code == 200)
    );

    // The mirror target hangs for 5 s: the primary does not notice.
    hang.store(true, Ordering::SeqCst);
    let m = 400;
    let mut hung = Vec::with_capacity(m);
    for i in 0..m {
        let t = Instant::now();
        let r = conn
            .send("POST", &format!("/order/{i}"), &[], Bytes::from("item=1"))
            .await;
        hung.push(t.elapsed());
        assert_eq!(r.status, StatusCode::OK, "no primary request fails");
    }
    plain.sort();
    hung.sort();
    let (p50, h50) = (plain[plain.len() / 2], hung[hung.len() / 2]);
    assert!(
        h50.as_secs_f64() < 3.0 * p50.as_secs_f64() + 0.002,
        "median {h50:?} with a hanging mirror vs {p50:?} without"
    );
    assert!(
        hung[hung.len() * 99 / 100] < Duration::from_secs(1),
        "p99 {:?}",
        hung[hung.len() * 99 / 100]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_beyond_the_bound_are_dropped_and_reported() {
    let net = 3;
    let v2 = handler(|_| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        text(200, "v2")
    });
    let [_a, _b, c] = pods(net, None, Some(v2)).await;
    let vs = examples("mirroring").replace("value: 10.0", "value: 100.0");
    let options = ShimOptions {
        max_mirrors_in_flight: 3,
        ..ShimOptions::default()
    };
    let w = World::new(load(&localize(&vs, net)), options, None).await;
    let mut conn = w.h1().await;
    for _ in 0..10 {
        assert_eq!(conn.get("/", &[]).await.status, StatusCode::OK);
    }
    assert!(eventually(|| c.hits() == 3).await);
    let dropped = w
        .recorder
        .events()
        .iter()
        .filter(|e| matches!(e, ShimEvent::MirrorDropped { .. }))
        .count();
    assert_eq!(dropped, 7);
}

// === Seed pattern 3a: session affinity ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_id_sticks_to_one_version_and_a_weight_change_moves_only_its_band() {
    let net = 4;
    let [_a, _b, _c] = pods(net, None, None).await;
    let mut w = World::new(
        load(&localize(&examples("session-affinity"), net)),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut conn = w.h1().await;
    let mut version: BTreeMap<String, String> = BTreeMap::new();
    let mut pod: BTreeMap<String, String> = BTreeMap::new();
    for s in 0..200 {
        let sid = format!("session-{s}");
        for _ in 0..20 {
            let r = conn.get("/cart", &[("session-id", &sid)]).await;
            assert_eq!(r.status, StatusCode::OK);
            let v = r.backend()[..2].to_string();
            let prev = version.entry(sid.clone()).or_insert_with(|| v.clone());
            assert_eq!(*prev, v, "{sid} changed version");
            // Maglev inside the subset: the same pod too.
            let p = pod
                .entry(sid.clone())
                .or_insert_with(|| r.backend().to_string());
            assert_eq!(p, r.backend(), "{sid} changed pod");
        }
    }
    let on_v2 = version.values().filter(|v| *v == "v2").count();
    assert!(
        within_sigma(on_v2, 200, 0.5, 4.0),
        "{on_v2} of 200 sessions on v2"
    );

    // 50/50 → 40/60: only sessions in the moved band [4000, 5000) move,
    // and only from v1 to v2.
    w.set_weights(None, &[("v1", 40), ("v2", 60)]);
    let mut moved = 0;
    for (sid, before) in &version {
        let r = conn.get("/cart", &[("session-id", sid)]).await;
        let now = &r.backend()[..2];
        if now != before {
            assert_eq!(
                (before.as_str(), now),
                ("v1", "v2"),
                "{sid} moved the wrong way"
            );
            moved += 1;
        }
    }
    assert!(
        within_sigma(moved, 200, 0.10, 4.0),
        "{moved} sessions moved"
    );

    // Istio's behaviour on request: the hash only picks the pod.
    let w2 = World::new(
        load(&localize(&examples("session-affinity"), net)),
        ShimOptions {
            sticky_subsets: false,
            ..ShimOptions::default()
        },
        None,
    )
    .await;
    let mut conn = w2.h1().await;
    let versions: std::collections::BTreeSet<String> = {
        let mut set = std::collections::BTreeSet::new();
        for _ in 0..60 {
            set.insert(conn.get("/", &[("session-id", "one")]).await.backend()[..2].to_string());
        }
        set
    };
    assert_eq!(
        versions.len(),
        2,
        "random subset per request without the extension"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_affinity_issues_the_cookie_when_absent() {
    let net = 5;
    let [_a, _b, _c] = pods(net, None, None).await;
    let text = localize(&examples("session-affinity"), net).replace(
        "httpHeaderName: session-id",
        "httpCookie: {name: canary-session, path: /, ttl: 3600s}",
    );
    let w = World::new(load(&text), ShimOptions::default(), None).await;
    let mut conn = w.h1().await;
    let mut seen_versions = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let first = conn.get("/", &[]).await;
        let set = first
            .headers
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .expect("Set-Cookie issued")
            .to_string();
        assert!(
            set.starts_with("canary-session=\"")
                && set.ends_with("; Max-Age=3600; Path=/; HttpOnly"),
            "{set}"
        );
        let cookie = set.split(';').next().expect("pair").to_string();
        for _ in 0..10 {
            let again = conn
                .get("/", &[("cookie", &format!("a=b; {cookie}"))])
                .await;
            assert_eq!(again.backend(), first.backend(), "the cookie keeps the pod");
            assert!(
                again.headers.get("set-cookie").is_none(),
                "no new cookie when present"
            );
        }
        seen_versions.insert(first.backend()[..2].to_string());
    }
    assert_eq!(
        seen_versions.len(),
        2,
        "new sessions spread over both versions"
    );
}

// === Seed pattern 3b: per-route policy ===

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

// === gRPC over h2c ===

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

// === Local replies: NR, UH, faults, redirect, direct response ===

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

// === Header operations and rewrites ===

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

// === Runtime sourceLabels ===

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

// === canary weights on named http routes ===

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

// === Per-destination policy (canary extension) ===

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

// === Outlier detection ===

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

// === Updates ===

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

mod h1_server;
