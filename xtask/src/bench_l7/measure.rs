//! What one measurement reads: a wrk run (with extra headers), CPU time
//! of the proxy's processes from `/proc/<pid>/stat`, their RSS and open
//! file descriptors, and 1,000 idle keep-alive connections held open by
//! wrk through a proxy.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use canary_tests::{Netns, TestCgroup, spawn_in};
use serde_json::{Value, json};

use super::cpu::{self, busy_us, cgroup_usage_us};
use super::wrk::{self, WrkResult};

/// (utime, stime) of every process in `pids` (all their threads, live and
/// exited), in microseconds (`/proc/<pid>/stat`, clock-tick resolution).
pub fn proc_user_sys_us(pids: &[u32]) -> Result<(u64, u64)> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let (mut user, mut sys) = (0, 0);
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // The command name may hold spaces: fields start after its ')'.
        let rest = text
            .rsplit_once(')')
            .map(|(_, r)| r)
            .with_context(|| format!("{path}: no ')'"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest[0] is field 3 (state); utime and stime are fields 14, 15.
        let field = |n: usize| -> Result<u64> {
            fields
                .get(n - 3)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{path}: no field {n}"))
        };
        user += field(14)?;
        sys += field(15)?;
    }
    Ok((user * 1_000_000 / hz, sys * 1_000_000 / hz))
}

/// Sum of `VmRSS` over `pids`, in KiB.
pub fn rss_kib(pids: &[u32]) -> Result<u64> {
    Ok(rss_anon_kib(pids)?.0)
}

/// Sums of `VmRSS` and `RssAnon` over `pids`, in KiB.
pub fn rss_anon_kib(pids: &[u32]) -> Result<(u64, u64)> {
    let (mut rss, mut anon) = (0, 0);
    for pid in pids {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .with_context(|| format!("{path}: no {name}"))
        };
        rss += field("VmRSS:")?;
        anon += field("RssAnon:")?;
    }
    Ok((rss, anon))
}

/// Context switches (voluntary + involuntary) of every live thread of
/// `pids`.
pub fn ctx_switches(pids: &[u32]) -> Result<u64> {
    let mut n = 0;
    for pid in pids {
        let dir = format!("/proc/{pid}/task");
        for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            // A thread may end between the listing and the read.
            let Ok(text) = std::fs::read_to_string(task?.path().join("status")) else {
                continue;
            };
            n += text
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Ok(n)
}

/// CPU time of every live thread of `pids` from `schedstat`, in
/// nanoseconds (finer than `stat`'s clock ticks, for short idle periods).
pub fn sched_ns(pids: &[u32]) -> Result<u64> {
    let mut n = 0;
    for pid in pids {
        let dir = format!("/proc/{pid}/task");
        for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) else {
                continue;
            };
            n += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(n)
}

/// Open file descriptors of `pids`.
pub fn fds(pids: &[u32]) -> Result<usize> {
    let mut n = 0;
    for pid in pids {
        let dir = format!("/proc/{pid}/fd");
        n += std::fs::read_dir(&dir)
            .with_context(|| format!("reading {dir}"))?
            .count();
    }
    Ok(n)
}

/// Where wrk runs and what it loads.
pub struct Client<'a> {
    pub netns: &'a Netns,
    pub cgroup: &'a TestCgroup,
    /// CPU wrk is pinned to.
    pub cpu: Option<usize>,
}

/// One wrk run through one proxy.
#[derive(Clone, Debug)]
pub struct Run {
    /// requests/s, requests, errors, p50/p99; `client_cpu_us` is wrk's
    /// cgroup, `server_cpu_us` the backends', `machine_busy_us` the whole
    /// machine, `busy_us` the proxy's CPU when pinned.
    pub wrk: WrkResult,
    /// utime + stime of the proxy's processes during the run.
    pub proxy_cpu_us: u64,
    /// Of which in user space (utime).
    pub proxy_user_us: u64,
    /// Context switches of the proxy's threads during the run.
    pub proxy_ctx_switches: u64,
    /// Busy time of the CPU wrk and the backends ran on, when pinned.
    pub load_cpu_busy_us: Option<u64>,
}

