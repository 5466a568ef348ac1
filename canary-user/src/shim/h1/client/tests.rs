//! HTTP/1.1 upstream exchanges against scripted servers on loopback: what
//! goes on the wire, how each response framing is read, and when a
//! connection goes back to the pool.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::shim::upstream::Limits;
use http::HeaderValue;

/// A server that answers each request it reads (head, and a body of
/// `content-length` or chunked) with the next of `replies`, on one
/// connection; then keeps the connection open until the client closes
/// it. Returns what it read, request by request.
async fn scripted(
    replies: Vec<&'static [u8]>,
) -> (SocketAddr, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut seen = Vec::new();
        let mut buf = Vec::new();
        for reply in replies {
            let req = read_request(&mut s, &mut buf).await;
            seen.push(req);
            s.write_all(reply).await.expect("reply");
        }
        // Until the client hangs up.
        let mut rest = [0u8; 64];
        while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
        seen
    });
    (addr, task)
}

/// Reads one request (head and body) from `s`; `buf` keeps what was read
/// beyond it.
async fn read_request(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map(|v| v.trim().parse::<usize>().expect("length"));
            let total = if let Some(n) = body_len {
                end + 4 + n
            } else if head.contains("transfer-encoding: chunked") {
                // The last chunk, then the (possibly empty) trailers.
                let last = buf.windows(5).position(|w| w == b"\r\n0\r\n");
                let end = last.and_then(|p| {
                    buf[p + 3..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|q| p + 3 + q + 4)
                });
                end.unwrap_or(usize::MAX)
            } else {
                end + 4
            };
            if buf.len() >= total {
                return buf.drain(..total).collect();
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "client closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn pool_and_key(addr: SocketAddr) -> (Arc<Pool>, Key, Limits) {
    let key = Key {
        netns: 0,
        addr,
        h2: false,
    };
    let limits = Limits {
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
    };
    (Pool::new(4), key, limits)
}

fn home(pool: &Arc<Pool>, key: Key) -> Home {
    Home {
        pool: pool.clone(),
        key,
        idle_timeout: Duration::from_secs(60),
    }
}

fn get(path: &str) -> Request<ReqBody> {
    let mut r = Request::new(ReqBody::Empty);
    *r.uri_mut() = path.parse().expect("uri");
    r.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("reviews"));
    r
}

async fn exchange(
    conn: Conn,
    req: Request<ReqBody>,
    home: Home,
) -> (Response<H1Body>, Bytes, Option<HeaderMap>) {
    let (method, uri, headers) = (
        req.method().clone(),
        req.uri().clone(),
        req.headers().clone(),
    );
    let mut sent = None;
    let resp = match conn.send(&mut Some(req), &mut sent, home).await {
        Ok(r) => r,
        Err(Failure::NotSent(e)) => panic!("not sent: {e}"),
        Err(Failure::Broken(e)) => panic!("broken: {e}"),
    };
    // The head written comes back whole, for a retry to send again.
    let sent = sent.expect("the sent head handed back");
    assert_eq!(
        (sent.method, sent.uri, sent.headers),
        (method, uri, headers)
    );
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    (
        Response::from_parts(parts, empty_body()),
        collected.to_bytes(),
        trailers,
    )
}

/// A stand-in body for a response whose body was read already.
fn empty_body() -> H1Body {
    H1Body {
        conn: None,
        framing: Framing::Done,
        reusable: false,
        home: None,
    }
}

async fn connect(addr: SocketAddr) -> Conn {
    Conn::new(tokio::net::TcpStream::connect(addr).await.expect("connect"))
}

#[tokio::test]
async fn a_content_length_response_is_read_and_its_connection_reused() {
    let (addr, server) = scripted(vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-pod: v1\r\n\r\nhello",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    ])
    .await;
    let (pool, key, _) = pool_and_key(addr);
    let (resp, body, _) = exchange(connect(addr).await, get("/a?x=1"), home(&pool, key)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-pod"], "v1");
    assert_eq!(body, "hello");
    let again = pool
        .take_h1(&key)
        .expect("the connection went back to the pool");
    let (resp, body, _) = exchange(again, get("/b"), home(&pool, key)).await;
    assert_eq!(resp.status(), 404);
    assert!(body.is_empty());
    let conn = pool.take_h1(&key).expect("pooled again");
    drop(conn);
    let seen = server.await.expect("server");
    assert_eq!(
        String::from_utf8_lossy(&seen[0]),
        "GET /a?x=1 HTTP/1.1\r\nhost: reviews\r\n\r\n"
    );
    assert!(seen[1].starts_with(b"GET /b HTTP/1.1\r\n"));
}

#[tokio::test]
async fn a_chunked_response_keeps_its_data_and_trailers() {
    let (addr, _server) = scripted(vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\ngrpc-status: 0\r\n\r\n",
    ])
    .await;
    let (pool, key, _) = pool_and_key(addr);
    let (_, body, trailers) = exchange(connect(addr).await, get("/"), home(&pool, key)).await;
    assert_eq!(body, "hello, world");
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    assert!(pool.take_h1(&key).is_some(), "reused after the last chunk");
}

#[tokio::test]
async fn a_body_to_the_connection_end_and_connection_close_are_not_reused() {
    let (addr, _server) = scripted(vec![
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
    ])
    .await;
    let (pool, key, _) = pool_and_key(addr);
    let (_, body, _) = exchange(connect(addr).await, get("/"), home(&pool, key)).await;
    assert_eq!(body, "ok");
    assert!(pool.take_h1(&key).is_none(), "connection: close");

    // No length: the body runs until the server closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        read_request(&mut s, &mut Vec::new()).await;
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            .await
            .expect("write");
    });
    let (pool, key, _) = pool_and_key(addr);
    let (_, body, _) = exchange(connect(addr).await, get("/"), home(&pool, key)).await;
    assert_eq!(body, "until the end");
    assert!(pool.take_h1(&key).is_none());
}

