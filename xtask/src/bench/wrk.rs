//! One `wrk` run from inside a client namespace and cgroup, and what it
//! printed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use canary_tests::run_in;
use serde_json::{Value, json};

use super::cpu::{busy_us, cgroup_usage_us};
use super::world::Client;

/// How wrk connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `Connection: close`: one TCP connection per request, so every
    /// request pays `connect()` (and canary's or iptables' choice).
    NewConn,
    /// HTTP keep-alive: the connections are made once, at the start.
    KeepAlive,
}

/// Load shape shared by every run.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
    /// Pin wrk to this CPU.
    pub cpu: Option<usize>,
    /// The CPU whose busy time tells how much others used meanwhile
    /// (`None`: the whole machine).
    pub busy_cpu: Option<usize>,
}

/// What one run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub requests: u64,
    /// connect + read + write + timeout socket errors.
    pub socket_errors: u64,
    pub non_2xx: u64,
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
    /// CPU time of the client's cgroup (wrk) during the run, µs.
    pub client_cpu_us: u64,
    /// CPU time of the backends' cgroup during the run, µs.
    pub server_cpu_us: u64,
    /// Busy time of the watched CPU (or the machine) during the run, µs.
    pub busy_us: u64,
    /// Busy time of the whole machine during the run, µs.
    pub machine_busy_us: u64,
    pub wall_us: u64,
    /// Run time (ns) and runs of each of canary's kernel programs during
    /// the run, when the client's cgroup has them.
    pub bpf: Option<BTreeMap<String, (u64, u64)>>,
}

// === impl Mode ===

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::NewConn, Mode::KeepAlive];

    pub fn key(self) -> &'static str {
        match self {
            Mode::NewConn => "new_conn",
            Mode::KeepAlive => "keep_alive",
        }
    }
}

// === impl Load ===

impl Load {
    /// Runs wrk against `http://target/` from `client`, and accounts the
    /// CPU time of `client`'s cgroup and of the backends' cgroup `servers`.
    pub fn run(
        &self,
        client: &Client<'_>,
        servers: &Path,
        target: SocketAddr,
        mode: Mode,
    ) -> Result<WrkResult> {
        let mut cmd = Command::new("wrk");
        cmd.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.duration.as_secs().max(1)))
            .args(["--timeout", "2s", "--latency"]);
        if mode == Mode::NewConn {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(format!("http://{target}/"));
        if let Some(cpu) = self.cpu {
            super::cpu::pin_command(&mut cmd, cpu);
        }
        let before = (
            cgroup_usage_us(client.cgroup.path())?,
            cgroup_usage_us(servers)?,
            busy_us(self.busy_cpu)?,
            busy_us(None)?,
            Instant::now(),
        );
        let out = run_in(
            cmd,
            Some(client.netns),
            Some(client.cgroup),
            self.duration + Duration::from_secs(20),
        )
        .with_context(|| format!("wrk to {target} from {}", client.name))?;
        let wall = before.4.elapsed();
        let mut r = parse(&out).with_context(|| format!("reading wrk's output:\n{out}"))?;
        r.client_cpu_us = cgroup_usage_us(client.cgroup.path())?.saturating_sub(before.0);
        r.server_cpu_us = cgroup_usage_us(servers)?.saturating_sub(before.1);
        r.busy_us = busy_us(self.busy_cpu)?.saturating_sub(before.2);
        r.machine_busy_us = busy_us(None)?.saturating_sub(before.3);
        r.wall_us = u64::try_from(wall.as_micros()).unwrap_or(u64::MAX);
        Ok(r)
    }
}

// === impl WrkResult ===

impl WrkResult {
    /// Client plus backend CPU time per request, µs.
    pub fn cpu_us_per_request(&self) -> f64 {
        (self.client_cpu_us + self.server_cpu_us) as f64 / self.requests.max(1) as f64
    }

