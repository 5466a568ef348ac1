//! Upstream connections: a pool per (client network namespace, endpoint,
//! protocol). HTTP/1.1 connections (`h1`, driven by the request's own
//! task) carry one request at a time and go back to the pool when their
//! response body has ended; an h2c connection (hyper's) is shared by every
//! request to the endpoint.
//!
//! The pool is split into shards behind short mutexes (held for a pop or
//! a push, never across an await).
//!
//! A pooled connection is closed once it has been idle for its cluster's
//! `connectionPool.http.idleTimeout` (Istio's default: one hour), and at
//! once when its client's namespace goes away: a socket keeps its network
//! namespace alive, and a pod's namespace must not outlive the pod.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Connector;
use super::body::{BoxError, ReqBody};
use super::h1::{self, Failure, H1Body, Home};

const SHARDS: usize = 16;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Key {
    pub netns: u64,
    pub addr: SocketAddr,
    pub h2: bool,
}

impl Key {
    fn shard(&self) -> usize {
        let ip = match self.addr.ip() {
            std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
            std::net::IpAddr::V6(v6) => (u128::from(v6) as u64) ^ ((u128::from(v6) >> 64) as u64),
        };
        let h = (ip ^ self.netns.rotate_left(17) ^ u64::from(self.addr.port()) << 32)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 60) as usize % SHARDS
    }
}

/// How a cluster's upstream connections are opened and kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub connect_timeout: Duration,
    /// Idle this long, a pooled connection is closed.
    pub idle_timeout: Duration,
}

/// Pooled connections, each with the instant it expires if still idle.
pub(super) enum Idle {
    H1(Vec<(h1::Conn, Instant)>),
    /// Shared by every request; it expires `idle_timeout` after the last
    /// request started on it (requests in flight hold their own handles).
    H2(http2::SendRequest<ReqBody>, Instant),
}

pub(crate) struct Pool {
    shards: Vec<Mutex<HashMap<Key, Idle>>>,
    max_idle: usize,
}

/// An upstream response body: read by the request's task (HTTP/1.1) or
/// by hyper's h2 connection.
pub(crate) enum UpstreamBody {
    /// Boxed: it holds the connection, and responses are moved by value.
    H1(Box<H1Body>),
    H2(Incoming),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => Pin::new(&mut **b).poll_frame(cx),
            UpstreamBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::H2(b) => b.size_hint(),
        }
    }
}

/// Why an attempt got no response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The TCP connection failed or timed out (the request was not sent).
    Connect(io::Error),
    /// The request was sent (at least in part), then the stream or the
    /// connection broke. `refused`: the h2 server refused the stream.
    Reset { refused: bool, error: BoxError },
}

/// The response; an HTTP/1.1 body puts its connection back in the pool
/// when it has been read to its end. The request is passed as `&mut
/// Option`: it is taken out only when it is handed to a connection, and
/// put back when it was not sent (a closed pooled connection, a failed
/// connect), so a retry needs no copy of it.
pub(crate) type SendResult = Result<Response<UpstreamBody>, SendError>;

impl Pool {
    pub fn new(max_idle: usize) -> Arc<Pool> {
        Arc::new(Pool {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_idle,
        })
    }