// === impl Run ===

impl Run {
    /// The proxy's CPU seconds per 1,000 requests.
    pub fn cpu_s_per_1000(&self) -> f64 {
        self.proxy_cpu_us as f64 / self.wrk.requests.max(1) as f64 / 1000.0
    }

    /// The proxy's context switches per request.
    pub fn ctx_switches_per_request(&self) -> f64 {
        self.proxy_ctx_switches as f64 / self.wrk.requests.max(1) as f64
    }

    /// The proxy's user and system CPU µs per request.
    pub fn proxy_user_sys_us(&self) -> (f64, f64) {
        let n = self.wrk.requests.max(1) as f64;
        (
            self.proxy_user_us as f64 / n,
            self.proxy_cpu_us.saturating_sub(self.proxy_user_us) as f64 / n,
        )
    }

    /// Proxy, wrk, backends: CPU µs per request.
    pub fn split_us(&self) -> (f64, f64, f64) {
        let n = self.wrk.requests.max(1) as f64;
        (
            self.proxy_cpu_us as f64 / n,
            self.wrk.client_cpu_us as f64 / n,
            self.wrk.server_cpu_us as f64 / n,
        )
    }

    /// Share of one CPU the proxy used.
    pub fn proxy_cpu_share(&self) -> f64 {
        self.proxy_cpu_us as f64 / self.wrk.wall_us.max(1) as f64
    }

    pub fn to_json(&self) -> Value {
        let (p, c, s) = self.split_us();
        json!({
            "requests_per_sec": self.wrk.requests_per_sec,
            "requests": self.wrk.requests,
            "latency_p50_us": self.wrk.latency_p50_us,
            "latency_p99_us": self.wrk.latency_p99_us,
            "socket_errors": self.wrk.socket_errors,
            "non_2xx": self.wrk.non_2xx,
            "proxy_cpu_us": self.proxy_cpu_us,
            "proxy_user_us": self.proxy_user_us,
            "proxy_context_switches_per_request": self.ctx_switches_per_request(),
            "proxy_cpu_s_per_1000_requests": self.cpu_s_per_1000(),
            "cpu_us_per_request": {"proxy": p, "wrk": c, "backends": s},
            "wrk_cpu_us": self.wrk.client_cpu_us,
            "backends_cpu_us": self.wrk.server_cpu_us,
            "proxy_cpu_busy_us": self.wrk.busy_us,
            "load_cpu_busy_us": self.load_cpu_busy_us,
            "machine_busy_us": self.wrk.machine_busy_us,
            "wall_us": self.wrk.wall_us,
        })
    }
}

/// CPUs: where wrk and the backends run, where the proxies run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpus {
    pub load: Option<usize>,
    pub proxy: Option<usize>,
}

/// One wrk of a measurement: from where, through which proxy, to where.
pub struct Leg<'a> {
    pub client: Client<'a>,
    pub proxy_pids: Vec<u32>,
    pub target: SocketAddr,
}