    /// Nanoseconds of canary's kernel programs per request.
    pub fn bpf_ns_per_request(&self) -> Option<f64> {
        let ns: u64 = self.bpf.as_ref()?.values().map(|(ns, _)| ns).sum();
        Some(ns as f64 / self.requests.max(1) as f64)
    }

    /// Runs of canary's kernel programs per request.
    pub fn bpf_runs_per_request(&self) -> Option<f64> {
        let runs: u64 = self.bpf.as_ref()?.values().map(|(_, runs)| runs).sum();
        Some(runs as f64 / self.requests.max(1) as f64)
    }

    /// Share of the watched CPUs (`cpus` of them) that was busy with
    /// something other than this run's client and backends.
    pub fn background_share(&self, cpus: usize) -> f64 {
        share(
            self.busy_us,
            self.client_cpu_us + self.server_cpu_us,
            self.wall_us,
            cpus,
        )
    }

    /// The same for the whole machine (`cpus` CPUs).
    pub fn machine_background_share(&self, cpus: usize) -> f64 {
        share(
            self.machine_busy_us,
            self.client_cpu_us + self.server_cpu_us,
            self.wall_us,
            cpus,
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "cpu_us_per_request": self.cpu_us_per_request(),
            "client_cpu_us": self.client_cpu_us,
            "server_cpu_us": self.server_cpu_us,
            "busy_us": self.busy_us,
            "machine_busy_us": self.machine_busy_us,
            "wall_us": self.wall_us,
            "bpf_ns_per_request": self.bpf_ns_per_request(),
            "bpf_runs_per_request": self.bpf_runs_per_request(),
            "bpf_programs": self.bpf.as_ref().map(|progs| {
                progs
                    .iter()
                    .map(|(name, (ns, runs))| (name.clone(), json!({"ns": ns, "runs": runs})))
                    .collect::<serde_json::Map<_, _>>()
            }),
            "requests_per_sec": self.requests_per_sec,
            "requests": self.requests,
            "socket_errors": self.socket_errors,
            "non_2xx": self.non_2xx,
            "latency_p50_us": self.latency_p50_us,
            "latency_p99_us": self.latency_p99_us,
        })
    }
}

fn share(busy: u64, ours: u64, wall_us: u64, cpus: usize) -> f64 {
    let capacity = (wall_us * cpus.max(1) as u64).max(1);
    busy.saturating_sub(ours) as f64 / capacity as f64
}

/// Reads wrk 4.x's report (`--latency`).
pub fn parse(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut rps = None;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = Some(v.trim().parse::<f64>()?);
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            r.requests = n.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            r.latency_p50_us = duration_us(v.trim());
        } else if let Some(v) = line.strip_prefix("99%") {
            r.latency_p99_us = duration_us(v.trim());
        }
    }
    r.requests_per_sec = rps.context("no Requests/sec line")?;
    Ok(r)
}

/// `"1.23ms"`, `"850.00us"`, `"1.02s"` in microseconds.
fn duration_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() -> Result<()> {
        let out = "\
Running 3s test @ http://10.77.0.11:8080/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.31us  201.10us   8.20ms   90.00%
    Req/Sec    15.10k     1.20k   17.00k    70.00%
  Latency Distribution
     50%  480.00us
     75%  560.00us
     90%  700.00us
     99%    1.20ms
  45300 requests in 3.00s, 5.62MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  15098.71
Transfer/sec:      1.87MB
";
        let r = parse(out)?;
        assert_eq!(r.requests, 45300);
        assert_eq!(r.socket_errors, 4);
        assert_eq!(r.non_2xx, 2);
        assert!((r.requests_per_sec - 15098.71).abs() < 1e-6);
        assert_eq!(r.latency_p50_us, Some(480.0));
        assert_eq!(r.latency_p99_us, Some(1200.0));
        assert!(parse("nothing").is_err());
        Ok(())
    }
}
