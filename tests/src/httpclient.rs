//! The report of `canary-http` (keep-alive HTTP client for the L7 tests),
//! and helpers to run it inside a client namespace and cgroup.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{Netns, TestCgroup, spawn_in};

/// One request as the client saw it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub status: Option<u16>,
    pub version: Option<String>,
    pub pod: Option<String>,
    pub session: Option<String>,
    pub latency: Duration,
    pub error: Option<String>,
}

impl Sample {
    pub fn failed(error: String, session: Option<String>) -> Self {
        Self {
            status: None,
            version: None,
            pod: None,
            session,
            latency: Duration::ZERO,
            error: Some(error),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpReport {
    pub requests: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Status code → count; failures without a status are in `errors`.
    pub by_status: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub by_version: BTreeMap<String, u64>,
    pub by_pod: BTreeMap<String, u64>,
    /// Session (`--sessions`) → version → count.
    pub by_session: BTreeMap<String, BTreeMap<String, u64>>,
    /// Latency of answered requests, milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub elapsed_ms: u64,
    #[serde(skip)]
    latencies: Vec<f64>,
}

impl HttpReport {
    pub fn record(&mut self, s: &Sample) {
        self.requests += 1;
        match (s.status, &s.error) {
            (Some(status), _) => {
                *self.by_status.entry(status).or_default() += 1;
                if (200..300).contains(&status) {
                    self.ok += 1;
                }
                self.latencies.push(s.latency.as_secs_f64() * 1000.0);
            }
            (None, Some(e)) => *self.errors.entry(e.clone()).or_default() += 1,
            (None, None) => *self.errors.entry("unknown".into()).or_default() += 1,
        }
        if let Some(v) = &s.version {
            *self.by_version.entry(v.clone()).or_default() += 1;
            if let Some(session) = &s.session {
                *self
                    .by_session
                    .entry(session.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default() += 1;
            }
        }
        if let Some(p) = &s.pod {
            *self.by_pod.entry(p.clone()).or_default() += 1;
        }
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.elapsed_ms = elapsed.as_millis() as u64;
        self.latencies.sort_by(f64::total_cmp);
        let pick = |q: f64| -> f64 {
            if self.latencies.is_empty() {
                return 0.0;
            }
            let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
            self.latencies[i]
        };
        self.p50_ms = pick(0.50);
        self.p99_ms = pick(0.99);
        self.max_ms = pick(1.0);
    }

    pub fn status(&self, code: u16) -> u64 {
        self.by_status.get(&code).copied().unwrap_or(0)
    }

    pub fn version(&self, v: &str) -> u64 {
        self.by_version.get(v).copied().unwrap_or(0)
    }
}

/// Arguments for `canary-http`.
#[derive(Clone, Debug, Default)]
pub struct HttpArgs {
    pub target: String,
    pub connections: u64,
    pub requests: u64,
    pub concurrency: u64,
    pub headers: Vec<String>,
    pub sessions: u64,
    pub path: Option<String>,
    pub method: Option<String>,
    pub body: Option<String>,
}

impl HttpArgs {
    pub fn new(target: impl ToString, connections: u64, requests: u64) -> Self {
        Self {
            target: target.to_string(),
            connections,
            requests,
            concurrency: 4,
            ..Default::default()
        }
    }

    pub fn header(mut self, h: &str) -> Self {
        self.headers.push(h.to_owned());
        self
    }

    pub fn sessions(mut self, n: u64) -> Self {
        self.sessions = n;
        self
    }

    pub fn concurrency(mut self, n: u64) -> Self {
        self.concurrency = n;
        self
    }

    pub fn body(mut self, b: &str) -> Self {
        self.body = Some(b.to_owned());
        self.method = Some("POST".into());
        self
    }

    fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--target".into(),
            self.target.clone(),
            "--connections".into(),
            self.connections.to_string(),
            "--requests".into(),
            self.requests.to_string(),
            "--concurrency".into(),
            self.concurrency.to_string(),
            "--sessions".into(),
            self.sessions.to_string(),
        ];
        for h in &self.headers {
            a.extend(["--header".into(), h.clone()]);
        }
        for (flag, v) in [
            ("--path", &self.path),
            ("--method", &self.method),
            ("--body", &self.body),
        ] {
            if let Some(v) = v {
                a.extend([flag.into(), v.clone()]);
            }
        }
        a
    }
}

/// Runs `canary-http` (at `bin`) in `netns` and `cgroup` and parses its report.
pub fn run_http(
    bin: &Path,
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &HttpArgs,
    timeout: Duration,
) -> Result<HttpReport> {
    let mut cmd = Command::new(bin);
    cmd.args(args.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in(cmd, netns, cgroup)?;
    let out = child.wait_with_output(timeout)?;
    if !out.status.success() {
        bail!(
            "canary-http failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("canary-http report")
}
