//! The shim's own HTTP/1.1 server path (`h1::serve`) on the wire: raw
//! request bytes in, raw response bytes out, as curl or wrk send them.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A response as it came off the wire.
struct Raw {
    /// Status line and header fields, lower-cased.
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn status(&self) -> u16 {
        self.head[9..12].parse().expect("status")
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
    }
}

/// A raw client connection to the shim.
struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    async fn open(w: &World) -> Wire {
        Wire {
            s: TcpStream::connect(w.front).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Reads one response; `head_only` for the answer to a HEAD.
    async fn response(&mut self, head_only: bool) -> Raw {
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            assert!(
                self.fill().await,
                "connection closed before a response head"
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        self.buf.drain(..end);
        let mut raw = Raw {
            head,
            body: Vec::new(),
        };
        if head_only {
            return raw;
        }
        if raw.header("transfer-encoding") == Some("chunked") {
            loop {
                let line = loop {
                    if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    assert!(self.fill().await, "closed in a chunked body");
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&self.buf[..line]).expect("size"),
                    16,
                )
                .expect("hex size");
                self.buf.drain(..line + 2);
                if size == 0 {
                    // Trailers, kept in the head for the checks.
                    let end = loop {
                        if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n")
                            && (p == 0 || self.buf[..p + 2].ends_with(b"\r\n\r\n"))
                        {
                            break p + 2;
                        }
                        if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        assert!(self.fill().await, "closed in the trailers");
                    };
                    raw.head
                        .push_str(&String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase());
                    self.buf.drain(..end);
                    return raw;
                }
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "closed in a chunk");
                }
                raw.body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
            }
        }
        let len: usize = raw
            .header("content-length")
            .map(|v| v.parse().expect("length"))
            .unwrap_or(0);
        while self.buf.len() < len {
            assert!(self.fill().await, "closed in the body");
        }
        raw.body = self.buf.drain(..len).collect();
        raw
    }

    /// Whether the shim closed the connection (after what was read).
    async fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

async fn composite(net: u8) -> (World, [Backend; 3]) {
    let pods = pods(net, None, None).await;
    let cfg = load(&localize(&examples("composite-routing"), net));
    (World::new(cfg, ShimOptions::default(), None).await, pods)
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: {AUTHORITY}\r\n{extra}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_head_gets_no_body() {
    let (w, _pods) = composite(40).await;
    let mut c = Wire::open(&w).await;
    let mut all = get("/a", "x-canary-user: true\r\n");
    all.push_str(&get("/b", ""));
    all.push_str(&format!(
        "HEAD /c HTTP/1.1\r\nhost: {AUTHORITY}\r\nx-canary-user: true\r\n\r\n"
    ));
    all.push_str(&get("/d", "x-canary-user: true\r\n"));
    c.send(all.as_bytes()).await;
    let a = c.response(false).await;
    assert_eq!((a.status(), a.header("x-backend")), (200, Some("v2-a")));
    assert_eq!(a.body, b"v2-a");
    assert!(a.header("date").is_some(), "{}", a.head);
    let b = c.response(false).await;
    assert_eq!(b.status(), 200);
    let head = c.response(true).await;
    assert_eq!(head.header("content-length"), Some("4"), "{}", head.head);
    // Had HEAD's answer carried a body, this would read it as a head.
    let d = c.response(false).await;
    assert_eq!((d.status(), &d.body[..]), (200, &b"v2-a"[..]));
    assert_eq!(w.recorder.records().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_hands_the_connection_to_hyper() {
    let (w, [_a, _b, v2]) = composite(41).await;
    let mut c = Wire::open(&w).await;
    c.send(get("/first", "x-canary-user: true\r\n").as_bytes())
        .await;
    assert_eq!(c.response(false).await.status(), 200);
    c.send(
        format!(
            "POST /orders HTTP/1.1\r\nhost: {AUTHORITY}\r\nx-canary-user: true\r\n\
             content-length: 5\r\n\r\nhello"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.response(false).await.status(), 200);
    // hyper serves the rest of the connection.
    c.send(get("/after", "x-canary-user: true\r\n").as_bytes())
        .await;
    assert_eq!(c.response(false).await.status(), 200);
    let seen = v2.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/first", "/orders", "/after"]);
    assert_eq!(seen[1].body, "hello");
    // And an HTTP/1.0 request is hyper's from the start.
    let mut old = Wire::open(&w).await;
    old.send(
        format!("GET /old HTTP/1.0\r\nhost: {AUTHORITY}\r\nx-canary-user: true\r\n\r\n").as_bytes(),
    )
    .await;
    let r = old.response(false).await;
    assert!(r.head.starts_with("http/1.0 200"), "{}", r.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_heads_are_refused_and_closed() {
    let (w, _pods) = composite(42).await;
    let mut c = Wire::open(&w).await;
    c.send(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status(), 400);
    assert!(c.closed().await);

    let mut c = Wire::open(&w).await;
    let huge = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    c.send(get("/", &huge).as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status(), 431);
    assert!(c.closed().await);
    assert!(w.recorder.records().is_empty(), "refused before routing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_is_honoured() {
    let (w, _pods) = composite(43).await;
    let mut c = Wire::open(&w).await;
    c.send(get("/", "connection: close\r\n").as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed().await);
}

/// A v2 pod that answers every request with a chunked body and a
/// trailer (hyper's servers send trailers only to a client that asked with
/// `te: trailers`, and the shim does not forward `te` on HTTP/1.1).
async fn chunked_pod(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.expect("bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..p + 4);
                        let reply = b"HTTP/1.1 200 OK\r\nx-backend: v2-a\r\n\
                            transfer-encoding: chunked\r\n\r\n\
                            7\r\nhello, \r\n5\r\nworld\r\n0\r\nx-checksum: 42\r\n\r\n";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_of_unknown_length_goes_back_chunked_with_its_trailers() {
    let net = 44;
    let _v1 = [
        backend(pod(net, 11), "v1-a", None).await,
        backend(pod(net, 12), "v1-b", None).await,
    ];
    chunked_pod(pod(net, 21)).await;
    let cfg = load(&localize(&examples("composite-routing"), net));
    let w = World::new(cfg, ShimOptions::default(), None).await;
    let mut c = Wire::open(&w).await;
    for _ in 0..2 {
        c.send(get("/stream", "x-canary-user: true\r\n").as_bytes())
            .await;
        let r = c.response(false).await;
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{}", r.head);
        assert_eq!(r.body, b"hello, world");
        assert!(r.head.contains("x-checksum: 42"), "{}", r.head);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_never_completes_is_closed_at_the_idle_timeout() {
    let net = 45;
    let _pods = pods(net, None, None).await;
    let cfg = load(&localize(&examples("composite-routing"), net));
    let options = ShimOptions {
        client_idle_timeout: Duration::from_millis(1000),
        ..ShimOptions::default()
    };
    let w = World::new(cfg, options, None).await;
    let mut c = Wire::open(&w).await;
    // A head that arrives in parts, well within the timeout, is served.
    c.send(b"GET /parts HTTP/1.1\r\nhost: ").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send(format!("{AUTHORITY}\r\n\r\n").as_bytes()).await;
    assert_eq!(c.response(false).await.status(), 200);
    // One that never completes is closed, unanswered.
    c.send(b"GET /slow HTTP/1.1\r\nhost: ").await;
    assert!(c.closed().await, "the shim answered a head it never got");
    assert_eq!(w.recorder.records().len(), 1);
}
