//! canary-http: an HTTP/1.1 keep-alive client for the L7 tests. Each
//! connection sends several requests; headers can carry the connection,
//! request and session numbers, so a test can drive sessions, header
//! routes and per-request splits, and see who answered.
//!
//! ```text
//! canary-http --target 10.96.0.10:8080 --connections 100 --requests 20
//!             [--concurrency 8] [--header 'x-canary-user: true' ...]
//!             [--sessions N]   # {s} in a header = session number, (c*R + r) % N
//!             [--path /] [--method GET] [--body TEXT] [--timeout-ms 15000]
//! ```
//!
//! `{c}` and `{r}` in a header value are the connection and request
//! numbers. Prints one JSON object (`canary_tests::httpclient::HttpReport`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use canary_tests::http::{Framing, HttpReader};
use canary_tests::httpclient::{HttpReport, Sample};
use canary_tests::net::error_kind;

struct Config {
    target: SocketAddr,
    connections: u64,
    requests: u64,
    concurrency: u64,
    headers: Vec<(String, String)>,
    sessions: u64,
    path: String,
    method: String,
    body: Option<String>,
    timeout: Duration,
}

fn main() -> ExitCode {
    let config = match parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("canary-http: {e:#}");
            return ExitCode::from(2);
        }
    };
    let report = Mutex::new(HttpReport::default());
    let next = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..config.concurrency.max(1) {
            scope.spawn(|| {
                loop {
                    let c = next.fetch_add(1, Ordering::Relaxed);
                    if c >= config.connections {
                        return;
                    }
                    let samples = connection(&config, c);
                    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                    for s in &samples {
                        r.record(s);
                    }
                }
            });
        }
    });
    let mut report = report.into_inner().unwrap_or_else(|e| e.into_inner());
    report.finish(started.elapsed());
    match serde_json::to_string(&report) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("canary-http: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One keep-alive connection: `requests` requests, or fewer if it breaks
/// (each request not sent counts as failed with the error).
fn connection(config: &Config, c: u64) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut stream = match TcpStream::connect_timeout(&config.target, config.timeout) {
        Ok(s) => s,
        Err(e) => {
            for _ in 0..config.requests {
                out.push(Sample::failed(error_kind(&e), None));
            }
            return out;
        }
    };
    let _ = stream.set_read_timeout(Some(config.timeout));
    let _ = stream.set_nodelay(true);
    let mut reader = HttpReader::new(stream.try_clone().expect("clone socket"));
    for r in 0..config.requests {
        let session = (config.sessions > 0).then(|| (c * config.requests + r) % config.sessions);
        let start = Instant::now();
        let result = exchange(config, &mut stream, &mut reader, c, r, session);
        let elapsed = start.elapsed();
        match result {
            Ok((status, version, pod)) => out.push(Sample {
                status: Some(status),
                version,
                pod,
                session: session.map(|s| format!("s{s}")),
                latency: elapsed,
                error: None,
            }),
            Err(e) => {
                out.push(Sample::failed(e, session.map(|s| format!("s{s}"))));
                // The connection is unusable after an error.
                for _ in r + 1..config.requests {
                    out.push(Sample::failed("not_sent".into(), None));
                }
                break;
            }
        }
    }
    out
}

fn render(template: &str, c: u64, r: u64, session: Option<u64>) -> String {
    let mut v = template
        .replace("{c}", &c.to_string())
        .replace("{r}", &r.to_string());
    if let Some(s) = session {
        v = v.replace("{s}", &s.to_string());
    }
    v
}

fn exchange(
    config: &Config,
    stream: &mut TcpStream,
    reader: &mut HttpReader<TcpStream>,
    c: u64,
    r: u64,
    session: Option<u64>,
) -> std::result::Result<(u16, Option<String>, Option<String>), String> {
    let mut req = format!(
        "{} {} HTTP/1.1\r\nhost: {}\r\n",
        config.method, config.path, config.target
    );
    for (name, value) in &config.headers {
        req.push_str(&format!("{name}: {}\r\n", render(value, c, r, session)));
    }
    let body = config.body.as_deref().unwrap_or("");
    if config.body.is_some() {
        req.push_str(&format!(
            "content-length: {}\r\ncontent-type: text/plain\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream
        .write_all(req.as_bytes())
        .map_err(|e| error_kind(&e))?;
    let head = match reader.read_head() {
        Ok(Some(h)) => h,
        Ok(None) => return Err("eof".into()),
        Err(e) => return Err(error_kind(&e)),
    };
    let status = head.status().ok_or("bad_response")?;
    let framing = head.response_framing().map_err(|e| error_kind(&e))?;
    let body = reader
        .read_body(framing, 1 << 20)
        .map_err(|e| error_kind(&e))?;
    if framing == Framing::Close {
        let _ = stream.read(&mut [0u8; 1]);
    }
    let text = String::from_utf8_lossy(&body);
    let mut words = text.split_whitespace();
    let (version, pod) = if (200..300).contains(&status) {
        (
            words.next().map(str::to_owned),
            words.next().map(str::to_owned),
        )
    } else {
        (None, None)
    };
    Ok((status, version, pod))
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Config> {
    let mut c = Config {
        target: "127.0.0.1:80".parse()?,
        connections: 1,
        requests: 1,
        concurrency: 1,
        headers: Vec::new(),
        sessions: 0,
        path: "/".into(),
        method: "GET".into(),
        body: None,
        timeout: Duration::from_secs(15),
    };
    let mut have_target = false;
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => {
                c.target = value()?.parse().context("--target: expected IP:PORT")?;
                have_target = true;
            }
            "--connections" => c.connections = value()?.parse()?,
            "--requests" => c.requests = value()?.parse()?,
            "--concurrency" => c.concurrency = value()?.parse()?,
            "--sessions" => c.sessions = value()?.parse()?,
            "--path" => c.path = value()?,
            "--method" => c.method = value()?,
            "--body" => c.body = Some(value()?),
            "--timeout-ms" => c.timeout = Duration::from_millis(value()?.parse()?),
            "--header" => {
                let h = value()?;
                let (n, v) = h
                    .split_once(':')
                    .with_context(|| format!("--header {h:?}: expected 'Name: value'"))?;
                c.headers.push((n.trim().to_owned(), v.trim().to_owned()));
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if !have_target {
        bail!("--target is required");
    }
    Ok(c)
}
