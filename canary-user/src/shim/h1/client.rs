//! The client side: HTTP/1.1 to an upstream, driven by the request's own
//! task.
//!
//! hyper's client runs every connection as a task of its own and hands
//! each request to it through a channel, and the response back through
//! another: two task hand-offs and a wake-up per request, on a path whose
//! every other step is one system call. Here the request's future writes
//! the head (and the body) and reads the response head itself, and the
//! response body owns the connection while it streams, putting it back
//! in the pool when the body has ended cleanly.
//!
//! What it speaks (RFC 9112): a request with `Content-Length`, chunked
//! (when the length is unknown) or no body; responses framed by
//! `Content-Length`, chunked (trailers kept) or the connection's end, and
//! none for HEAD, 1xx, 204 and 304; interim 1xx responses are skipped. A
//! connection is reused only after a complete HTTP/1.1 response without
//! `Connection: close`, with no bytes left over, and with the whole
//! request sent.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;

use super::wire::{
    Chunk, MAX_HEAD, MAX_HEADERS, Step, chunk_step, has_token, header_map, poll_read_more,
    put_chunk, put_fields, put_last_chunk, read_more, take_data,
};
use crate::shim::body::{BoxError, ReqBody};
use crate::shim::upstream::{Key, Pool};

/// One upstream HTTP/1.1 connection, idle in the pool or in use by one
/// request.
pub(crate) struct Conn {
    io: TcpStream,
    /// Bytes read and not consumed yet (empty while pooled).
    buf: BytesMut,
}

/// Why an exchange failed.
pub(crate) enum Failure {
    /// Nothing of the request went out (say, the pooled connection was
    /// closed); the request is still the caller's.
    NotSent(io::Error),
    /// The request went out, at least in part; the response did not come.
    Broken(BoxError),
}

