//! canary-probe: many short TCP connections to one target, and a count of
//! who answered.
//!
//! ```text
//! canary-probe --target 10.96.0.10:8080 (--count N | --until-file PATH [--max-seconds 60])
//!              [--bind 10.77.1.5 --bind 10.77.1.6 ...] [--http | --connect-only]
//!              [--concurrency 1] [--timeout-ms 2000] [--host HOST]
//!              [--connect-timing] [--timeline]
//! ```
//!
//! Each connection: bind to the next `--bind` source (round-robin, port 0),
//! connect, compare `getpeername()` with the target, then (HTTP, the
//! default) send `GET /` with `Connection: close`, read the whole response
//! and parse the body `"<version> <pod>"`. `--connect-only` sends nothing
//! and closes with an RST. Prints one JSON object (see
//! `canary_tests::probe::ProbeReport`) on stdout at the end, also when
//! stopped by SIGTERM or SIGINT.
//!
//! `--connect-timing` times the `connect()` system call of every
//! connection (only that call: not `socket()`, `bind()` or the exchange)
//! and reports its distribution in `connect_ns`. `--timeline` reports, per
//! answering version, the wall-clock start of its first and last
//! connections in `timeline` (to see when a weight change took effect).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use canary_tests::http::{Framing, HttpReader};
use canary_tests::net::{connect_tcp, error_kind, set_linger_zero, sockaddr};
use canary_tests::probe::{
    Attempt, ConnectTiming, DEFAULT_CONNECT_TIMEOUT, Identity, MAX_CONNECTIONS, ProbeReport,
    ProbeStop, Transfer,
};

const USAGE: &str = "usage: canary-probe --target ADDR:PORT (--count N | --until-file PATH \
[--max-seconds S]) [--bind IP ...] [--http | --connect-only] [--concurrency N] \
[--timeout-ms MS] [--host HOST] [--connect-timing] [--timeline]";

/// `--connect-timing` keeps at most this many samples per worker.
const MAX_TIMING_SAMPLES: usize = 1_000_000;

/// Largest response body accepted.
const MAX_BODY: usize = 64 * 1024;

const WORKER_STACK: usize = 256 * 1024;

/// Set by SIGTERM/SIGINT: finish the connections in flight and report.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Debug)]
struct Config {
    target: SocketAddr,
    stop: ProbeStop,
    binds: Vec<IpAddr>,
    connect_only: bool,
    concurrency: u32,
    timeout: Duration,
    request: Vec<u8>,
    connect_timing: bool,
    timeline: bool,
}

