//! `canary pgo-train` (hidden): the workload a release build's
//! profile-guided optimisation learns from (`cargo xtask build --release`,
//! see the README's "Benchmarks").
//!
//! The shim serves the YAML of `deploy/examples/` exactly as the agent
//! does (same `Shim`, same request metrics, its own current-thread runtime
//! on its own thread) to loopback clients, with pods played by loopback
//! backends on 127.<net>.0.x. Only the kernel redirect is left out: a
//! connection's original destination is given, not looked up, so the
//! workload needs no privileges and runs in an unprivileged image build.
//!
//! What it sends is what canary is for, in proportions a profile should
//! weigh: mostly kept-alive HTTP/1.1 GETs through composite routing (seed
//! pattern 1: the header route and the 95/5 split), then mirroring,
//! header-hashed sessions, per-route retries with failing pods, requests
//! with bodies, and h2c (gRPC-style unary calls). Every answer is checked:
//! a workload that silently failed would train the error paths instead.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::compile::compile;
use crate::config::load_str;
use crate::metrics::Metrics;
use crate::shim::{ConnInfo, Connector, Shim, ShimOptions};

/// The examples' Service VIP and pod addresses (`deploy/examples/*`).
const VIP: &str = "10.96.0.10:8080";
const AUTHORITY: &str = "checkout-service.prod.svc.cluster.local:8080";
/// Loopback network for the pods: 127.`POD_NET`.0.{11,12,21}.
const POD_NET: u8 = 91;
const POD_PORT: u16 = 18091;
/// A pod of this version answers every `FAIL_EVERY`th request with 503,
/// so retries run.
const FAIL_EVERY: u64 = 16;

/// An example of `deploy/examples/`, embedded (the binary trains from
/// anywhere): its Services, Pods, DestinationRule and VirtualService.
macro_rules! example {
    ($name:literal) => {
        &[
            include_str!(concat!("../../deploy/examples/", $name, "/services.yaml")),
            include_str!(concat!("../../deploy/examples/", $name, "/pods.yaml")),
            include_str!(concat!(
                "../../deploy/examples/",
                $name,
                "/destinationrule.yaml"
            )),
            include_str!(concat!(
                "../../deploy/examples/",
                $name,
                "/virtualservice.yaml"
            )),
        ]
    };
}
const COMPOSITE: &[&str] = example!("composite-routing");
const MIRRORING: &[&str] = example!("mirroring");
const SESSIONS: &[&str] = example!("session-affinity");
const PER_ROUTE: &[&str] = example!("per-route-policy");

#[derive(Clone, Copy, Debug)]
pub struct TrainOptions {
    /// Requests of the main phase (composite routing over HTTP/1.1); the
    /// other phases send a fraction of it each.
    pub requests: u64,
    /// Kept-alive client connections at once.
    pub connections: usize,
}

/// How one phase went.
#[derive(Debug, Default)]
pub struct PhaseReport {
    pub name: &'static str,
    pub requests: u64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests the pods received (mirror copies and retries included).
    pub served: u64,
    pub elapsed: Duration,
}

/// One kind of request a phase sends.
#[derive(Clone, Copy)]
enum Kind {
    /// HTTP/1.1 GET; every `header_every`th request carries `header`.
    Get {
        header: Option<(&'static str, &'static str)>,
        header_every: u64,
        /// A per-connection `session-id` header.
        session: bool,
    },
    /// HTTP/1.1 POST with a small body (the shim hands it to hyper).
    Post,
    /// h2c gRPC-style unary call; every other one carries `header`.
    Grpc {
        header: (&'static str, &'static str),
    },
}

struct Phase {
    name: &'static str,
    yaml: &'static [&'static str],
    kind: Kind,
    /// Share of `TrainOptions::requests`, in percent.
    share: u64,
    /// Statuses that count as a correct answer in this phase.
    ok: &'static [u16],
    /// v2's pod answers every `FAIL_EVERY`th request with 503.
    v2_fails: bool,
}