/// Where a connection goes back when its response has ended.
pub(crate) struct Home {
    pub pool: Arc<Pool>,
    pub key: Key,
    pub idle_timeout: Duration,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether the connection still looks usable: no end of stream and no
    /// stray bytes from the server since its last response. Costs no
    /// system call unless the socket became readable meanwhile.
    pub fn is_open(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: an end of stream, or bytes nobody asked for (a
            // reused connection must have none); or readiness left over
            // from the last read, cleared by this one.
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends the request in `req` and reads the response head. `req` is
    /// taken once the first bytes of its head are out, and its head goes
    /// to `sent` (the caller may send it again); on `NotSent` it is still
    /// in `req`. The body of the returned response owns the connection and
    /// sends it `home` when it has ended cleanly.
    pub async fn send(
        mut self,
        req: &mut Option<Request<ReqBody>>,
        sent: &mut Option<Parts>,
        home: Home,
    ) -> Result<Response<H1Body>, Failure> {
        let Some(r) = req.as_ref() else {
            return Err(Failure::Broken("no request to send".into()));
        };
        let head_only = r.method() == Method::HEAD;
        let (mut head, framing) = encode_head(r);
        let body_empty = r.body().is_end_stream();
        // The first write tells a connection the server has closed (it
        // fails at once) from one that takes the request.
        let written = match self.io.write(&head).await {
            Ok(0) => return Err(Failure::NotSent(io::ErrorKind::WriteZero.into())),
            Err(e) => return Err(Failure::NotSent(e)),
            Ok(n) => n,
        };
        let Some(request) = req.take() else {
            return Err(Failure::Broken("no request to send".into()));
        };
        head.drain(..written);
        if !head.is_empty()
            && let Err(e) = self.io.write_all(&head).await
        {
            return Err(Failure::Broken(e.into()));
        }
        let (parts, body) = request.into_parts();
        *sent = Some(parts);
        let (resp_head, whole_request_sent) = if body_empty {
            drop(body);
            (read_head(&mut self.io, &mut self.buf).await, true)
        } else {
            // Boxed: only requests with a body need this, and every
            // request's future would otherwise carry its size.
            match Box::pin(send_body(&mut self, body, framing)).await {
                First::Sent(Err(e)) => return Err(Failure::Broken(e)),
                First::Sent(Ok(())) => (read_head(&mut self.io, &mut self.buf).await, true),
                First::Early(head) => (head, false),
            }
        };
        let head = resp_head.map_err(Failure::Broken)?;
        let framing = response_framing(&head, head_only)?;
        // A body that runs to the connection's end uses it up; after a 101
        // the connection speaks another protocol (the shim strips
        // `Upgrade`, so none should come).
        let reusable = whole_request_sent
            && head.keep_alive
            && framing != Framing::Eof
            && head.status != StatusCode::SWITCHING_PROTOCOLS;
        let mut resp = Response::new(H1Body {
            conn: Some(self),
            framing,
            reusable,
            home: Some(home),
        });
        *resp.status_mut() = head.status;
        *resp.version_mut() = Version::HTTP_11;
        *resp.headers_mut() = head.headers;
        resp.body_mut().release_if_done();
        Ok(resp)
    }
}

/// Sends the request body while watching for an early response (a server
/// may answer, say 413, before reading it all).
async fn send_body(conn: &mut Conn, mut body: ReqBody, framing: ReqFraming) -> First {
    let (mut rd, mut wr) = conn.io.split();
    tokio::select! {
        sent = write_body(&mut wr, &mut body, framing) => First::Sent(sent),
        early = read_head(&mut rd, &mut conn.buf) => First::Early(early),
    }
}

/// Which finished first while a request body was being sent.
enum First {
    Sent(Result<(), BoxError>),
    Early(Result<Head, BoxError>),
}

/// How a request body goes on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReqFraming {
    /// As is: `Content-Length` (the client's, or its exact size) or none.
    Raw,
    Chunked,
}

/// The request head in wire form, and how its body follows it.
fn encode_head(req: &Request<ReqBody>) -> (Vec<u8>, ReqFraming) {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let h = req.headers();
    let mut out = Vec::with_capacity(
        req.method().as_str().len()
            + pq.len()
            + 12
            + h.iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>()
            + 40,
    );
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(pq.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_fields(&mut out, h);
    let body = req.body();
    let framing = if h.contains_key(header::CONTENT_LENGTH) {
        ReqFraming::Raw
    } else if body.is_end_stream() {
        // A request that usually carries a body says it has none.
        if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        ReqFraming::Raw
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        ReqFraming::Raw
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        ReqFraming::Chunked
    };
    out.extend_from_slice(b"\r\n");
    (out, framing)
}

async fn write_body<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    body: &mut ReqBody,
    framing: ReqFraming,
) -> Result<(), BoxError> {
    let mut body = Pin::new(body);
    // A chunk's framing and data go out in one write.
    let mut chunk = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            if framing == ReqFraming::Chunked {
                chunk.clear();
                put_chunk(&mut chunk, data);
                wr.write_all(&chunk).await?;
            } else {
                wr.write_all(data).await?;
            }
        } else if let Some(trailers) = frame.trailers_ref()
            && framing == ReqFraming::Chunked
        {
            chunk.clear();
            put_last_chunk(&mut chunk, Some(trailers));
            wr.write_all(&chunk).await?;
            return wr.flush().await.map_err(Into::into);
        }
    }
    if framing == ReqFraming::Chunked {
        chunk.clear();
        put_last_chunk(&mut chunk, None);
        wr.write_all(&chunk).await?;
    }
    wr.flush().await.map_err(Into::into)
}

/// A parsed response head.
pub(super) struct Head {
    status: StatusCode,
    headers: HeaderMap,
    /// HTTP/1.1 without `Connection: close` (HTTP/1.0 is never reused).
    keep_alive: bool,
}

