//! A real Prometheus server for tests: Debian's `prometheus` started on a
//! free loopback port with its own config and storage in a temporary
//! directory, scraping one target every second; queries through its HTTP
//! API; and `promtool check metrics`. Both binaries come with the Debian
//! package `prometheus`, which `cargo xtask setup` installs.
//!
//! [`Prometheus`] kills the server and removes its directory on drop, also
//! while a test panics. [`StaticServer`] serves fixed metrics text, to prove
//! the kit without an agent.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::ChildGuard;
use crate::http::HttpReader;

/// The Prometheus job name of the scraped target (`up{job="canary"}`).
pub const JOB: &str = "canary";

/// Largest API answer read.
const MAX_BODY: usize = 64 << 20;

const INSTALL_HINT: &str =
    "it comes with Debian's `prometheus` package, which `cargo xtask setup` installs";

/// One element of an instant vector: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// A running Prometheus server; killed, and its storage removed, on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Option<ChildGuard>,
    dir: PathBuf,
    addr: SocketAddr,
    target: SocketAddr,
}

/// A loopback HTTP server answering every GET with the same metrics text.
#[derive(Debug)]
pub struct StaticServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

// === impl Prometheus ===

impl Prometheus {
    /// Starts Prometheus on `127.0.0.1:<free port>` scraping
    /// `http://<target>/metrics` every second, and waits until it is ready
    /// (not until the first scrape: see [`wait_scraped`](Self::wait_scraped)).
    pub fn start(target: SocketAddr) -> Result<Self> {
        let mut last_err = None;
        // A free port can be taken between our probe and Prometheus's bind.
        for _ in 0..3 {
            match Self::start_once(target) {
                Ok(p) => return Ok(p),
                Err(e) if format!("{e:#}").contains("address already in use") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("Prometheus did not start")))
    }

    fn start_once(target: SocketAddr) -> Result<Self> {
        let dir = temp_dir()?;
        let addr = free_port().inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
        // Owns the directory from here on: an error below removes it.
        let mut prom = Prometheus {
            child: None,
            dir,
            addr,
            target,
        };
        let config = prom.dir.join("prometheus.yml");
        std::fs::write(&config, scrape_config(target))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = std::fs::File::create(prom.log_path())?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        prom.child = Some(
            crate::spawn_in(cmd, None, None)
                .with_context(|| format!("starting prometheus: {INSTALL_HINT}"))?,
        );
        prom.wait_ready(Duration::from_secs(30))?;
        Ok(prom)
    }

    /// The server's process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The scraped `host:port`.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The temporary directory (config, storage, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("prometheus.log")
    }

    /// Prometheus's own log, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("prometheus exited ({status}):\n{}", self.log_text());
            }
            if let Ok((200, _)) = http_get(self.addr, "/-/ready") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "prometheus on {} not ready after {timeout:?}:\n{}",
                    self.addr,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs an instant query now; a vector or scalar answer as samples (a
    /// scalar has no labels).
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, body) = http_get(self.addr, &path)
            .with_context(|| format!("querying prometheus on {}", self.addr))?;
        parse_query_answer(status, &body).with_context(|| format!("query {promql}"))
    }

    /// Polls `promql` until `done` accepts the answer, for at most
    /// `timeout`; the error quotes the last answer.
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(&[Sample]) -> bool,
    ) -> Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.query(promql);
            if let Ok(samples) = &answer
                && done(samples)
            {
                return answer;
            }
            if Instant::now() >= deadline {
                bail!("{promql} after {timeout:?}: {answer:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until Prometheus has scraped the target successfully
    /// (`up == 1`).
    pub fn wait_scraped(&self, timeout: Duration) -> Result<()> {
        let up = format!("up{{job=\"{JOB}\"}}");
        self.wait_for(&up, timeout, |s| s.iter().any(|(_, v)| *v == 1.0))
            .with_context(|| {
                format!(
                    "prometheus never scraped {} ({}/api/v1/targets tells why)",
                    self.target, self.addr
                )
            })?;
        Ok(())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // The process first: it writes into the directory.
        drop(self.child.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scrape_config(target: SocketAddr) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    \
         static_configs:\n      - targets: ['{target}']\n"
    )
}

fn temp_dir() -> Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "canary-prometheus-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    // Left over from a killed run with a reused pid.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn free_port() -> Result<SocketAddr> {
    let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(probe.local_addr()?)
}

/// The samples of a `/api/v1/query` answer.
fn parse_query_answer(status: u16, body: &str) -> Result<Vec<Sample>> {
    let json: Value =
        serde_json::from_str(body).with_context(|| format!("HTTP {status}, not JSON: {body}"))?;
    if json["status"] != "success" {
        bail!(
            "HTTP {status}: {} {}",
            json["errorType"].as_str().unwrap_or("?"),
            json["error"].as_str().unwrap_or(body)
        );
    }
    let data = &json["data"];
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .context("vector without result")?
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .context("sample without metric")?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                Ok((labels, sample_value(&s["value"])?))
            })
            .collect(),
        Some("scalar") => Ok(vec![(BTreeMap::new(), sample_value(&data["result"])?)]),
        other => bail!("result type {other:?} is not an instant vector or scalar: {body}"),
    }
}