const PHASES: &[Phase] = &[
    Phase {
        name: "composite routing (header → v2, else 95/5)",
        yaml: COMPOSITE,
        kind: Kind::Get {
            header: Some(("x-canary-user", "true")),
            header_every: 10,
            session: false,
        },
        share: 100,
        ok: &[200],
        v2_fails: false,
    },
    Phase {
        name: "mirroring 10% to v2",
        yaml: MIRRORING,
        kind: Kind::Get {
            header: None,
            header_every: 0,
            session: false,
        },
        share: 15,
        ok: &[200],
        v2_fails: false,
    },
    Phase {
        name: "session affinity on session-id",
        yaml: SESSIONS,
        kind: Kind::Get {
            header: None,
            header_every: 0,
            session: true,
        },
        share: 15,
        ok: &[200],
        v2_fails: false,
    },
    Phase {
        name: "per-route timeouts and retries (failing pods)",
        yaml: PER_ROUTE,
        kind: Kind::Get {
            header: Some(("user-group", "beta-testers")),
            header_every: 4,
            session: false,
        },
        share: 15,
        // v2's one retry waits out its back-off while other requests reach
        // v2, so it can meet the pod's next failure too.
        ok: &[200, 503],
        v2_fails: true,
    },
    Phase {
        name: "requests with a body",
        yaml: COMPOSITE,
        kind: Kind::Post,
        share: 10,
        ok: &[200],
        v2_fails: false,
    },
    Phase {
        name: "h2c unary calls (gRPC framing)",
        yaml: COMPOSITE,
        kind: Kind::Grpc {
            header: ("x-canary-user", "true"),
        },
        share: 10,
        ok: &[200],
        v2_fails: false,
    },
];

/// Runs every phase; fails if a phase got an answer it should not have.
pub fn run(opts: TrainOptions) -> Result<Vec<PhaseReport>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the load runtime")?;
    let shim_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the shim runtime")?;
    let shim_handle = shim_rt.handle().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shim_thread = std::thread::Builder::new()
        .name("canary-shim".into())
        .spawn(move || {
            shim_rt.block_on(async {
                let _ = stop_rx.await;
            })
        })
        .context("starting the shim thread")?;
    let result = rt.block_on(train(opts, shim_handle));
    let _ = stop_tx.send(());
    let _ = shim_thread.join();
    result
}

async fn train(opts: TrainOptions, shim_rt: tokio::runtime::Handle) -> Result<Vec<PhaseReport>> {
    let served = Arc::new(AtomicU64::new(0));
    // v2's pod fails now and then, in the phases that train retries.
    let v2_failing = Arc::new(AtomicBool::new(false));
    for (last, failing) in [(11, None), (12, None), (21, Some(v2_failing.clone()))] {
        let addr = SocketAddr::new(IpAddr::from([127, POD_NET, 0, last]), POD_PORT);
        spawn_pod(addr, failing, served.clone()).await?;
    }
    let metrics = Metrics::new();
    let shim = Shim::new(ShimOptions::default(), Arc::new(Loopback), metrics);
    // A std listener: the shim's runtime registers it with its own reactor.
    let front = std::net::TcpListener::bind("127.0.0.1:0")
        .context("binding the shim's loopback listener")?;
    front.set_nonblocking(true)?;
    let front_addr = front.local_addr()?;
    let vip: SocketAddr = VIP.parse()?;
    let s = shim.clone();
    shim_rt.spawn(async move {
        let Ok(front) = TcpListener::from_std(front) else {
            return;
        };
        while let Ok((stream, peer)) = front.accept().await {
            let _ = stream.set_nodelay(true);
            let info = ConnInfo {
                orig_dst: vip,
                peer,
                client_ip: Some(peer.ip()),
                netns: 0,
                source_pod: None,
            };
            tokio::spawn(s.clone().serve_connection(stream, info));
        }
    });

    let mut reports = Vec::new();
    for phase in PHASES {
        let cfg = load_str(
            format!("{}.yaml", phase.name),
            &localize(&phase.yaml.join("\n---\n"), POD_NET, POD_PORT),
        )
        .map_err(|e| anyhow::anyhow!("example config of phase {:?}: {e}", phase.name))?;
        let warnings = shim.update(&cfg, &compile(&cfg));
        if !warnings.is_empty() {
            bail!("phase {:?}: the shim warned: {warnings:?}", phase.name);
        }
        v2_failing.store(phase.v2_fails, Ordering::Relaxed);
        let requests = (opts.requests * phase.share / 100).max(1);
        let served_before = served.load(Ordering::Relaxed);
        let mut report = run_phase(phase, requests, opts.connections, front_addr).await?;
        report.served = served.load(Ordering::Relaxed) - served_before;
        if report.served < report.requests {
            bail!(
                "phase {:?}: only {} of {} requests reached a pod",
                phase.name,
                report.served,
                report.requests
            );
        }
        let bad: u64 = report
            .statuses
            .iter()
            .filter(|(s, _)| !phase.ok.contains(s))
            .map(|(_, n)| n)
            .sum();
        if bad > 0 {
            bail!(
                "phase {:?}: {bad} of {} answers were not {:?}: {:?}",
                phase.name,
                report.requests,
                phase.ok,
                report.statuses
            );
        }
        reports.push(report);
    }
    Ok(reports)
}

