//! The server side: HTTP/1.1 requests from a redirected client, read,
//! routed and answered by the connection's own task.
//!
//! hyper's server builds each request through its dispatcher and encodes
//! the response through a second buffer; this loop does what the shim
//! needs for the requests that make up most traffic, HTTP/1.1 requests
//! without a body (GET, HEAD, DELETE, …): parse the head with httparse,
//! route it with `Shim::route`, send it with `Shim::forward`, and write
//! the response head together with the body bytes already at hand, in
//! one write. The first request it does not take (one with a body,
//! HTTP/1.0, `Expect`, `Upgrade`, `CONNECT`, or a `Content-Length` other
//! than 0) hands the connection, with the bytes read so far, to hyper,
//! which serves it from then on.
//!
//! Requests are answered in order, so pipelined requests work. A head
//! that does not parse gets 400, one over 64 KiB or 100 fields 431, as
//! hyper answers them; the connection is then closed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, StatusCode, Uri};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::wire::{
    MAX_HEAD, MAX_HEADERS, has_token, header_map, put_chunk, put_fields, put_last_chunk, read_more,
};
use crate::shim::body::{BoxError, RespBody};
use crate::shim::proxy::Decision;
use crate::shim::{ConnCtx, IdleCheck, Shim};

/// Body bytes gathered behind a response head (or between writes) before
/// they are written; a larger frame is written on its own.
const COALESCE_MAX: usize = 16 * 1024;

/// How a connection left this loop.
pub(crate) enum Served {
    /// It is closed (by either side, or for idleness or an error).
    Closed,
    /// A request this loop does not serve arrived: hyper takes the
    /// connection, starting with the bytes read so far.
    HandOver(Rewind),
}

