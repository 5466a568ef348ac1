//! `canary-probe`, the test client: its arguments, its JSON report, and
//! helpers that run it inside a test's namespace and cgroup.
//!
//! The probe makes many short TCP connections to one target (usually a VIP
//! that canary rewrites at connect time), checks that `getpeername()` still
//! shows the target, and counts which backend version and pod answered.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::cgroup::TestCgroup;
use crate::netns::Netns;
use crate::process::{ChildGuard, spawn_in};

/// The binary's name, for [`crate::bin_path`].
pub const PROBE_BIN: &str = "canary-probe";

/// Per-connection timeout unless set otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The probe stops after this many connections in `--until-file` mode.
pub const MAX_CONNECTIONS: u64 = 1_000_000;

/// The one JSON object `canary-probe` prints on stdout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Connections tried.
    pub attempted: u64,
    /// Connections that connected and (with HTTP) got a 2xx with a
    /// `<version> <pod>` body.
    pub ok: u64,
    pub failed: u64,
    /// Failures by kind: errno names (`ECONNREFUSED`, `EHOSTUNREACH`,
    /// `EPERM`, ...), `timeout`, `eof`, `empty_response`, `bad_response`,
    /// `http_<status>`.
    pub errors: BTreeMap<String, u64>,
    /// Connections whose `getpeername()` equalled the target address.
    pub peer_is_target: u64,
    /// Connections whose `getpeername()` showed some other address (for
    /// example the real backend instead of the VIP).
    pub peer_mismatch: u64,
    pub by_version: BTreeMap<String, u64>,
    pub by_pod: BTreeMap<String, u64>,
    /// Source address -> pod -> count; present only with `--bind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_source: Option<BTreeMap<String, BTreeMap<String, u64>>>,
    /// Wall time of the whole run.
    #[serde(default)]
    pub elapsed_ms: u64,
    /// Payload bytes written and read over all connections.
    #[serde(default)]
    pub bytes: Transfer,
    /// With `--connect-timing`: how long the `connect()` system calls of
    /// the successful connects took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ns: Option<ConnectTiming>,
    /// With `--timeline`: per answering version, when its first and last
    /// connections started (wall clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<BTreeMap<String, VersionSpan>>,
}

/// Distribution of `connect()` system call durations, in nanoseconds
/// (nearest-rank percentiles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectTiming {
    pub samples: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: u64,
}

/// When the first and the last connection answered by one version started,
/// in nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSpan {
    pub first_unix_ns: u64,
    pub last_unix_ns: u64,
}

/// What one connection found out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub source: Option<IpAddr>,
    /// `None` when the connection failed before `getpeername()`.
    pub peer_is_target: Option<bool>,
    /// The answering backend (`None` in connect-only mode), or the error kind.
    pub result: Result<Option<Identity>, String>,
    /// Bytes written to and read from the connection, whatever the result.
    pub bytes: Transfer,
}

/// Payload bytes one connection (or a whole run) moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub sent: u64,
    pub received: u64,
}

/// Who answered: the body `"<version> <pod>\n"` of `canary-backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub version: String,
    pub pod: String,
}

/// When the probe stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeStop {
    /// After this many connections.
    Count(u64),
    /// When `path` exists, after `max_seconds`, or after
    /// [`MAX_CONNECTIONS`], whichever comes first.
    UntilFile { path: PathBuf, max_seconds: u64 },
}

/// Arguments of `canary-probe`; build with [`ProbeArgs::count`] or
/// [`ProbeArgs::until_file`] and the chained setters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeArgs {
    pub target: SocketAddr,
    pub stop: ProbeStop,
    /// Source addresses, used round-robin (`--bind`).
    pub binds: Vec<IpAddr>,
    /// Only connect and check the peer; send no request (`--connect-only`).
    pub connect_only: bool,
    /// Connections in flight at once (`--concurrency`).
    pub concurrency: u32,
    /// Per-connection timeout (`--timeout-ms`).
    pub timeout: Duration,
    /// `Host` header; the target address when `None` (`--host`).
    pub host: Option<String>,
    /// How long [`run_probe`] waits for the whole run; derived from the
    /// other fields when `None`.
    pub wall_timeout: Option<Duration>,
    /// Time every `connect()` system call (`--connect-timing`).
    pub connect_timing: bool,
    /// Record when each version first and last answered (`--timeline`).
    pub timeline: bool,
}

// === impl ProbeReport ===