/// Reads until a final (non-1xx) response head is complete, consuming it
/// (and any interim 1xx heads) from `buf`.
async fn read_head<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> Result<Head, BoxError> {
    loop {
        if !buf.is_empty() {
            match parse_head(buf)? {
                Some(head) if head.status.is_informational() && head.status.as_u16() != 101 => {
                    continue;
                }
                Some(head) => return Ok(head),
                None if buf.len() >= MAX_HEAD => {
                    return Err(format!("response head over {MAX_HEAD} bytes").into());
                }
                None => {}
            }
        }
        if read_more(rd, buf).await? == 0 {
            return Err(if buf.is_empty() {
                "connection closed before the response".into()
            } else {
                "connection closed within the response head".into()
            });
        }
    }
}

/// Parses a complete head at the start of `buf` and consumes it; `None`
/// if more bytes are needed.
pub(super) fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, BoxError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad response head: {e}").into()),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| format!("bad response status {:?}", resp.code))?;
    let http11 = resp.version == Some(1);
    let headers = header_map(resp.headers, "response header")?;
    buf.advance(len);
    let keep_alive = http11 && !has_token(&headers, header::CONNECTION, "close");
    Ok(Some(Head {
        status,
        headers,
        keep_alive,
    }))
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// This many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Until the connection ends.
    Eof,
    Done,
}

fn response_framing(head: &Head, head_only: bool) -> Result<Framing, Failure> {
    let s = head.status.as_u16();
    if head_only || s == 204 || s == 304 || head.status.is_informational() {
        return Ok(Framing::Done);
    }
    let h = &head.headers;
    if h.contains_key(header::TRANSFER_ENCODING) {
        // Chunked must be the last coding; otherwise the body runs to the
        // connection's end.
        let last = h
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunk::Size),
            _ => Framing::Eof,
        });
    }
    let mut length: Option<u64> = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let n: u64 = part.trim().parse().map_err(|_| {
                Failure::Broken(format!("bad response content-length {v:?}").into())
            })?;
            if length.is_some_and(|l| l != n) {
                return Err(Failure::Broken(
                    "response content-length values differ".into(),
                ));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
        None => Framing::Eof,
    })
}

/// A response body read from its connection, which it owns until the
/// body has ended.
pub(crate) struct H1Body {
    conn: Option<Conn>,
    framing: Framing,
    /// Whether the connection may carry another request once this body
    /// has ended.
    reusable: bool,
    home: Option<Home>,
}

impl H1Body {
    /// Once the body has ended: the connection goes back to its pool if
    /// it can be reused, and is closed otherwise.
    fn release_if_done(&mut self) {
        if self.framing != Framing::Done {
            return;
        }
        let conn = self.conn.take();
        if let (Some(conn), Some(home)) = (conn, self.home.take())
            && self.reusable
            && conn.buf.is_empty()
        {
            home.pool.put_back_h1(home.key, conn, home.idle_timeout);
        }
    }

    fn next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.buf;
            // What the buffer already holds, first.
            match &mut self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(left) if !buf.is_empty() => {
                    let data = take_data(buf, *left);
                    *left -= data.len() as u64;
                    if *left == 0 {
                        self.framing = Framing::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Eof if !buf.is_empty() => {
                    let data = take_data(buf, u64::MAX);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) if !buf.is_empty() => match chunk_step(state, buf) {
                    Ok(Step::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    Ok(Step::Trailers(t)) => {
                        self.framing = Framing::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Step::End) => {
                        self.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::Progress) => continue,
                    Ok(Step::NeedMore) => {}
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
                _ => {}
            }
            let n = match ready!(poll_read_more(Pin::new(&mut conn.io), cx, buf)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            };
            if n == 0 {
                return match self.framing {
                    Framing::Eof => {
                        self.framing = Framing::Done;
                        Poll::Ready(None)
                    }
                    _ => Poll::Ready(Some(Err("upstream closed the connection within the \
                                               response body"
                        .into()))),
                };
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(this.next_frame(cx));
        match &frame {
            Some(Ok(_)) | None => this.release_if_done(),
            // A broken body: the connection goes with it.
            Some(Err(_)) => {
                this.conn = None;
                this.framing = Framing::Done;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
