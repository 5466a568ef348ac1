//! The L7 shim: the HTTP proxy the kernel redirects connections to when a
//! service's routes need HTTP (header matches, mirroring, retries,
//! timeouts, faults, header edits, header/cookie hashing).
//!
//! One `Shim` serves every such service on the node. Each accepted
//! connection comes with its original destination (the VIP:port the client
//! dialled, from the kernel); every request on it is matched against that
//! service's ordered http rules and sent to an endpoint, with Istio's
//! semantics (see `proxy`), except where the README says canary does
//! better (sticky subsets, per-destination policy, runtime `sourceLabels`).
//!
//! Layout, in the order a request meets it:
//! - `table`: the compiled routes per VIP:port, swapped whole on update;
//! - `matcher`: Istio match blocks;
//! - `balance`: subset and endpoint choice, hashing, outlier detection;
//! - `policy`: retries, faults, header edits, rewrites, redirects;
//! - `proxy`: the request path (faults, retries, timeouts, records);
//! - `mirror`: fire-and-forget copies;
//! - `upstream`: the connection pool, `h1`: HTTP/1.1 to an upstream;
//!   `body`: streamed and replayed bodies;
//! - `preface`: HTTP/1.1 or h2c, from a connection's first bytes.

mod balance;
mod body;
mod h1;
mod matcher;
mod mirror;
mod policy;
mod preface;
mod proxy;
mod table;
mod upstream;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::compile::RoutingTable;
use crate::config::{ConfigWarning, LoadedConfig};
use crate::observe::{RequestObserver, Workload};

/// How the shim behaves where Istio leaves a choice (or canary extends it).
#[derive(Clone, Debug)]
pub struct ShimOptions {
    /// Appended to the Host/`:authority` of mirrored requests (Envoy's
    /// `-shadow`, the behaviour up to Istio 1.27); `None` leaves the host
    /// as is (Istio ≥ 1.28's default).
    pub mirror_host_suffix: Option<String>,
    /// Mirrored requests in flight at most; beyond, copies are dropped
    /// (and reported as `ShimEvent::MirrorDropped`).
    pub max_mirrors_in_flight: usize,
    /// A request body is kept for a retry or a mirror only up to this
    /// size; a larger body is streamed once and never replayed.
    pub max_retry_body_bytes: usize,
    /// canary extension: with a `consistentHash`, the hash also picks the
    /// subset, against fixed-order cumulative weight bands, so a session
    /// stays on one version across requests and weight changes. `false`:
    /// Istio's random subset per request (the hash only picks the pod).
    pub sticky_subsets: bool,
    /// Upstream connect timeout when the DestinationRule sets no
    /// `connectionPool.tcp.connectTimeout` (Istio's default: 10 s).
    pub connect_timeout: Duration,
    /// Idle HTTP/1.1 upstream connections kept per endpoint and client
    /// namespace.
    pub max_idle_per_endpoint: usize,
    /// A client's connection (HTTP/1.1 or h2c) with no request for this
    /// long is closed (Envoy's downstream `idle_timeout`, one hour by default in
    /// Istio; it is also the most time a client may take to send a head).
    pub client_idle_timeout: Duration,
    /// How long a pooled upstream connection may stay idle when the
    /// DestinationRule sets no `connectionPool.http.idleTimeout` (Istio's
    /// default: one hour).
    pub upstream_idle_timeout: Duration,
    /// How long a mirrored request may take when its route sets no
    /// `timeout` (it holds a slot of `max_mirrors_in_flight` meanwhile).
    pub mirror_timeout: Duration,
}

impl Default for ShimOptions {
    fn default() -> Self {
        Self {
            mirror_host_suffix: Some("-shadow".into()),
            max_mirrors_in_flight: 256,
            max_retry_body_bytes: 64 * 1024,
            sticky_subsets: true,
            connect_timeout: Duration::from_secs(10),
            max_idle_per_endpoint: 64,
            upstream_idle_timeout: Duration::from_secs(3600),
            client_idle_timeout: Duration::from_secs(3600),
            mirror_timeout: Duration::from_secs(30),
        }
    }
}

/// Opens upstream connections for the shim.
pub trait Connector: Send + Sync + 'static {
    /// Opens a TCP connection to `addr` from the client's network namespace
    /// `netns` (an opaque cookie; 0 = the agent's own).
    fn connect(
        &self,
        netns: u64,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;
}

/// The client pod of a connection, when the agent knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePod {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// What the agent knows about a redirected connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The VIP:port the client dialled.
    pub orig_dst: SocketAddr,
    /// The client address as the shim saw it.
    pub peer: SocketAddr,
    /// The client pod's IP when known (for `useSourceIp`).
    pub client_ip: Option<IpAddr>,
    /// The client's network namespace cookie (0: the agent's own).
    pub netns: u64,
    /// The client pod (for `sourceLabels` and source metrics).
    pub source_pod: Option<SourcePod>,
}

