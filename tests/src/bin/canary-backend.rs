//! canary-backend: a small HTTP/1.1 server that says which backend it is.
//!
//! ```text
//! canary-backend --listen 10.77.0.11:8080 [--listen [fd00:77::11]:8080 ...]
//!                --version v1 --pod checkout-v1-a
//!                [--delay-ms N] [--fail-first N [--fail-status 503]] [--verbose]
//! ```
//!
//! Every request gets `"<version> <pod>\n"` with headers `x-canary-version`,
//! `x-canary-pod` and `x-canary-host` (the request's `Host`); the first
//! `--fail-first` requests get `--fail-status` instead of 200. Keep-alive,
//! pipelining, `Content-Length` and chunked request bodies are supported.
//! One thread per open connection (a pool that grows and shrinks); SIGTERM
//! or SIGINT exits with status 0.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use canary_tests::http::{Head, HttpReader};
use canary_tests::net::{listen_tcp, set_accept_timeout};

const USAGE: &str = "usage: canary-backend --listen ADDR:PORT [--listen ...] --version V --pod P \
[--delay-ms N] [--fail-first N] [--fail-every N] [--fail-status CODE] [--log PATH] [--verbose]";

/// Deep enough for hundreds of simultaneous connects.
const BACKLOG: i32 = 4096;
/// Idle keep-alive connections are closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Request bodies are read and dropped, up to this size.
const MAX_BODY: usize = 16 * 1024 * 1024;
const CONN_STACK: usize = 128 * 1024;
/// Acceptor threads kept waiting per listener.
const MIN_IDLE: usize = 2;
/// An acceptor idle this long leaves if enough others are waiting.
const ACCEPT_IDLE: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Config {
    listen: Vec<SocketAddr>,
    version: String,
    pod: String,
    delay: Duration,
    fail_first: u64,
    /// Every Nth request (n % N == N-1) answers `fail_status` too; 0 = never.
    fail_every: u64,
    /// Append one JSON line per request here (method, path, host, headers).
    log: Option<std::sync::Mutex<std::fs::File>>,
    fail_status: u16,
    verbose: bool,
}

struct Server {
    config: Config,
    /// Requests answered so far, for `--fail-first`.
    requests: AtomicU64,
}

fn main() -> ExitCode {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("canary-backend: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canary-backend: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> Result<()> {
    // Block the exit signals before any thread starts, so every thread
    // inherits the mask and only `sigwait` below receives them.
    let signals = exit_signals();
    // SAFETY: `signals` is an initialised sigset.
    let rc =
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const signals, std::ptr::null_mut()) };
    if rc != 0 {
        bail!("pthread_sigmask: {}", io::Error::from_raw_os_error(rc));
    }

    let listeners = config
        .listen
        .iter()
        .map(|addr| listen_tcp(*addr, BACKLOG).with_context(|| format!("listening on {addr}")))
        .collect::<Result<Vec<_>>>()?;
    if config.verbose {
        eprintln!(
            "canary-backend: {} {} listening on {:?}",
            config.version, config.pod, config.listen
        );
    }
    let server = Arc::new(Server {
        config,
        requests: AtomicU64::new(0),
    });
    for listener in listeners {
        set_accept_timeout(&listener, ACCEPT_IDLE)?;
        let pool = Arc::new(Acceptors {
            server: Arc::clone(&server),
            listener,
            idle: AtomicUsize::new(0),
        });
        for _ in 0..MIN_IDLE {
            start_acceptor(&pool).context("starting an accept thread")?;
        }
    }

    let mut signal: libc::c_int = 0;
    // SAFETY: valid sigset and out-pointer.
    let rc = unsafe { libc::sigwait(&raw const signals, &raw mut signal) };
    if rc != 0 {
        bail!("sigwait: {}", io::Error::from_raw_os_error(rc));
    }
    if server.config.verbose {
        eprintln!("canary-backend: signal {signal}, exiting");
    }
    Ok(())
}

fn exit_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset with valid signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        set
    }
}

/// The threads of one listener. Each waits in `accept()` and serves the
/// connection it got itself, so a new connection needs no hand-off between
/// threads; the pool grows whenever no acceptor is left waiting and
/// shrinks back to [`MIN_IDLE`] when idle.
struct Acceptors {
    server: Arc<Server>,
    listener: TcpListener,
    idle: AtomicUsize,
}

fn start_acceptor(pool: &Arc<Acceptors>) -> io::Result<()> {
    let pool = Arc::clone(pool);
    std::thread::Builder::new()
        .stack_size(CONN_STACK)
        .spawn(move || acceptor(&pool))
        .map(drop)
}