impl ProbeReport {
    /// Parses the report from a finished probe; fails on a non-zero exit.
    pub fn from_output(out: &Output) -> Result<Self> {
        if !out.status.success() {
            bail!(
                "canary-probe failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Self::from_json(&String::from_utf8_lossy(&out.stdout))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text.trim())
            .with_context(|| format!("parsing canary-probe report {:?}", text.trim()))
    }

    /// Waits for a probe started with [`spawn_probe`] and parses its report.
    pub fn wait(child: ChildGuard, timeout: Duration) -> Result<Self> {
        Self::from_output(&child.wait_with_output(timeout)?)
    }

    /// Counts one connection.
    pub fn record(&mut self, attempt: &Attempt) {
        self.attempted += 1;
        self.bytes.sent += attempt.bytes.sent;
        self.bytes.received += attempt.bytes.received;
        match attempt.peer_is_target {
            Some(true) => self.peer_is_target += 1,
            Some(false) => self.peer_mismatch += 1,
            None => {}
        }
        match &attempt.result {
            Ok(identity) => {
                self.ok += 1;
                if let Some(id) = identity {
                    *self.by_version.entry(id.version.clone()).or_default() += 1;
                    *self.by_pod.entry(id.pod.clone()).or_default() += 1;
                }
                if let Some(source) = attempt.source {
                    let pods = self
                        .by_source
                        .get_or_insert_with(BTreeMap::new)
                        .entry(source.to_string())
                        .or_default();
                    let pod = identity.as_ref().map_or("connected", |id| &id.pod);
                    *pods.entry(pod.to_owned()).or_default() += 1;
                }
            }
            Err(kind) => {
                self.failed += 1;
                *self.errors.entry(kind.clone()).or_default() += 1;
            }
        }
    }

    /// Notes that a connection started at `started_unix_ns` was answered
    /// by `version` (`--timeline`).
    pub fn record_timeline(&mut self, version: &str, started_unix_ns: u64) {
        let span = VersionSpan {
            first_unix_ns: started_unix_ns,
            last_unix_ns: started_unix_ns,
        };
        merge_span(
            self.timeline
                .get_or_insert_with(BTreeMap::new)
                .entry(version.to_owned())
                .or_insert(span),
            span,
        );
    }

    /// Adds another report's counts (from another worker) to this one.
    ///
    /// Percentiles do not add up, so `connect_ns` is left as it is: the
    /// probe computes it once from every worker's samples.
    pub fn merge(&mut self, other: ProbeReport) {
        fn add(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
            for (k, v) in from {
                *into.entry(k).or_default() += v;
            }
        }
        self.attempted += other.attempted;
        self.bytes.sent += other.bytes.sent;
        self.bytes.received += other.bytes.received;
        self.ok += other.ok;
        self.failed += other.failed;
        self.peer_is_target += other.peer_is_target;
        self.peer_mismatch += other.peer_mismatch;
        add(&mut self.errors, other.errors);
        add(&mut self.by_version, other.by_version);
        add(&mut self.by_pod, other.by_pod);
        if let Some(sources) = other.by_source {
            let into = self.by_source.get_or_insert_with(BTreeMap::new);
            for (source, pods) in sources {
                add(into.entry(source).or_default(), pods);
            }
        }
        self.elapsed_ms = self.elapsed_ms.max(other.elapsed_ms);
        if let Some(spans) = other.timeline {
            let into = self.timeline.get_or_insert_with(BTreeMap::new);
            for (version, span) in spans {
                merge_span(into.entry(version).or_insert(span), span);
            }
        }
    }

    /// Share of successful connections answered by `version` (0 if none).
    pub fn version_share(&self, version: &str) -> f64 {
        share(self.by_version.get(version), self.ok)
    }

    /// Share of successful connections answered by `pod` (0 if none).
    pub fn pod_share(&self, pod: &str) -> f64 {
        share(self.by_pod.get(pod), self.ok)
    }

    /// Connections per second over the whole run.
    pub fn conns_per_sec(&self) -> f64 {
        if self.elapsed_ms == 0 {
            return 0.0;
        }
        self.attempted as f64 * 1000.0 / self.elapsed_ms as f64
    }
}

fn merge_span(into: &mut VersionSpan, other: VersionSpan) {
    into.first_unix_ns = into.first_unix_ns.min(other.first_unix_ns);
    into.last_unix_ns = into.last_unix_ns.max(other.last_unix_ns);
}

// === impl ConnectTiming ===

impl ConnectTiming {
    /// Summarises durations in nanoseconds (sorts them); `None` if empty.
    pub fn from_samples(samples: &mut [u64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        // Nearest rank: the smallest sample with at least p% at or below it.
        let rank = |p: usize| samples[(n * p).div_ceil(100).clamp(1, n) - 1];
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Some(ConnectTiming {
            samples: n as u64,
            min: samples[0],
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: samples[n - 1],
            mean: u64::try_from(sum / n as u128).unwrap_or(u64::MAX),
        })
    }
}

fn share(n: Option<&u64>, total: u64) -> f64 {
    match total {
        0 => 0.0,
        total => n.copied().unwrap_or(0) as f64 / total as f64,
    }
}

// === impl ProbeArgs ===

impl ProbeArgs {
    /// `count` connections, one at a time, HTTP, 2 s timeout.
    pub fn count(target: SocketAddr, count: u64) -> Self {
        ProbeArgs {
            target,
            stop: ProbeStop::Count(count),
            binds: Vec::new(),
            connect_only: false,
            concurrency: 1,
            timeout: DEFAULT_CONNECT_TIMEOUT,
            host: None,
            wall_timeout: None,
            connect_timing: false,
            timeline: false,
        }
    }

    /// Connections until `path` exists (at most `max_seconds`).
    pub fn until_file(target: SocketAddr, path: impl Into<PathBuf>, max_seconds: u64) -> Self {
        ProbeArgs {
            stop: ProbeStop::UntilFile {
                path: path.into(),
                max_seconds,
            },
            ..Self::count(target, 0)
        }
    }

    pub fn binds(mut self, sources: impl IntoIterator<Item = IpAddr>) -> Self {
        self.binds = sources.into_iter().collect();
        self
    }

    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n.max(1);
        self
    }

    pub fn connect_only(mut self) -> Self {
        self.connect_only = true;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    pub fn wall_timeout(mut self, timeout: Duration) -> Self {
        self.wall_timeout = Some(timeout);
        self
    }

    /// Report the distribution of `connect()` durations.
    pub fn connect_timing(mut self) -> Self {
        self.connect_timing = true;
        self
    }

    /// Report when each version first and last answered.
    pub fn timeline(mut self) -> Self {
        self.timeline = true;
        self
    }

    /// The command line for `canary-probe`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--target".to_owned(), self.target.to_string()];
        match &self.stop {
            ProbeStop::Count(n) => args.extend(["--count".to_owned(), n.to_string()]),
            ProbeStop::UntilFile { path, max_seconds } => args.extend([
                "--until-file".to_owned(),
                path.display().to_string(),
                "--max-seconds".to_owned(),
                max_seconds.to_string(),
            ]),
        }
        for source in &self.binds {
            args.extend(["--bind".to_owned(), source.to_string()]);
        }
        args.push(
            if self.connect_only {
                "--connect-only"
            } else {
                "--http"
            }
            .to_owned(),
        );
        args.extend([
            "--concurrency".to_owned(),
            self.concurrency.to_string(),
            "--timeout-ms".to_owned(),
            self.timeout.as_millis().to_string(),
        ]);
        if let Some(host) = &self.host {
            args.extend(["--host".to_owned(), host.clone()]);
        }
        if self.connect_timing {
            args.push("--connect-timing".to_owned());
        }
        if self.timeline {
            args.push("--timeline".to_owned());
        }
        args
    }

    /// How long a run may take before [`run_probe`] gives up on it: the
    /// explicit `wall_timeout`, else a bound from the stop condition (every
    /// connection timing out, capped at ten minutes) plus slack.
    pub fn effective_wall_timeout(&self) -> Duration {
        if let Some(t) = self.wall_timeout {
            return t;
        }
        let slack = Duration::from_secs(30);
        match &self.stop {
            ProbeStop::Count(n) => {
                let rounds = n.div_ceil(u64::from(self.concurrency.max(1)));
                let worst = self
                    .timeout
                    .saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX));
                worst.min(Duration::from_secs(600)) + slack
            }
            ProbeStop::UntilFile { max_seconds, .. } => Duration::from_secs(*max_seconds) + slack,
        }
    }
}