/// Serves HTTP/1.1 requests on `io` until the connection ends, it has been
/// idle for the shim's client idle timeout (checked every quarter of it),
/// or a request needs hyper.
pub(crate) async fn serve(shim: &Arc<Shim>, ctx: &ConnCtx, mut io: TcpStream) -> Served {
    let mut buf = BytesMut::new();
    let mut check = IdleCheck::new(ctx);
    // The connection's own idle tick, re-armed only when it fires: polling
    // an armed timer costs no lock, where waiting on the shim's shared
    // ticks took the channel's waiter list's lock twice per read.
    let period = shim.idle_tick_period();
    let tick = tokio::time::sleep(period);
    tokio::pin!(tick);
    loop {
        let head = match parse_request(&buf) {
            Ok(Some(head)) => head,
            Ok(None) if buf.len() >= MAX_HEAD => {
                return Box::pin(reject(&mut io, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
                    .await;
            }
            Ok(None) => {
                // Wait for (more of) a head, and for the idle check's
                // ticks: the idle timeout is also the most time a client
                // may take to send a head.
                let read = tokio::select! {
                    biased;
                    n = read_more(&mut io, &mut buf) => n,
                    () = &mut tick => {
                        if check.idle(ctx) {
                            return Served::Closed;
                        }
                        tick.as_mut().reset(tokio::time::Instant::now() + period);
                        continue;
                    }
                };
                match read {
                    Ok(0) | Err(_) => return Served::Closed,
                    Ok(_) => continue,
                }
            }
            Err(status) => return Box::pin(reject(&mut io, status)).await,
        };
        let Parsed::Take(head) = head else {
            return Served::HandOver(Rewind {
                pre: buf.freeze(),
                io,
            });
        };
        buf.advance(head.len);
        // The request is routed and forwarded right here, not in a
        // function of its own (nor through `Shim::handle`): every async
        // call level moves its whole future (KBs: retries, mirrors,
        // timeouts) into its caller's once per request. Not boxed either:
        // a box per request cost a 4.4 KB allocation and a copy (~3% of
        // the shim's CPU); inline, an idle connection's task is that much
        // bigger instead.
        let keep_alive = !has_token(&head.headers, header::CONNECTION, "close");
        let head_only = head.method == Method::HEAD;
        let mut req = Request::new(());
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.headers_mut() = head.headers;
        let (parts, ()) = req.into_parts();
        let table = shim.routes();
        let resp = match shim.route(&table, parts, ctx) {
            Decision::Answered(resp) => resp,
            Decision::Forward(job) => shim.forward(job, None).await,
        };
        match write_response(&mut io, resp, head_only, keep_alive).await {
            Ok(true) if keep_alive => {}
            Ok(_) => {
                let _ = io.shutdown().await;
                return Served::Closed;
            }
            Err(_) => return Served::Closed,
        }
    }
}

/// A request head this loop takes, parsed.
pub(super) struct Head {
    /// Bytes of the head in the buffer.
    pub(super) len: usize,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

// Lives for one step of the loop, on its stack: no box for the common case.
#[allow(clippy::large_enum_variant)]
pub(super) enum Parsed {
    Take(Head),
    /// One for hyper (see the module's comment).
    Hand,
}

/// Parses the request head at the start of `buf`: `None` if incomplete,
/// the status to reject it with if it is malformed.
pub(super) fn parse_request(buf: &[u8]) -> Result<Option<Parsed>, StatusCode> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        Err(_) => return Err(StatusCode::BAD_REQUEST),
    };
    if req.version != Some(1) {
        return Ok(Some(Parsed::Hand));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    if method == Method::CONNECT {
        return Ok(Some(Parsed::Hand));
    }
    for f in req.headers.iter() {
        let n = f.name;
        let bodyless_length =
            n.eq_ignore_ascii_case("content-length") && f.value.trim_ascii() == b"0";
        if !bodyless_length
            && ["content-length", "transfer-encoding", "expect", "upgrade"]
                .iter()
                .any(|h| n.eq_ignore_ascii_case(h))
        {
            return Ok(Some(Parsed::Hand));
        }
    }
    let uri: Uri = req
        .path
        .unwrap_or("/")
        .parse()
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    let headers = header_map(req.headers, "request header").map_err(|_| StatusCode::BAD_REQUEST)?;
    Ok(Some(Parsed::Take(Head {
        len,
        method,
        uri,
        headers,
    })))
}

/// Answers a malformed head and closes.
async fn reject(io: &mut TcpStream, status: StatusCode) -> Served {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: 0\r\nconnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
    )
    .into_bytes();
    put_date(&mut out);
    out.extend_from_slice(b"\r\n");
    let _ = io.write_all(&out).await;
    let _ = io.shutdown().await;
    Served::Closed
}

/// How the response body goes out.
enum Framing {
    None,
    /// `Content-Length`: this many bytes left.
    Length(u64),
    Chunked,
}

/// Writes `resp`; `Ok(true)` if the connection can take another request.
async fn write_response(
    io: &mut TcpStream,
    resp: http::Response<RespBody>,
    head_only: bool,
    keep_alive: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let h = &parts.headers;
    // Room for the head and a small body, which go out in one write.
    let body_hint = body
        .size_hint()
        .exact()
        .unwrap_or(0)
        .min(COALESCE_MAX as u64) as usize;
    let mut out = Vec::with_capacity(
        96 + body_hint
            + h.iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>(),
    );
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    put_fields(&mut out, h);
    let no_body = head_only
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut framing = match (no_body, declared, body.size_hint().exact()) {
        (true, _, _) => Framing::None,
        (false, Some(n), _) => Framing::Length(n),
        (false, None, Some(n)) => {
            out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
            Framing::Length(n)
        }
        (false, None, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    };
    if !h.contains_key(header::DATE) {
        put_date(&mut out);
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if matches!(framing, Framing::None) {
        io.write_all(&out).await?;
        // A HEAD's body (or a 204's) is not sent; dropping it records the
        // request.
        return Ok(true);
    }
    let mut body = Pin::new(&mut body);
    loop {
        // Everything ready now goes in one write.
        let frame = if out.is_empty() {
            std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
        } else {
            match ready_frame(body.as_mut()) {
                Some(f) => f,
                None => {
                    io.write_all(&out).await?;
                    out.clear();
                    continue;
                }
            }
        };
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !put_data(&mut out, &mut framing, data) {
                        // More than its Content-Length: cut, and close.
                        io.write_all(&out).await?;
                        return Ok(false);
                    }
                    if out.len() >= COALESCE_MAX {
                        io.write_all(&out).await?;
                        out.clear();
                    }
                } else if let Some(t) = frame.trailers_ref()
                    && matches!(framing, Framing::Chunked)
                {
                    put_last_chunk(&mut out, Some(t));
                    io.write_all(&out).await?;
                    return Ok(true);
                }
            }
            None => {
                let complete = match framing {
                    Framing::Chunked => {
                        put_last_chunk(&mut out, None);
                        true
                    }
                    Framing::Length(left) => left == 0,
                    Framing::None => true,
                };
                io.write_all(&out).await?;
                // A body shorter than its Content-Length leaves the client
                // waiting for the rest: close.
                return Ok(complete);
            }
            // The upstream broke mid-body: the client learns it from the
            // connection's end (no last chunk, or bytes missing).
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body broke");
                io.write_all(&out).await?;
                return Ok(false);
            }
        }
    }
}