fn acceptor(pool: &Arc<Acceptors>) {
    let verbose = pool.server.config.verbose;
    loop {
        pool.idle.fetch_add(1, Ordering::SeqCst);
        let accepted = pool.listener.accept();
        // Acceptors other than this one still waiting.
        let others_idle = pool.idle.fetch_sub(1, Ordering::SeqCst) - 1;
        match accepted {
            Ok((stream, peer)) => {
                if others_idle == 0
                    && let Err(e) = start_acceptor(pool)
                {
                    eprintln!("canary-backend: no thread for the next connection: {e}");
                }
                if let Err(e) = serve(&pool.server, stream, peer)
                    && verbose
                {
                    eprintln!("canary-backend: {peer}: {e}");
                }
            }
            // The accept timeout: leave if enough others are waiting.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if others_idle >= MIN_IDLE {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Out of fds or memory: back off instead of spinning.
            Err(e) => {
                eprintln!("canary-backend: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve(server: &Server, stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    let config = &server.config;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut writer = &stream;
    let mut reader = HttpReader::new(&stream);
    loop {
        let head = match reader.read_head() {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                writer.write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let (method, target, version) = head.start_parts();
        if head.has_token("expect", "100-continue") {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let framing = head.request_framing()?;
        reader.read_body(framing, MAX_BODY)?;

        let keep_alive = wants_keep_alive(&head, version);
        let n = server.requests.fetch_add(1, Ordering::Relaxed);
        log_request(config, method, target, &head);
        let failing_every = config.fail_every > 0 && n % config.fail_every == config.fail_every - 1;
        let status = if n < config.fail_first || failing_every {
            config.fail_status
        } else {
            200
        };
        if !config.delay.is_zero() {
            std::thread::sleep(config.delay);
        }
        let host = head.header("host");
        let response = render_response(config, status, host, keep_alive, method == "HEAD");
        writer.write_all(&response)?;
        if config.verbose {
            eprintln!(
                "canary-backend: {peer} {method} {target} host={} -> {status}",
                host.unwrap_or("-")
            );
        }
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Records a request as it arrives (before any delay), so a test sees
/// requests the backend never answered too.
fn log_request(config: &Config, method: &str, target: &str, head: &Head) {
    let Some(log) = &config.log else { return };
    let headers: serde_json::Map<String, serde_json::Value> = head
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), serde_json::Value::from(v.as_str())))
        .collect();
    let line = serde_json::json!({
        "method": method,
        "path": target,
        "host": head.header("host"),
        "pod": config.pod,
        "headers": headers,
    });
    if let Ok(mut f) = log.lock() {
        let _ = writeln!(f, "{line}");
    }
}

/// HTTP/1.1 keeps the connection unless told to close; 1.0 closes unless
/// told to keep it.
fn wants_keep_alive(head: &Head, version: &str) -> bool {
    if head.has_token("connection", "close") {
        return false;
    }
    version == "HTTP/1.1" || head.has_token("connection", "keep-alive")
}

fn render_response(
    config: &Config,
    status: u16,
    host: Option<&str>,
    keep_alive: bool,
    head_only: bool,
) -> Vec<u8> {
    let body = canary_tests::backend::response_body(&config.version, &config.pod);
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\n\
         content-type: text/plain\r\n\
         content-length: {}\r\n\
         x-canary-version: {}\r\n\
         x-canary-pod: {}\r\n",
        body.len(),
        config.version,
        config.pod
    );
    if let Some(host) = host {
        out.push_str(&format!("x-canary-host: {host}\r\n"));
    }
    out.push_str(if keep_alive {
        "connection: keep-alive\r\n\r\n"
    } else {
        "connection: close\r\n\r\n"
    });
    if !head_only {
        out.push_str(&body);
    }
    out.into_bytes()
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Config> {
    let mut config = Config {
        listen: Vec::new(),
        version: String::new(),
        pod: String::new(),
        delay: Duration::ZERO,
        fail_first: 0,
        fail_every: 0,
        log: None,
        fail_status: 503,
        verbose: false,
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                config.listen.push(
                    v.parse().with_context(|| {
                        format!("--listen {v:?}: expected IP:PORT or [IPv6]:PORT")
                    })?,
                );
            }
            "--version" => config.version = value()?,
            "--pod" => config.pod = value()?,
            "--delay-ms" => config.delay = Duration::from_millis(number(&flag, &value()?)?),
            "--fail-first" => config.fail_first = number(&flag, &value()?)?,
            "--fail-every" => config.fail_every = number(&flag, &value()?)?,
            "--log" => {
                let path = value()?;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("--log {path}"))?;
                config.log = Some(std::sync::Mutex::new(file));
            }
            "--fail-status" => {
                let status = number(&flag, &value()?)?;
                config.fail_status = u16::try_from(status)
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .with_context(|| format!("--fail-status {status}: expected 100..=599"))?;
            }
            "--verbose" | "-v" => config.verbose = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if config.listen.is_empty() {
        bail!("at least one --listen is required");
    }
    for (flag, value) in [("--version", &config.version), ("--pod", &config.pod)] {
        if value.is_empty() || value.contains(char::is_whitespace) {
            bail!("{flag} is required and may not contain spaces");
        }
    }
    Ok(config)
}

fn number(flag: &str, value: &str) -> Result<u64> {
    value
        .parse()
        .with_context(|| format!("{flag} {value:?}: expected a non-negative integer"))
}