/// Starts `canary-probe` (at `bin`) in `netns` and `cgroup` with stdout and
/// stderr piped; collect it with [`ProbeReport::wait`].
pub fn spawn_probe(
    bin: &Path,
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &ProbeArgs,
) -> Result<ChildGuard> {
    let mut cmd = Command::new(bin);
    cmd.args(args.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_in(cmd, netns, cgroup)
}

/// Runs `canary-probe` (at `bin`) in `netns` and `cgroup` to the end and
/// returns its report.
pub fn run_probe(
    bin: &Path,
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &ProbeArgs,
) -> Result<ProbeReport> {
    let child = spawn_probe(bin, netns, cgroup, args)?;
    ProbeReport::wait(child, args.effective_wall_timeout())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(source: Option<&str>, pod: &str) -> Attempt {
        Attempt {
            source: source.map(|s| s.parse().expect("ip")),
            peer_is_target: Some(true),
            result: Ok(Some(Identity {
                version: "v1".into(),
                pod: pod.into(),
            })),
            bytes: Transfer {
                sent: 40,
                received: 100,
            },
        }
    }

    #[test]
    fn records_merges_and_round_trips() -> Result<()> {
        let mut a = ProbeReport::default();
        a.record(&ok(Some("10.77.1.5"), "p-a"));
        a.record(&Attempt {
            source: Some("10.77.1.6".parse()?),
            peer_is_target: None,
            result: Err("ECONNREFUSED".into()),
            bytes: Transfer::default(),
        });
        let mut b = ProbeReport::default();
        b.record(&ok(Some("10.77.1.5"), "p-a"));
        b.record(&ok(Some("10.77.1.6"), "p-b"));
        a.merge(b);
        assert_eq!((a.attempted, a.ok, a.failed), (4, 3, 1));
        assert_eq!(a.peer_is_target, 3);
        assert_eq!(a.errors["ECONNREFUSED"], 1);
        assert_eq!(a.by_version["v1"], 3);
        assert_eq!((a.bytes.sent, a.bytes.received), (120, 300));
        let sources = a.by_source.as_ref().expect("by_source");
        assert_eq!(sources["10.77.1.5"]["p-a"], 2);
        assert_eq!(sources["10.77.1.6"]["p-b"], 1);
        assert!((a.pod_share("p-a") - 2.0 / 3.0).abs() < 1e-9);

        let json = serde_json::to_string(&a)?;
        assert_eq!(ProbeReport::from_json(&json)?, a);
        Ok(())
    }

    #[test]
    fn omits_by_source_without_binds() -> Result<()> {
        let mut r = ProbeReport::default();
        r.record(&ok(None, "p"));
        let json = serde_json::to_string(&r)?;
        assert!(!json.contains("by_source"), "{json}");
        Ok(())
    }

    #[test]
    fn renders_the_command_line() -> Result<()> {
        let args = ProbeArgs::count("[fd00:96::10]:8080".parse()?, 200)
            .binds(["10.77.1.5".parse()?])
            .concurrency(4);
        assert_eq!(
            args.to_args().join(" "),
            "--target [fd00:96::10]:8080 --count 200 --bind 10.77.1.5 --http \
             --concurrency 4 --timeout-ms 2000"
        );
        let until = ProbeArgs::until_file("10.96.0.10:80".parse()?, "/tmp/stop", 30);
        assert!(
            until
                .to_args()
                .join(" ")
                .contains("--until-file /tmp/stop --max-seconds 30")
        );
        assert_eq!(until.effective_wall_timeout(), Duration::from_secs(60));
        let timed = ProbeArgs::count("10.96.0.10:80".parse()?, 5)
            .connect_only()
            .connect_timing()
            .timeline();
        assert!(timed.to_args().join(" ").ends_with(
            "--connect-only --concurrency 1 --timeout-ms 2000 --connect-timing --timeline"
        ));
        Ok(())
    }

    #[test]
    fn summarises_connect_times() {
        assert_eq!(ConnectTiming::from_samples(&mut []), None);
        let mut samples: Vec<u64> = (1..=1000).rev().collect();
        let t = ConnectTiming::from_samples(&mut samples).expect("samples");
        assert_eq!((t.samples, t.min, t.max), (1000, 1, 1000));
        assert_eq!((t.p50, t.p90, t.p99), (500, 900, 990));
        assert_eq!(t.mean, 500);
        let one = ConnectTiming::from_samples(&mut [7]).expect("one");
        assert_eq!((one.p50, one.p99), (7, 7));
    }

    #[test]
    fn timelines_merge_to_the_outer_span() -> Result<()> {
        let mut a = ProbeReport::default();
        a.record_timeline("v1", 30);
        a.record_timeline("v1", 10);
        let mut b = ProbeReport::default();
        b.record_timeline("v1", 50);
        b.record_timeline("v2", 40);
        a.merge(b);
        let t = a.timeline.as_ref().expect("timeline");
        assert_eq!(
            t["v1"],
            VersionSpan {
                first_unix_ns: 10,
                last_unix_ns: 50
            }
        );
        assert_eq!(t["v2"].first_unix_ns, 40);
        // Old reports without the new fields still parse.
        let old = ProbeReport::from_json(
            r#"{"attempted":1,"ok":1,"failed":0,"errors":{},"peer_is_target":1,"peer_mismatch":0,"by_version":{},"by_pod":{}}"#,
        )?;
        assert_eq!((old.connect_ns, old.timeline), (None, None));
        Ok(())
    }
}