/// `[<unix time>, "<value>"]`; the value may be `NaN` or `+Inf`.
fn sample_value(pair: &Value) -> Result<f64> {
    let text = pair[1]
        .as_str()
        .with_context(|| format!("bad sample {pair}"))?;
    text.parse()
        .with_context(|| format!("bad sample value {text:?}"))
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A GET over one connection; the status and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = HttpReader::new(stream);
    let head = reader
        .read_head()?
        .context("connection closed before a response")?;
    let status = head.status().context("not an HTTP response")?;
    let body = reader.read_body(head.response_framing()?, MAX_BODY)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

// === promtool ===

/// The findings of promtool's naming lint that Istio's own names cause:
/// its duration histogram is in milliseconds by name (Envoy's choice), and
/// canary's mirror twin of it keeps the same unit so the two compare
/// directly. Every other finding is a failure.
pub const EXPECTED_FINDINGS: &[&str] = &[
    r#"istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds""#,
    r#"canary_mirror_request_duration_milliseconds use base unit "seconds" instead of "milliseconds""#,
];

/// Runs `promtool check metrics` on `metrics_text`: an error if the text
/// does not parse, or if the naming lint finds anything beyond
/// [`EXPECTED_FINDINGS`].
pub fn promtool_check(metrics_text: &str) -> Result<()> {
    let unexpected: Vec<String> = promtool_findings(metrics_text)?
        .into_iter()
        .filter(|f| !EXPECTED_FINDINGS.contains(&f.as_str()))
        .collect();
    if !unexpected.is_empty() {
        bail!("promtool check metrics:\n{}", unexpected.join("\n"));
    }
    Ok(())
}

/// The lint findings of `promtool check metrics` on `metrics_text`, one a
/// line; an error if the text does not parse (or promtool cannot run).
pub fn promtool_findings(metrics_text: &str) -> Result<Vec<String>> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running promtool: {INSTALL_HINT}"))?;
    let mut stdin = child.stdin.take().context("promtool stdin")?;
    // Written from a thread: promtool may answer before reading it all.
    let text = metrics_text.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().context("waiting for promtool")?;
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits 3 when the text parsed but the lint found something,
    // 1 when it did not parse.
    match out.status.code() {
        Some(0) | Some(3) if !output.contains("error while linting") => {
            written.context("writing to promtool")?;
            Ok(output
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect())
        }
        _ => bail!("promtool check metrics: {}\n{}", out.status, output.trim()),
    }
}

// === impl StaticServer ===

impl StaticServer {
    /// Serves `body` as Prometheus text on `127.0.0.1:<free port>` until
    /// dropped.
    pub fn start(body: impl Into<String>) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let body: Arc<str> = body.into().into();
        let thread = {
            let (stop, requests) = (stop.clone(), requests.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    // A client that misbehaves only loses its own answer.
                    if let Ok(stream) = conn
                        && serve_one(stream, &body).is_ok()
                    {
                        requests.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        Ok(StaticServer {
            addr,
            stop,
            requests,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_one(stream: TcpStream, body: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = HttpReader::new(stream);
    let Some(head) = reader.read_head()? else {
        return Err(io::ErrorKind::UnexpectedEof.into());
    };
    let mut stream = reader.get_ref();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if head.start_parts().0 != "HEAD" {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_promql_for_a_query_string() {
        assert_eq!(
            url_encode(r#"sum(rate(x{a=~"5.."}[1m])) by (le)"#),
            "sum%28rate%28x%7Ba%3D~%225..%22%7D%5B1m%5D%29%29%20by%20%28le%29"
        );
    }

    #[test]
    fn parses_vector_scalar_and_error_answers() -> Result<()> {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"up","job":"canary"},"value":[1700000000.1,"1"]},
            {"metric":{},"value":[1700000000.1,"NaN"]},
            {"metric":{"le":"+Inf"},"value":[1700000000.1,"+Inf"]}]}}"#;
        let samples = parse_query_answer(200, vector)?;
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].0["job"], "canary");
        assert_eq!(samples[0].1, 1.0);
        assert!(samples[1].1.is_nan());
        assert_eq!(samples[2].1, f64::INFINITY);

        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"2.5"]}}"#;
        assert_eq!(parse_query_answer(200, scalar)?, [(BTreeMap::new(), 2.5)]);

        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        let err = parse_query_answer(400, error).expect_err("an error");
        assert!(format!("{err}").contains("bad_data parse error"), "{err}");
        Ok(())
    }

    #[test]
    fn static_server_serves_its_text() -> Result<()> {
        let server = StaticServer::start("x_total 1\n")?;
        let (status, body) = http_get(server.addr(), "/metrics")?;
        assert_eq!((status, body.as_str()), (200, "x_total 1\n"));
        assert_eq!(server.requests(), 1);
        Ok(())
    }

    #[test]
    fn the_scrape_config_names_one_target_every_second() {
        let config = scrape_config("127.0.0.1:15020".parse().expect("literal"));
        assert!(config.contains("scrape_interval: 1s"), "{config}");
        assert!(config.contains("targets: ['127.0.0.1:15020']"), "{config}");
    }
}