#[tokio::test]
async fn interim_responses_are_skipped_and_head_has_no_body() {
    let (addr, _server) = scripted(vec![
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
    ])
    .await;
    let (pool, key, _) = pool_and_key(addr);
    let (resp, body, _) = exchange(connect(addr).await, get("/"), home(&pool, key)).await;
    assert_eq!((resp.status().as_u16(), &body[..]), (200, &b"yes"[..]));
    let conn = pool.take_h1(&key).expect("pooled");
    let mut head = get("/");
    *head.method_mut() = Method::HEAD;
    let (resp, body, _) = exchange(conn, head, home(&pool, key)).await;
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], "1000");
    assert!(body.is_empty());
    assert!(
        pool.take_h1(&key).is_some(),
        "a HEAD response ends at its head"
    );
}

#[tokio::test]
async fn a_body_of_unknown_length_goes_chunked_and_a_known_one_with_its_length() {
    let (addr, server) = scripted(vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    ])
    .await;
    let (pool, key, _) = pool_and_key(addr);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", HeaderValue::from_static("7"));
    let mut post = get("/orders");
    *post.method_mut() = Method::POST;
    *post.body_mut() = ReqBody::Replay {
        chunks: VecDeque::from([Bytes::from_static(b"abc"), Bytes::from_static(b"defg")]),
        trailers: Some(trailers),
    };
    exchange(connect(addr).await, post, home(&pool, key)).await;
    let conn = pool.take_h1(&key).expect("pooled");
    let mut put = get("/orders/1");
    *put.method_mut() = Method::PUT;
    *put.body_mut() = ReqBody::Replay {
        chunks: VecDeque::from([Bytes::from_static(b"abc"), Bytes::from_static(b"defg")]),
        trailers: None,
    };
    exchange(conn, put, home(&pool, key)).await;
    drop(pool);
    let seen = server.await.expect("server");
    assert_eq!(
        String::from_utf8_lossy(&seen[0]),
        "POST /orders HTTP/1.1\r\nhost: reviews\r\ntransfer-encoding: chunked\r\n\r\n\
         3\r\nabc\r\n4\r\ndefg\r\n0\r\nx-sum: 7\r\n\r\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&seen[1]),
        "PUT /orders/1 HTTP/1.1\r\nhost: reviews\r\ncontent-length: 7\r\n\r\nabcdefg"
    );
}

#[tokio::test]
async fn an_early_response_is_returned_and_its_connection_not_reused() {
    // The server answers without reading a body too big for the socket
    // buffers, and keeps the connection open.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut head = [0u8; 256];
        let _ = s.read(&mut head).await;
        s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
            .await
            .expect("write");
        let _ = stop_rx.await;
    });
    let (pool, key, _) = pool_and_key(addr);
    let mut post = get("/upload");
    *post.method_mut() = Method::POST;
    let big = Bytes::from(vec![b'x'; 64 << 20]);
    *post.body_mut() = ReqBody::Replay {
        chunks: VecDeque::from([big]),
        trailers: None,
    };
    let (resp, _, _) = exchange(connect(addr).await, post, home(&pool, key)).await;
    assert_eq!(resp.status(), 413);
    assert!(
        pool.take_h1(&key).is_none(),
        "the request body was cut short"
    );
    let _ = stop_tx.send(());
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_not_taken() {
    let (addr, server) = scripted(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
    let (pool, key, _) = pool_and_key(addr);
    exchange(connect(addr).await, get("/"), home(&pool, key)).await;
    // The server has answered its one reply; make it hang up.
    server.abort();
    let _ = server.await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // The reactor learns of the end of stream on its next turn.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut shard = pool.lock(&key);
        let Some(crate::shim::upstream::Idle::H1(list)) = shard.get_mut(&key) else {
            panic!("the connection was pooled");
        };
        if !list[0].0.is_open() {
            break;
        }
        drop(shard);
        assert!(
            Instant::now() < deadline,
            "the closed connection still looks open"
        );
    }
    assert!(pool.take_h1(&key).is_none());
}

#[tokio::test]
async fn a_malformed_response_fails_the_exchange() {
    for reply in [
        &b"HTTP/1.1 abc OK\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let (addr, _server) = scripted(vec![reply]).await;
        let (pool, key, _) = pool_and_key(addr);
        let result = match connect(addr)
            .await
            .send(&mut Some(get("/")), &mut None, home(&pool, key))
            .await
        {
            Ok(resp) => resp.into_body().collect().await.map(|_| ()),
            Err(Failure::Broken(e)) => Err(e),
            Err(Failure::NotSent(e)) => panic!("not sent: {e}"),
        };
        assert!(result.is_err(), "{}", String::from_utf8_lossy(reply));
        assert!(pool.take_h1(&key).is_none());
    }
}