/// One request's future, boxed (see `Shim::service`).
type RequestFuture =
    Pin<Box<dyn Future<Output = Result<Response<body::RespBody>, Infallible>> + Send>>;

/// Per connection, shared by its requests.
pub(crate) struct ConnCtx {
    pub info: ConnInfo,
    pub source: Workload,
    /// Requests received on this connection (its idle check reads it).
    pub requests: AtomicU64,
}

pub struct Shim {
    options: ShimOptions,
    connector: Arc<dyn Connector>,
    observer: Arc<dyn RequestObserver>,
    table: ArcSwap<table::Table>,
    /// Endpoint health, carried from one table to the next (only touched
    /// by `update`).
    health: Mutex<table::HealthMap>,
    pool: Arc<upstream::Pool>,
    mirrors_in_flight: AtomicUsize,
    /// Requests received so far (lets the agent tell a quiet shim).
    requests: AtomicU64,
    epoch: Instant,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// For a connection whose first bytes do not tell (see `preface`).
    auto: auto::Builder<TokioExecutor>,
    /// Ticks every quarter of the client idle timeout, for every
    /// connection's idle check (one timer for all of them; started on the
    /// shim's runtime with its first connection).
    idle_ticks: OnceLock<watch::Receiver<u64>>,
}

// === impl Shim ===

impl Shim {
    pub fn new(
        options: ShimOptions,
        connector: Arc<dyn Connector>,
        observer: Arc<dyn RequestObserver>,
    ) -> Arc<Self> {
        // No header read timeout: hyper runs it while a kept-alive
        // connection waits for its next request too, arming a timer per
        // request (an allocation, and often a wake-up of the runtime), and
        // its default (30 s) closes connections that clients keep longer
        // (Go's pool: 90 s), racing their next request. The connection's
        // idle check (`close_when_idle`) does that job instead.
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(None);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(None);
        auto.http2().timer(TokioTimer::new());
        Arc::new(Self {
            pool: upstream::Pool::new(options.max_idle_per_endpoint),
            options,
            connector,
            observer,
            table: ArcSwap::from_pointee(table::Table::empty()),
            health: Mutex::default(),
            mirrors_in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            epoch: Instant::now(),
            http1,
            http2,
            auto,
            idle_ticks: OnceLock::new(),
        })
    }

    /// Compiles `cfg` with the live weights of `table` (with `canary
    /// weights` overrides applied) and swaps the result in at once;
    /// requests in flight finish on the routes they started with. Returns
    /// what the shim cannot do as configured (ignored fields, bad values).
    pub fn update(&self, cfg: &LoadedConfig, table: &RoutingTable) -> Vec<ConfigWarning> {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let (new, new_health, warnings) =
            table::Builder::new(cfg, &self.options, &health).build(table);
        *health = new_health;
        self.table.store(Arc::new(new));
        warnings
    }

    /// Whether `vip` (VIP:port) belongs to a service the shim serves.
    pub fn serves(&self, vip: SocketAddr) -> bool {
        self.table.load().shim_vips.contains(&vip)
    }

    /// Endpoints that outlier detection has ejected now: (service host,
    /// subset, address). The kernel tables should skip them too.
    pub fn ejected(&self) -> Vec<(String, Option<String>, SocketAddr)> {
        let now = self.now_ms();
        let table = self.table.load();
        let mut out: Vec<(String, Option<String>, SocketAddr)> = table
            .clusters
            .iter()
            .flat_map(|c| {
                c.endpoints
                    .iter()
                    .filter(move |e| e.health.is_ejected(now))
                    .map(move |e| {
                        (
                            c.host.to_string(),
                            c.subset.as_deref().map(str::to_string),
                            e.addr,
                        )
                    })
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Serves one redirected connection: HTTP/1.1 (keep-alive) or h2c
    /// with prior knowledge, told apart by the connection preface. Every
    /// request is routed on its own.
    pub async fn serve_connection(self: Arc<Self>, stream: TcpStream, conn: ConnInfo) {
        let source = conn
            .source_pod
            .as_ref()
            .map(|p| crate::metrics::workload_of(&p.name, &p.namespace, &p.labels, &[]))
            .unwrap_or_else(Workload::unknown);
        let ctx = Arc::new(ConnCtx {
            info: conn,
            source,
            requests: AtomicU64::new(0),
        });
        let service = self.service(ctx.clone());
        let protocol = match preface::peek(&stream).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "shim connection ended before its first request");
                return;
            }
        };
        let ended = match protocol {
            // Requests without a body are served by `h1::serve`; the first
            // one that needs more hands the connection to hyper.
            preface::Protocol::Http1 => match h1::serve(&self, &ctx, stream).await {
                h1::Served::Closed => Ok(()),
                h1::Served::HandOver(rest) => {
                    let io = TokioIo::new(rest);
                    let mut conn = Box::pin(self.http1.serve_connection(io, service));
                    let idle = self.idle_ticks();
                    close_when_idle(conn.as_mut(), |c| c.graceful_shutdown(), &ctx, idle).await
                }
            },
            // Boxed: the task of every open connection is as big as this
            // future's largest state, and HTTP/1.1's is half of theirs.
            preface::Protocol::Http2 => {
                let mut conn = Box::pin(self.http2.serve_connection(TokioIo::new(stream), service));
                let idle = self.idle_ticks();
                close_when_idle(conn.as_mut(), |c| c.graceful_shutdown(), &ctx, idle).await
            }
            preface::Protocol::Undecided => {
                let mut conn = Box::pin(self.auto.serve_connection(TokioIo::new(stream), service));
                let idle = self.idle_ticks();
                close_when_idle(conn.as_mut(), |c| c.graceful_shutdown(), &ctx, idle).await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "shim connection ended with an error");
        }
    }