/// The examples' pods 10.77.0.x:8080 → 127.`net`.0.x:`port` (all of
/// 127/8 is loopback on Linux).
pub(crate) fn localize(yaml: &str, net: u8, port: u16) -> String {
    yaml.replace("10.77.0.", &format!("127.{net}.0."))
        .replace("targetPort: 8080", &format!("targetPort: {port}"))
        .replace("containerPort: 8080", &format!("containerPort: {port}"))
}

async fn run_phase(
    phase: &Phase,
    requests: u64,
    connections: usize,
    front: SocketAddr,
) -> Result<PhaseReport> {
    let start = Instant::now();
    let connections = connections.max(1) as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        // Spread the requests; the first connections take the remainder.
        let n = requests / connections + u64::from(c < requests % connections);
        let kind = phase.kind;
        tasks.spawn(async move {
            match kind {
                Kind::Grpc { header } => grpc_client(front, n, header).await,
                _ => h1_client(front, n, kind, c).await,
            }
        });
    }
    let mut report = PhaseReport {
        name: phase.name,
        ..PhaseReport::default()
    };
    while let Some(done) = tasks.join_next().await {
        for (status, n) in done.context("client task")?? {
            *report.statuses.entry(status).or_default() += n;
            report.requests += n;
        }
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// One kept-alive HTTP/1.1 connection sending `n` requests, as wrk does:
/// the raw request, then the response read to its `content-length`.
async fn h1_client(front: SocketAddr, n: u64, kind: Kind, conn: u64) -> Result<BTreeMap<u16, u64>> {
    let mut stream = TcpStream::connect(front).await?;
    stream.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut statuses = BTreeMap::new();
    for i in 0..n {
        let mut req = format!(
            "{} /checkout/{i} HTTP/1.1\r\nHost: {AUTHORITY}\r\nuser-agent: canary-pgo-train\r\n",
            if matches!(kind, Kind::Post) {
                "POST"
            } else {
                "GET"
            }
        );
        match kind {
            Kind::Get {
                header,
                header_every,
                session,
            } => {
                if let Some((k, v)) = header
                    && header_every > 0
                    && i % header_every == 0
                {
                    req.push_str(&format!("{k}: {v}\r\n"));
                }
                if session {
                    req.push_str(&format!("session-id: s{conn}-{}\r\n", i / 20));
                }
                req.push_str("\r\n");
            }
            Kind::Post => {
                let body = format!("{{\"order\":{i},\"items\":[1,2,3]}}");
                req.push_str(&format!(
                    "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                ));
            }
            Kind::Grpc { .. } => unreachable!("h2c calls go through grpc_client"),
        }
        stream.write_all(req.as_bytes()).await?;
        let status = read_response(&mut stream, &mut buf).await?;
        *statuses.entry(status).or_default() += 1;
    }
    Ok(statuses)
}

/// Reads one response (head, then `content-length` bytes of body).
async fn read_response(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<u16> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(head) = resp.parse(buf)? {
            let status = resp.code.unwrap_or(0);
            let length: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .context("a response without content-length")?;
            while buf.len() < head + length {
                if stream.read_buf(buf).await? == 0 {
                    bail!("the shim closed the connection mid-response");
                }
            }
            buf.advance(head + length);
            return Ok(status);
        }
        if stream.read_buf(buf).await? == 0 {
            bail!("the shim closed the connection before a response");
        }
    }
}

/// One h2c connection sending `n` unary calls, every other one with
/// `header`.
async fn grpc_client(
    front: SocketAddr,
    n: u64,
    header: (&'static str, &'static str),
) -> Result<BTreeMap<u16, u64>> {
    let stream = TcpStream::connect(front).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut statuses = BTreeMap::new();
    for i in 0..n {
        let mut b = http::Request::builder()
            .method("POST")
            .uri(format!("http://{AUTHORITY}/checkout.Checkout/Place"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if i % 2 == 0 {
            b = b.header(header.0, header.1);
        }
        let req = b.body(Full::new(grpc_frame(b"order")))?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        *statuses.entry(status).or_default() += 1;
    }
    Ok(statuses)
}

/// A gRPC length-prefixed message (uncompressed).
pub(crate) fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(5 + msg.len());
    f.push(0);
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    Bytes::from(f)
}

/// A pod: HTTP/1.1 and h2c, a small answer with the headers an app
/// sends; while `failing` is set, every `FAIL_EVERY`th request it gets is
/// answered 503. `served` counts the requests of all pods.
async fn spawn_pod(
    addr: SocketAddr,
    failing: Option<Arc<AtomicBool>>,
    served: Arc<AtomicU64>,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding a training pod on {addr}"))?;
    // This pod's own count decides its failures: every `FAIL_EVERY`th of
    // its requests, whatever the other pods get.
    let own = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (served, own) = (served.clone(), own.clone());
            let failing = failing.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let (served, own) = (served.clone(), own.clone());
                    let failing = failing.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
                    async move {
                        served.fetch_add(1, Ordering::Relaxed);
                        let n = own.fetch_add(1, Ordering::Relaxed);
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        let _ = req.into_body().collect().await;
                        let fail = failing && n % FAIL_EVERY == FAIL_EVERY - 1;
                        Ok::<_, Infallible>(pod_answer(addr, grpc, fail))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

fn pod_answer(addr: SocketAddr, grpc: bool, fail: bool) -> http::Response<Full<Bytes>> {
    let mut b = http::Response::builder()
        .status(if fail { 503 } else { 200 })
        .header("x-canary-pod", addr.to_string());
    if grpc {
        // gRPC answers 200 with its status in the trailers; a trailers-only
        // answer (headers) keeps the pod simple.
        b = b
            .header("content-type", "application/grpc")
            .header("grpc-status", "0");
        return b.body(Full::new(grpc_frame(b"ok"))).expect("response");
    }
    b.header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"checkout ok\n")))
        .expect("response")
}

/// Upstream connections straight to the loopback pods.
pub(crate) struct Loopback;

impl Connector for Loopback {
    fn connect(
        &self,
        _netns: u64,
        addr: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>> {
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(s)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workload itself, small: every phase is answered, and it runs
    /// the paths it is there to train (a run that mirrored or retried
    /// nothing would leave them out of the profile).
    #[test]
    fn every_phase_is_answered_and_mirrors_and_retries_reach_the_pods() {
        let reports = run(TrainOptions {
            requests: 2000,
            connections: 4,
        })
        .expect("training run");
        let names: Vec<&str> = reports.iter().map(|r| r.name).collect();
        assert_eq!(names, PHASES.iter().map(|p| p.name).collect::<Vec<_>>());
        for r in &reports {
            assert!(r.statuses.get(&200).copied().unwrap_or(0) > 0, "{r:?}");
        }
        let by_name = |n: &str| reports.iter().find(|r| r.name.starts_with(n)).expect(n);
        let composite = by_name("composite");
        assert_eq!(composite.requests, 2000);
        assert_eq!(composite.statuses.get(&200), Some(&2000));
        // Composite routing has nothing to copy or retry: one pod request each.
        assert_eq!(composite.served, composite.requests, "{composite:?}");
        // 10% mirrored: copies on top of the 300 requests.
        let mirroring = by_name("mirroring");
        assert!(mirroring.served > mirroring.requests, "{mirroring:?}");
        // v2's pod fails one request in 16 of the ~75 beta testers send it:
        // retries on top.
        let retries = by_name("per-route");
        assert!(retries.served > retries.requests, "{retries:?}");
    }
}
