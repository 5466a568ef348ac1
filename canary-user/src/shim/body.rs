//! Bodies: what the shim sends upstream (streamed as received, or a
//! replay of a buffered copy for a retry or a mirror) and what it sends
//! back (streamed, with the request's record emitted when it ends).
//!
//! A request body is copied only when a retry or a mirror may need it,
//! and only up to `ShimOptions::max_retry_body_bytes`: the copy is taken
//! while the body streams to the first attempt (a tee), so nothing waits
//! for the whole body before forwarding. A retry or mirror can use the
//! copy once the client's body has ended within the limit; otherwise the
//! request is not retried (the failure is returned) or not mirrored.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::upstream::UpstreamBody;
use crate::observe::{RequestObserver, RequestRecord};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

// === Request bodies ===

pub(crate) enum ReqBody {
    Empty,
    Stream(Incoming),
    Tee(TeeBody),
    Replay {
        chunks: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Stream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ReqBody::Tee(t) => Pin::new(t).poll_frame(cx),
            ReqBody::Replay { chunks, trailers } => Poll::Ready(match chunks.pop_front() {
                Some(c) => Some(Ok(Frame::data(c))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Stream(b) => b.is_end_stream(),
            ReqBody::Tee(t) => t.inner.is_end_stream(),
            ReqBody::Replay { chunks, trailers } => chunks.is_empty() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Stream(b) => b.size_hint(),
            ReqBody::Tee(t) => t.inner.size_hint(),
            ReqBody::Replay { chunks, trailers } if trailers.is_none() => {
                SizeHint::with_exact(chunks.iter().map(|c| c.len() as u64).sum())
            }
            ReqBody::Replay { .. } => SizeHint::default(),
        }
    }
}

/// The copy of a request body that retries and mirrors replay.
pub(crate) struct Replay {
    state: Mutex<ReplayState>,
    done: tokio::sync::Notify,
    limit: usize,
}

#[derive(Default)]
struct ReplayState {
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    /// The client's body ended and every byte is in `chunks`.
    complete: bool,
    /// Over the limit, failed, or abandoned: no replay.
    broken: bool,
    seen: u64,
}

impl Replay {
    pub fn new(limit: usize) -> Arc<Replay> {
        Arc::new(Replay {
            state: Mutex::default(),
            done: tokio::sync::Notify::new(),
            limit,
        })
    }

    /// An already complete, empty body (a request without a body).
    pub fn empty() -> Arc<Replay> {
        let r = Replay::new(0);
        r.lock().complete = true;
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A body to send again, if the copy is complete.
    pub fn body(&self) -> Option<ReqBody> {
        let s = self.lock();
        (s.complete && !s.broken).then(|| ReqBody::Replay {
            chunks: s.chunks.iter().cloned().collect(),
            trailers: s.trailers.clone(),
        })
    }

    /// Waits until the copy is complete or cannot be; then `body()`.
    pub async fn wait(&self) -> Option<ReqBody> {
        loop {
            let notified = self.done.notified();
            {
                let s = self.lock();
                if s.broken {
                    return None;
                }
                if s.complete {
                    drop(s);
                    return self.body();
                }
            }
            notified.await;
        }
    }

    /// Body bytes received from the client so far.
    pub fn seen(&self) -> u64 {
        self.lock().seen
    }

    fn push(&self, data: &Bytes) {
        let mut s = self.lock();
        s.seen += data.len() as u64;
        if s.broken {
            return;
        }
        if s.len + data.len() > self.limit {
            s.broken = true;
            s.chunks.clear();
            drop(s);
            self.done.notify_waiters();
            return;
        }
        s.len += data.len();
        s.chunks.push(data.clone());
    }

    fn end(&self, complete: bool) {
        {
            let mut s = self.lock();
            if s.complete || s.broken {
                return;
            }
            if complete {
                s.complete = true;
            } else {
                s.broken = true;
                s.chunks.clear();
            }
        }
        self.done.notify_waiters();
    }
}

/// Streams the client's body upstream while copying it into a `Replay`.
pub(crate) struct TeeBody {
    inner: Incoming,
    replay: Arc<Replay>,
}

impl TeeBody {
    pub fn new(inner: Incoming, replay: Arc<Replay>) -> TeeBody {
        TeeBody { inner, replay }
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.replay.push(d);
                } else if let Some(t) = frame.trailers_ref() {
                    this.replay.lock().trailers = Some(t.clone());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.replay.end(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.replay.end(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        // hyper stops polling once `is_end_stream` says so, and drops the
        // body: that is the end of a complete body too.
        self.replay.end(self.inner.is_end_stream());
    }
}

// === Response bodies ===

/// What to do when a response body ends (or is dropped).
pub(crate) struct Finish {
    pub record: RequestRecord,
    pub start: Instant,
    pub observer: Arc<dyn RequestObserver>,
    pub replay: Option<Arc<Replay>>,
}

impl Finish {
    fn done(mut self, complete: bool) {
        self.record.duration = self.start.elapsed();
        if let Some(r) = &self.replay {
            self.record.request_bytes += r.seen();
        }
        if !complete && self.record.response_flags == "-" {
            // The client went away (or the upstream broke) mid-body.
            self.record.response_flags = "DC".into();
        }
        self.observer.on_request(&self.record);
    }
}

pub(crate) struct RespBody {
    kind: RespKind,
    finish: Option<Box<Finish>>,
}

enum RespKind {
    Full(Option<Bytes>),
    Stream {
        inner: UpstreamBody,
        /// What `prefetch` took from `inner`, handed out first.
        first: Option<Option<Result<Frame<Bytes>, BoxError>>>,
    },
}

/// Bodies of known length up to this size are waited for before their
/// head goes back to hyper (see `RespBody::prefetch`).
const PREFETCH_MAX: u64 = 16 * 1024;

impl RespBody {
    pub fn full(b: Bytes) -> RespBody {
        RespBody {
            kind: RespKind::Full((!b.is_empty()).then_some(b)),
            finish: None,
        }
    }

    pub fn empty() -> RespBody {
        RespBody::full(Bytes::new())
    }

    pub fn stream(b: UpstreamBody, finish: Finish) -> RespBody {
        RespBody {
            kind: RespKind::Stream {
                inner: b,
                first: None,
            },
            finish: Some(Box::new(finish)),
        }
    }

    /// Takes the first frame of a small body of known length before the
    /// response goes back to hyper. Given a head whose body is not ready
    /// yet, hyper writes the head alone and the body in a second system
    /// call, waking the client twice; the upstream connection's task hands
    /// the body over only after the head, so that happened to about one
    /// response in five on the bench's loopback. Streams of unknown length
    /// (gRPC, server-sent events) are never held back.
    pub async fn prefetch(&mut self) {
        let RespKind::Stream { inner, first } = &mut self.kind else {
            return;
        };
        let small = matches!(inner.size_hint().exact(), Some(n) if n > 0 && n <= PREFETCH_MAX);
        if first.is_some() || !small || inner.is_end_stream() {
            return;
        }
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *inner).poll_frame(cx)).await;
        *first = Some(frame);
    }

    fn finish(&mut self, complete: bool) {
        if let Some(f) = self.finish.take() {
            f.done(complete);
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.kind {
            RespKind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespKind::Stream { inner, first } => match first
                .take()
                .map_or_else(|| Pin::new(inner).poll_frame(cx), Poll::Ready)
            {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(f) = &mut this.finish {
                        if let Some(d) = frame.data_ref() {
                            f.record.response_bytes += d.len() as u64;
                        } else if let Some(t) = frame.trailers_ref() {
                            if let Some(g) = t.get("grpc-status").and_then(|v| v.to_str().ok()) {
                                f.record.grpc_status = Some(g.to_string());
                            }
                            f.record.response_bytes += header_bytes(t);
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(None) => {
                    this.finish(true);
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(f) = &mut this.finish
                        && f.record.response_flags == "-"
                    {
                        f.record.response_flags = "UR".into();
                    }
                    this.finish(false);
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RespKind::Full(b) => b.is_none(),
            RespKind::Stream { inner, first } => first.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RespKind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespKind::Stream { inner, first } => {
                let taken = match first {
                    Some(Some(Ok(frame))) => frame.data_ref().map_or(0, |d| d.len() as u64),
                    _ => 0,
                };
                let rest = inner.size_hint();
                match rest.exact() {
                    Some(n) => SizeHint::with_exact(n + taken),
                    None => {
                        let mut h = SizeHint::new();
                        h.set_lower(rest.lower() + taken);
                        if let Some(u) = rest.upper() {
                            h.set_upper(u + taken);
                        }
                        h
                    }
                }
            }
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        let complete = match &self.kind {
            RespKind::Full(_) => true,
            RespKind::Stream { inner, first } => first.is_none() && inner.is_end_stream(),
        };
        self.finish(complete);
    }
}

/// Wire size of a header block, roughly (`name: value\r\n` per field).
pub(crate) fn header_bytes(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}