/// wrk `-t1 -c<connections> -d<seconds>s --latency` with `headers`, one
/// per leg, all at once; CPU of each leg's proxy, of its client cgroup,
/// and of the backends' cgroup `servers` (shared by the legs in
/// proportion to their requests) around it.
pub fn wrk_runs(
    legs: &[Leg<'_>],
    servers: &Path,
    cpus: Cpus,
    headers: &[&str],
    connections: u32,
    seconds: u64,
) -> Result<Vec<Run>> {
    let command = |leg: &Leg<'_>| {
        let mut cmd = Command::new("wrk");
        cmd.arg("-t1")
            .arg(format!("-c{connections}"))
            .arg(format!("-d{seconds}s"))
            .args(["--timeout", "2s", "--latency"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        cmd.arg(format!("http://{}/", leg.target))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(c) = leg.client.cpu {
            cpu::pin_command(&mut cmd, c);
        }
        cmd
    };
    let mut before = Vec::new();
    for leg in legs {
        before.push((
            ctx_switches(&leg.proxy_pids)?,
            proc_user_sys_us(&leg.proxy_pids)?,
            cgroup_usage_us(leg.client.cgroup.path())?,
        ));
    }
    let shared_before = (
        cgroup_usage_us(servers)?,
        cpus.proxy.map(|c| busy_us(Some(c))).transpose()?,
        cpus.load.map(|c| busy_us(Some(c))).transpose()?,
        busy_us(None)?,
        Instant::now(),
    );
    let mut children = Vec::new();
    for leg in legs {
        children.push(spawn_in(
            command(leg),
            Some(leg.client.netns),
            Some(leg.client.cgroup),
        )?);
    }
    let mut outputs = Vec::new();
    for (child, leg) in children.into_iter().zip(legs) {
        let out = child.wait_with_output(Duration::from_secs(seconds + 20))?;
        if !out.status.success() {
            bail!(
                "wrk to {} failed ({}): {}",
                leg.target,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let wall = shared_before.4.elapsed();
    let servers_us = cgroup_usage_us(servers)?.saturating_sub(shared_before.0);
    let proxy_busy = match (cpus.proxy, shared_before.1) {
        (Some(c), Some(b)) => busy_us(Some(c))?.saturating_sub(b),
        _ => 0,
    };
    let load_cpu_busy_us = match (cpus.load, shared_before.2) {
        (Some(c), Some(b)) => Some(busy_us(Some(c))?.saturating_sub(b)),
        _ => None,
    };
    let machine_busy_us = busy_us(None)?.saturating_sub(shared_before.3);
    let mut runs = Vec::new();
    for ((leg, out), before) in legs.iter().zip(&outputs).zip(before) {
        let after = proc_user_sys_us(&leg.proxy_pids)?;
        let proxy_user_us = after.0.saturating_sub(before.1.0);
        let mut w = wrk::parse(out).with_context(|| format!("reading wrk's output:\n{out}"))?;
        w.client_cpu_us = cgroup_usage_us(leg.client.cgroup.path())?.saturating_sub(before.2);
        w.busy_us = proxy_busy;
        w.machine_busy_us = machine_busy_us;
        w.wall_us = u64::try_from(wall.as_micros()).unwrap_or(u64::MAX);
        runs.push(Run {
            proxy_cpu_us: proxy_user_us + after.1.saturating_sub(before.1.1),
            proxy_user_us,
            proxy_ctx_switches: ctx_switches(&leg.proxy_pids)?.saturating_sub(before.0),
            load_cpu_busy_us,
            wrk: w,
        });
    }
    let total: u64 = runs.iter().map(|r| r.wrk.requests).sum();
    for r in &mut runs {
        r.wrk.server_cpu_us = servers_us * r.wrk.requests / total.max(1);
    }
    Ok(runs)
}

/// RSS of a proxy before and while it holds `n` idle keep-alive client
/// connections, each of which has carried one request.
#[derive(Clone, Copy, Debug)]
pub struct Rss {
    pub idle_kib: u64,
    pub loaded_kib: u64,
    /// Of `loaded_kib`, anonymous memory (heap, stacks).
    pub loaded_anon_kib: u64,
    /// File descriptors the proxy had open more than before (client and
    /// upstream sockets), when RSS was read.
    pub extra_fds: usize,
    /// Requests wrk sent (one per connection expected).
    pub requests: u64,
    /// From wrk's start to the reading.
    pub settle_ms: u64,
}

impl Rss {
    pub fn to_json(self) -> Value {
        json!({
            "idle_kib": self.idle_kib,
            "at_connections_kib": self.loaded_kib,
            "at_connections_anon_kib": self.loaded_anon_kib,
            "extra_fds": self.extra_fds,
            "requests": self.requests,
            "settle_ms": self.settle_ms,
        })
    }
}

/// wrk's script for idle connections: the first `n` calls of `delay()`
/// (one per connection, before its first request) send at once; every
/// later one waits ten minutes, so each connection carries one request
/// and then stays open, idle.
pub fn idle_script(n: u32) -> String {
    format!(
        "-- canary bench (L7): one request per connection, then idle.\n\
         local calls = 0\n\
         function delay()\n  calls = calls + 1\n  if calls <= {n} then return 0 end\n  \
         return 600000\nend\n"
    )
}

/// How long the connections stay open (each after its one request) before
/// RSS is read: long enough that the reading is of idle connections, not of
/// the burst that opened them (an agent may hand freed memory back once
/// idle; nginx and HAProxy do not move).
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(3);

/// Opens `n` connections through the proxy with wrk (`script` from
/// [`idle_script`]), waits until the proxy holds them, its descriptor
/// count settles and [`IDLE_BEFORE_RSS`] has passed, reads RSS, then stops wrk (SIGINT, so it reports) and
/// waits for the proxy to close them.
pub fn rss_at(
    client: &Client<'_>,
    proxy_pids: &dyn Fn() -> Result<Vec<u32>>,
    target: SocketAddr,
    n: u32,
    script: &Path,
) -> Result<Rss> {
    let pids = proxy_pids()?;
    let idle_kib = rss_kib(&pids)?;
    let fds0 = fds(&pids)?;
    let mut cmd = Command::new("wrk");
    cmd.arg("-t1")
        .arg(format!("-c{n}"))
        .args(["-d120s", "--timeout", "10s", "-s"])
        .arg(script)
        .arg(format!("http://{target}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(c) = client.cpu {
        cpu::pin_command(&mut cmd, c);
    }
    let started = Instant::now();
    let mut child = spawn_in(cmd, Some(client.netns), Some(client.cgroup))?;
    let deadline = started + Duration::from_secs(15);
    // First, all client sockets in and no change for 3 polls.
    let mut last = (0usize, 0u32);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(status) = child.try_wait()? {
            bail!("wrk exited early ({status}) while opening {n} connections");
        }
        let now = fds(&proxy_pids()?)?.saturating_sub(fds0);
        last = if now == last.0 {
            (now, last.1 + 1)
        } else {
            (now, 0)
        };
        if now >= n as usize && last.1 >= 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the proxy holds {now} more descriptors, not {n}, after 15 s");
        }
    }
    // Then idle until the reading. The descriptor count may drop
    // meanwhile without any client leaving: a proxy closes idle upstream
    // connections its pool kept from earlier runs (HAProxy after 5 s).
    std::thread::sleep(IDLE_BEFORE_RSS.saturating_sub(started.elapsed()));
    if let Some(status) = child.try_wait()? {
        bail!("wrk exited early ({status}) while holding {n} connections");
    }
    let pids = proxy_pids()?;
    let extra_fds = fds(&pids)?.saturating_sub(fds0);
    let (loaded_kib, loaded_anon_kib) = rss_anon_kib(&pids)?;
    let settle_ms = started.elapsed().as_millis() as u64;
    child.kill_with(libc::SIGINT)?;
    let out = child.wait_with_output(Duration::from_secs(10))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let requests = wrk::parse(&text).map_or(0, |r| r.requests);
    // Let the proxy close them before the next measurement.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds(&proxy_pids()?)? > fds0 + 16 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Rss {
        idle_kib,
        loaded_kib,
        loaded_anon_kib,
        extra_fds,
        requests,
        settle_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_stat_and_status() -> Result<()> {
        let me = [std::process::id()];
        proc_user_sys_us(&me)?;
        assert!(rss_kib(&me)? > 0);
        assert!(fds(&me)? > 0);
        ctx_switches(&me)?;
        assert!(sched_ns(&me)? > 0);
        assert!(idle_script(1000).contains("if calls <= 1000 then return 0 end"));
        Ok(())
    }
}