    pub(super) fn lock(&self, key: &Key) -> std::sync::MutexGuard<'_, HashMap<Key, Idle>> {
        self.shards[key.shard()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently pooled live connection (expired or closed ones
    /// on top are dropped, which closes them).
    pub(super) fn take_h1(&self, key: &Key) -> Option<h1::Conn> {
        let mut shard = self.lock(key);
        let Some(Idle::H1(list)) = shard.get_mut(key) else {
            return None;
        };
        let now = Instant::now();
        while let Some((conn, expires)) = list.pop() {
            if expires > now && conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn`, whose response has ended, for the next request to
    /// `key` (unless the endpoint already has `max_idle` waiting).
    pub(crate) fn put_back_h1(&self, key: Key, conn: h1::Conn, idle_timeout: Duration) {
        let mut shard = self.lock(&key);
        if let Idle::H1(list) = shard.entry(key).or_insert_with(|| Idle::H1(Vec::new()))
            && list.len() < self.max_idle
        {
            list.push((conn, Instant::now() + idle_timeout));
        }
    }

    fn get_h2(&self, key: &Key, idle_timeout: Duration) -> Option<http2::SendRequest<ReqBody>> {
        let now = Instant::now();
        let mut shard = self.lock(key);
        match shard.get_mut(key) {
            Some(Idle::H2(s, expires)) if !s.is_closed() && *expires > now => {
                *expires = now + idle_timeout;
                Some(s.clone())
            }
            _ => None,
        }
    }

    /// Closes the pooled connections that have been idle past their
    /// timeout or that are already closed; returns how many it dropped.
    pub fn expire(&self, now: Instant) -> usize {
        self.retain(|_, expires, closed| expires > now && !closed)
    }

    /// Closes every pooled connection opened from network namespace
    /// `netns` (it is gone); returns how many.
    pub fn forget_netns(&self, netns: u64) -> usize {
        self.retain(|key, _, _| key.netns != netns)
    }

    /// Keeps the pooled connections `keep(key, expires, closed)` accepts.
    fn retain(&self, keep: impl Fn(&Key, Instant, bool) -> bool) -> usize {
        let mut dropped = 0;
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|key, idle| match idle {
                Idle::H1(list) => {
                    let before = list.len();
                    list.retain(|(c, expires)| keep(key, *expires, !c.is_open()));
                    dropped += before - list.len();
                    !list.is_empty()
                }
                Idle::H2(s, expires) => {
                    let k = keep(key, *expires, s.is_closed());
                    dropped += usize::from(!k);
                    k
                }
            });
        }
        dropped
    }

    /// Sends the request in `req` to `key.addr`, on a pooled connection
    /// when there is a usable one. A pooled connection that turns out
    /// closed before the request went out is replaced by a new one
    /// transparently. `req` is `Some` afterwards only if the request was
    /// not sent. Over HTTP/1.1 the head of a sent request comes back in
    /// `sent` (for a retry); HTTP/2 leaves `sent` alone.
    pub async fn send(
        self: &Arc<Self>,
        connector: &dyn Connector,
        key: Key,
        limits: Limits,
        req: &mut Option<Request<ReqBody>>,
        sent: &mut Option<Parts>,
    ) -> SendResult {
        // Every request's future holds this one, moved by value at each
        // `.await` that starts it, so its size is paid per request: the h2
        // path and opening a connection are boxed, and the request stays
        // in the caller's `Option` (an async fn's arguments are stored
        // twice in its future) until a connection takes it.
        if key.h2 {
            return Box::pin(self.send_h2(connector, key, limits, req)).await;
        }
        while let Some(conn) = self.take_h1(&key) {
            match conn.send(req, sent, self.home(key, limits)).await {
                Ok(resp) => return Ok(resp.map(|b| UpstreamBody::H1(Box::new(b)))),
                // Not sent: the idle connection was closed; next one.
                Err(Failure::NotSent(_)) => continue,
                Err(Failure::Broken(e)) => return Err(broken(e)),
            }
        }
        let stream = Box::pin(connect(connector, key, limits.connect_timeout)).await?;
        match h1::Conn::new(stream)
            .send(req, sent, self.home(key, limits))
            .await
        {
            Ok(resp) => Ok(resp.map(|b| UpstreamBody::H1(Box::new(b)))),
            Err(Failure::NotSent(e)) => Err(broken(e.into())),
            Err(Failure::Broken(e)) => Err(broken(e)),
        }
    }

    fn home(self: &Arc<Self>, key: Key, limits: Limits) -> Home {
        Home {
            pool: self.clone(),
            key,
            idle_timeout: limits.idle_timeout,
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        connector: &dyn Connector,
        key: Key,
        limits: Limits,
        req: &mut Option<Request<ReqBody>>,
    ) -> SendResult {
        if let Some(mut sender) = self.get_h2(&key, limits.idle_timeout)
            && sender.ready().await.is_ok()
        {
            match sender.try_send_request(take(req)?).await {
                Ok(resp) => return Ok(resp.map(UpstreamBody::H2)),
                Err(mut e) => match e.take_message() {
                    Some(r) => *req = Some(r),
                    None => return Err(reset(e.into_error())),
                },
            }
        }
        let stream = connect(connector, key, limits.connect_timeout).await?;
        let mut sender = match http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await {
            Ok((sender, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
            Err(e) => return Err(SendError::Connect(io::Error::other(e))),
        };
        self.lock(&key).insert(
            key,
            Idle::H2(sender.clone(), Instant::now() + limits.idle_timeout),
        );
        if let Err(e) = sender.ready().await {
            return Err(SendError::Connect(io::Error::other(e)));
        }
        match sender.try_send_request(take(req)?).await {
            Ok(resp) => Ok(resp.map(UpstreamBody::H2)),
            Err(mut e) => {
                *req = e.take_message();
                Err(reset(e.into_error()))
            }
        }
    }
}

/// The request for a connection that is ready to take it. The caller
/// always passes one; an empty `req` is a bug, reported as a failure to
/// send rather than a panic in the data path.
fn take(req: &mut Option<Request<ReqBody>>) -> Result<Request<ReqBody>, SendError> {
    req.take()
        .ok_or_else(|| SendError::Connect(io::Error::other("no request to send")))
}

async fn connect(
    connector: &dyn Connector,
    key: Key,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, SendError> {
    match tokio::time::timeout(timeout, connector.connect(key.netns, key.addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(SendError::Connect(e)),
        Err(_) => Err(SendError::Connect(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect timed out",
        ))),
    }
}

fn reset(error: hyper::Error) -> SendError {
    // hyper does not expose the h2 reason; its text names it.
    let refused = format!("{error:?}").contains("REFUSED_STREAM");
    SendError::Reset {
        refused,
        error: error.into(),
    }
}

/// An HTTP/1.1 exchange that broke after (or while) the request went out.
fn broken(error: BoxError) -> SendError {
    SendError::Reset {
        refused: false,
        error,
    }
}