    /// The hyper service of one connection. hyper keeps a box the size of
    /// its future for every open connection, idle or not, so the request
    /// future (several KiB: retries, mirrors, timeouts) is boxed per
    /// request instead: 1000 idle keep-alive connections then hold ~6 MiB
    /// less.
    fn service(
        self: &Arc<Self>,
        ctx: Arc<ConnCtx>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<body::RespBody>,
        Error = Infallible,
        Future = RequestFuture,
    > + Clone
    + use<> {
        let shim = self.clone();
        hyper::service::service_fn(move |req| {
            let shim = shim.clone();
            let ctx = ctx.clone();
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                Ok(shim.handle(parts, Some(body), &ctx).await)
            }) as RequestFuture
        })
    }

    /// Closes pooled upstream connections idle past their cluster's
    /// `idleTimeout` (the agent calls this every second); returns how many.
    pub fn expire_idle_upstreams(&self) -> usize {
        self.pool.expire(Instant::now())
    }

    /// Closes the pooled upstream connections opened from network
    /// namespace `netns`, which is gone (so the agent does not keep it
    /// alive); returns how many.
    pub fn forget_namespace(&self, netns: u64) -> usize {
        self.pool.forget_netns(netns)
    }

    /// The shared idle-check ticks; the first call starts the ticker on
    /// the calling (the shim's) runtime.
    fn idle_ticks(&self) -> watch::Receiver<u64> {
        self.idle_ticks
            .get_or_init(|| {
                let (tx, rx) = watch::channel(0u64);
                let period = self.idle_tick_period();
                tokio::spawn(async move {
                    let mut every =
                        tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                    loop {
                        every.tick().await;
                        // The shim and all its connections are gone.
                        if tx.is_closed() {
                            return;
                        }
                        tx.send_modify(|n| *n += 1);
                    }
                });
                rx
            })
            .clone()
    }

    /// How often a client connection's idle check runs.
    fn idle_tick_period(&self) -> Duration {
        (self.options.client_idle_timeout / QUIET_CHECKS).max(Duration::from_millis(1))
    }

    /// Requests received since the shim started.
    pub fn requests_received(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Milliseconds since the shim started (outlier detection's clock).
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Quiet checks in a row that close a connection: it is closed after one
/// to 1.25 idle timeouts without a request.
const QUIET_CHECKS: u32 = 4;

/// A connection's idle check, run every quarter of the idle timeout (on
/// the shim's shared ticks for hyper's connections, on the connection's
/// own timer in `h1::serve`).
struct IdleCheck {
    /// The connection's request count at the last tick.
    seen: u64,
    /// Ticks in a row without a new request.
    quiet: u32,
}

impl IdleCheck {
    fn new(ctx: &ConnCtx) -> IdleCheck {
        IdleCheck {
            seen: ctx.requests.load(Ordering::Relaxed),
            quiet: 0,
        }
    }

    /// On a tick: whether no request has come for an idle timeout.
    fn idle(&mut self, ctx: &ConnCtx) -> bool {
        let now = ctx.requests.load(Ordering::Relaxed);
        self.quiet = if now == self.seen { self.quiet + 1 } else { 0 };
        self.seen = now;
        self.quiet >= QUIET_CHECKS
    }
}

/// Serves `conn` to its end, closing it (gracefully) once no request has
/// come for an idle timeout, as Envoy's downstream idle timeout does.
/// `ticks` changes every quarter of the timeout: one timer for all
/// connections, where hyper's header timeout armed one per request.
/// `finish` is the connection's `graceful_shutdown`: finish the requests
/// in flight, take no new one, then close.
async fn close_when_idle<C, E>(
    mut conn: Pin<&mut C>,
    finish: fn(Pin<&mut C>),
    ctx: &ConnCtx,
    mut ticks: watch::Receiver<u64>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    ticks.mark_unchanged();
    let (mut check, mut closing) = (IdleCheck::new(ctx), false);
    loop {
        tokio::select! {
            biased;
            ended = conn.as_mut() => return ended.map_err(Into::into),
            changed = ticks.changed(), if !closing => {
                if changed.is_err() {
                    // The shim is going away; serve to the end.
                    closing = true;
                    continue;
                }
                if check.idle(ctx) {
                    finish(conn.as_mut());
                    closing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