fn main() -> ExitCode {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("canary-probe: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    install_stop_handler();
    let report = run(&config);
    match serde_json::to_string(&report) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("canary-probe: encoding the report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Config) -> ProbeReport {
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let mut samples: Vec<u64> = Vec::new();
    let mut report = std::thread::scope(|scope| {
        let mut total = ProbeReport::default();
        let mut workers = Vec::new();
        for _ in 0..config.concurrency {
            // Small stacks: up to thousands of workers.
            let spawned = std::thread::Builder::new()
                .stack_size(WORKER_STACK)
                .spawn_scoped(scope, || worker(config, &next, start));
            match spawned {
                Ok(worker) => workers.push(worker),
                // Fewer workers than asked is still a valid run; say so.
                Err(e) => {
                    eprintln!("canary-probe: only {} workers: {e}", workers.len());
                    break;
                }
            }
        }
        for worker in workers {
            match worker.join() {
                Ok((part, part_samples)) => {
                    total.merge(part);
                    samples.extend(part_samples);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        total
    });
    report.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    if config.connect_timing {
        report.connect_ns = Some(ConnectTiming::from_samples(&mut samples).unwrap_or_default());
    }
    report
}

/// One worker's connections: its report and, with `--connect-timing`, the
/// `connect()` durations in nanoseconds.
fn worker(config: &Config, next: &AtomicU64, start: Instant) -> (ProbeReport, Vec<u64>) {
    let mut report = ProbeReport::default();
    let mut samples = Vec::new();
    while !STOP.load(Ordering::Relaxed) {
        let i = next.fetch_add(1, Ordering::Relaxed);
        match &config.stop {
            ProbeStop::Count(n) if i >= *n => break,
            ProbeStop::Count(_) => {}
            ProbeStop::UntilFile { path, max_seconds } => {
                if i >= MAX_CONNECTIONS
                    || start.elapsed() >= Duration::from_secs(*max_seconds)
                    || path.exists()
                {
                    STOP.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let source = match config.binds.len() {
            0 => None,
            n => Some(config.binds[(i % n as u64) as usize]),
        };
        let started = config.timeline.then(unix_ns);
        let (attempt, connect_ns) = probe_once(config, source);
        if let (Some(ns), true) = (connect_ns, samples.len() < MAX_TIMING_SAMPLES) {
            samples.push(ns);
        }
        if let (Some(started), Ok(Some(id))) = (started, &attempt.result) {
            report.record_timeline(&id.version, started);
        }
        report.record(&attempt);
    }
    (report, samples)
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One connection, and how long its `connect()` took (with
/// `--connect-timing`, when it connected).
fn probe_once(config: &Config, source: Option<IpAddr>) -> (Attempt, Option<u64>) {
    let deadline = Instant::now() + config.timeout;
    let failed = |peer_is_target, e: &io::Error| Attempt {
        source,
        peer_is_target,
        result: Err(error_kind(e)),
        bytes: Transfer::default(),
    };
    let connected = if config.connect_timing {
        connect_timed(source, config.target, config.timeout).map(|(s, ns)| (s, Some(ns)))
    } else {
        connect_tcp(source, config.target, config.timeout).map(|s| (s, None))
    };
    let (stream, connect_ns) = match connected {
        Ok(connected) => connected,
        Err(e) => return (failed(None, &e), None),
    };
    // With canary in the path, getpeername must still show the VIP.
    let peer_is_target = match stream.peer_addr() {
        Ok(peer) => peer.ip() == config.target.ip() && peer.port() == config.target.port(),
        Err(e) => return (failed(None, &e), connect_ns),
    };
    if config.connect_only {
        let _ = set_linger_zero(&stream);
        let attempt = Attempt {
            source,
            peer_is_target: Some(peer_is_target),
            result: Ok(None),
            bytes: Transfer::default(),
        };
        return (attempt, connect_ns);
    }
    let mut bytes = Transfer::default();
    let result = exchange(config, &stream, deadline, &mut bytes).map(Some);
    let attempt = Attempt {
        source,
        peer_is_target: Some(peer_is_target),
        result,
        bytes,
    };
    (attempt, connect_ns)
}

/// Like `canary_tests::net::connect_tcp` (blocking connect bounded by
/// `SO_SNDTIMEO`), but returns how long the `connect()` system call itself
/// took, in nanoseconds. That call is where canary's connect4 program and
/// iptables' NAT of the SYN run.
fn connect_timed(
    source: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<(TcpStream, u64)> {
    let domain = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    stream.set_write_timeout(Some(timeout.max(Duration::from_micros(1))))?;
    if let Some(source) = source {
        let one: libc::c_int = 1;
        // SAFETY: `one` is a valid c_int of the size passed. Best effort,
        // as in connect_tcp.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let (storage, len) = sockaddr(&SocketAddr::new(source, 0));
        // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
        if unsafe { libc::bind(stream.as_raw_fd(), (&raw const storage).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (storage, len) = sockaddr(&target);
    let started = Instant::now();
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    let rc = unsafe { libc::connect(stream.as_raw_fd(), (&raw const storage).cast(), len) };
    let took = started.elapsed();
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINPROGRESS) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        return Err(err);
    }
    Ok((stream, u64::try_from(took.as_nanos()).unwrap_or(u64::MAX)))
}

/// Sends the request and reads the answer; a response that is not a 2xx
/// `<version> <pod>` body is a failure too. Errors are failure kinds.
/// `bytes` counts what was written and read, even on failure.
fn exchange(
    config: &Config,
    stream: &TcpStream,
    deadline: Instant,
    bytes: &mut Transfer,
) -> Result<Identity, String> {
    let io = |e: io::Error| error_kind(&e);
    // connect_tcp set the write timeout.
    let mut writer = stream;
    writer.write_all(&config.request).map_err(io)?;
    bytes.sent = config.request.len() as u64;
    let left = deadline.saturating_duration_since(Instant::now());
    stream
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .map_err(io)?;

    let mut reader = HttpReader::new(DeadlineReader {
        stream,
        deadline,
        read: &mut bytes.received,
    });
    let head = reader
        .read_head()
        .map_err(io)?
        .ok_or_else(|| "empty_response".to_owned())?;
    let status = head.status().ok_or_else(|| "bad_response".to_owned())?;
    let framing = head.response_framing().map_err(io)?;
    let body = reader.read_body(framing, MAX_BODY).map_err(io)?;
    // Let the server close first, so TIME_WAIT stays on its side and a
    // fast probe does not run out of ephemeral ports.
    let _ = reader.read_body(Framing::Close, MAX_BODY);
    if !(200..300).contains(&status) {
        return Err(format!("http_{status}"));
    }
    let text = String::from_utf8_lossy(&body);
    match text.split_whitespace().collect::<Vec<_>>()[..] {
        [version, pod] => Ok(Identity {
            version: version.to_owned(),
            pod: pod.to_owned(),
        }),
        _ => Err("bad_response".to_owned()),
    }
}

/// Reads from the stream until the per-connection deadline. The socket's
/// read timeout (set once, to the time left) bounds each read, so a peer
/// that trickles bytes is cut off within twice the timeout at worst,
/// without a system call per read to reset the timeout.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
    /// Bytes read so far.
    read: &'a mut u64,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        let mut stream = self.stream;
        let n = stream.read(buf)?;
        *self.read += n as u64;
        Ok(n)
    }
}

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_stop_handler() {
    let handler = on_stop_signal as extern "C" fn(libc::c_int);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Config> {
    let mut target: Option<SocketAddr> = None;
    let mut count: Option<u64> = None;
    let mut until_file = None;
    let mut max_seconds = 60;
    let mut binds = Vec::new();
    let mut connect_only = false;
    let mut concurrency = 1;
    let mut timeout = DEFAULT_CONNECT_TIMEOUT;
    let mut host = None;
    let mut connect_timing = false;
    let mut timeline = false;
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => {
                let v = value()?;
                target =
                    Some(v.parse().with_context(|| {
                        format!("--target {v:?}: expected IP:PORT or [IPv6]:PORT")
                    })?);
            }
            "--count" => count = Some(number(&flag, &value()?)?),
            "--until-file" => until_file = Some(value()?.into()),
            "--max-seconds" => max_seconds = number(&flag, &value()?)?,
            "--bind" => {
                let v = value()?;
                binds.push(
                    v.parse::<IpAddr>()
                        .with_context(|| format!("--bind {v:?}: expected an IP address"))?,
                );
            }
            // HTTP is the default; the flag is accepted for explicitness.
            "--http" => connect_only = false,
            "--connect-only" => connect_only = true,
            "--concurrency" => {
                concurrency = u32::try_from(number(&flag, &value()?)?)
                    .ok()
                    .filter(|c| (1..=4096).contains(c))
                    .context("--concurrency: expected 1..=4096")?;
            }
            "--timeout-ms" => timeout = Duration::from_millis(number(&flag, &value()?)?.max(1)),
            "--host" => host = Some(value()?),
            "--connect-timing" => connect_timing = true,
            "--timeline" => timeline = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let target = target.context("--target is required")?;
    let stop = match (count, until_file) {
        (Some(n), None) => ProbeStop::Count(n),
        (None, Some(path)) => ProbeStop::UntilFile { path, max_seconds },
        (None, None) => bail!("one of --count and --until-file is required"),
        (Some(_), Some(_)) => bail!("--count and --until-file exclude each other"),
    };
    if let Some(bad) = binds.iter().find(|b| b.is_ipv4() != target.is_ipv4()) {
        bail!("--bind {bad} is not of the same address family as --target {target}");
    }
    let host = host.unwrap_or_else(|| target.to_string());
    let request =
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes();
    Ok(Config {
        target,
        stop,
        binds,
        connect_only,
        concurrency,
        timeout,
        request,
        connect_timing,
        timeline,
    })
}

fn number(flag: &str, value: &str) -> Result<u64> {
    value
        .parse()
        .with_context(|| format!("{flag} {value:?}: expected a non-negative integer"))
}