/// The body's next frame if it is ready without waiting; `None` if not.
fn ready_frame(body: Pin<&mut RespBody>) -> Option<Option<Result<Frame<Bytes>, BoxError>>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match body.poll_frame(&mut cx) {
        Poll::Ready(f) => Some(f),
        Poll::Pending => None,
    }
}

/// Appends a data frame in the response's framing; `false` if it runs
/// past the declared length (what fits is appended).
fn put_data(out: &mut Vec<u8>, framing: &mut Framing, data: &Bytes) -> bool {
    match framing {
        Framing::Chunked => {
            put_chunk(out, data);
            true
        }
        Framing::Length(left) => {
            let n = (*left).min(data.len() as u64) as usize;
            out.extend_from_slice(&data[..n]);
            *left -= n as u64;
            n == data.len()
        }
        Framing::None => true,
    }
}

/// Appends `date: <now>` (RFC 9110 §6.6.1: a proxy adds one to a response
/// that lacks it), formatted once a second per thread.
fn put_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(c.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    })
}

/// A connection with bytes already read from it, handed on: reads return
/// those bytes first.
pub(crate) struct Rewind {
    pre: Bytes,
    io: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(head: &[u8]) -> &'static str {
        match parse_request(head) {
            Ok(Some(Parsed::Take(_))) => "take",
            Ok(Some(Parsed::Hand)) => "hand",
            Ok(None) => "incomplete",
            Err(StatusCode::BAD_REQUEST) => "400",
            Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE) => "431",
            Err(s) => panic!("unexpected {s}"),
        }
    }

    /// What this loop serves and what it hands to hyper: the scenario
    /// tests see the same answers either way, so the split is pinned here.
    #[test]
    fn requests_without_a_body_are_taken_and_the_rest_handed_to_hyper() {
        for (head, want) in [
            (
                &b"GET /a?b=1 HTTP/1.1\r\nhost: r\r\nx-canary-user: true\r\n\r\n"[..],
                "take",
            ),
            (b"HEAD / HTTP/1.1\r\nhost: r\r\n\r\n", "take"),
            (
                b"DELETE /o/1 HTTP/1.1\r\nhost: r\r\nContent-Length: 0\r\n\r\n",
                "take",
            ),
            (b"GET http://r/a HTTP/1.1\r\n\r\n", "take"),
            (
                b"POST /o HTTP/1.1\r\nhost: r\r\ncontent-length: 5\r\n\r\nhello",
                "hand",
            ),
            (
                b"POST /o HTTP/1.1\r\nhost: r\r\nTransfer-Encoding: chunked\r\n\r\n",
                "hand",
            ),
            (
                b"PUT /o HTTP/1.1\r\nhost: r\r\nexpect: 100-continue\r\n\r\n",
                "hand",
            ),
            (
                b"GET /ws HTTP/1.1\r\nhost: r\r\nupgrade: websocket\r\n\r\n",
                "hand",
            ),
            (b"CONNECT r:443 HTTP/1.1\r\nhost: r\r\n\r\n", "hand"),
            (b"GET / HTTP/1.0\r\n\r\n", "hand"),
            // Two lengths, one of them 0: hyper's to refuse.
            (
                b"GET / HTTP/1.1\r\ncontent-length: 0\r\ncontent-length: 4\r\n\r\n",
                "hand",
            ),
            (b"GET / HTTP/1.1\r\nhost: r\r\n", "incomplete"),
            (b"", "incomplete"),
            (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "400"),
            (b"GET / HTTP/1.1\r\nbad\x01name: v\r\n\r\n", "400"),
        ] {
            assert_eq!(outcome(head), want, "{}", String::from_utf8_lossy(head));
        }
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        assert_eq!(
            outcome(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            "431"
        );
    }

    #[test]
    fn a_taken_head_keeps_its_method_target_and_fields() {
        let raw = b"GET /p?q=1 HTTP/1.1\r\nHost: reviews:9080\r\nX-A: 1\r\nx-a: 2\r\n\r\nGET /next";
        let Ok(Some(Parsed::Take(head))) = parse_request(raw) else {
            panic!("not taken");
        };
        assert_eq!(head.len, raw.len() - b"GET /next".len());
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri, "/p?q=1");
        assert_eq!(head.headers["host"], "reviews:9080");
        let a: Vec<_> = head.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
    }
}
