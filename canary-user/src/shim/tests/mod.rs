//! Shim scenarios on real sockets: hyper backends on 127.<n>.0.x stand in
//! for the pods of `deploy/examples/*` (all of 127/8 is loopback on
//! Linux), a loopback listener hands connections to `serve_connection` as
//! the agent does, and real HTTP/1.1 and h2c clients talk to it.
//!
//! This file is the kit the scenarios share; the scenarios live one topic
//! per file (routing, mirroring, affinity, policy, gRPC, local replies,
//! headers, connections, and the HTTP/1.1 server on the wire).

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

mod affinity;
mod connections;
mod grpc;
mod h1_server;
mod headers;
mod local_replies;
mod mirroring;
mod policy;
mod routing;
