//! `cargo xtask bench`, L7 part: canary's shim beside nginx and HAProxy,
//! in one run, on the same backends and the same split.
//!
//! The scenario is `deploy/examples/composite-routing`: `x-canary-user:
//! true` → v2, everything else 95/5 between v1 (two pods) and v2 (one),
//! chosen per request. Every proxy runs single-worker and sidecar-style,
//! in the client's network namespace:
//!
//! | peer | how the client reaches it | process measured |
//! |---|---|---|
//! | canary | VIP 10.96.0.10:8080, redirected by the kernel to the shim (127.0.0.1:15101) | the agent (tokio, 1 worker) |
//! | canary, no request metrics | the same from another cgroup: a second agent, `--no-request-metrics` (shim 127.0.0.1:15102) | that agent |
//! | nginx | 127.0.0.1:18080 (`worker_processes 1`, split_clients on `$request_id`) | master + worker |
//! | HAProxy | 127.0.0.1:18081 (`nbthread 1`, header ACL, `rand(100) lt 5`) | haproxy |
//!
//! Each round runs wrk (`-t1 -c32 -d5s --latency`, keep-alive) through
//! canary, nginx and HAProxy, without and with `x-canary-user: true`, in
//! an order rotated from round to round; the report gives medians and the
//! spread. Then wrk through canary and each peer at once (head to head:
//! the targets are judged on these pairs, whose ratio holds from run to
//! run where sequential rounds swing with the VM), through both agents at
//! once (request metrics on, off) for the cost of the metrics, and each
//! proxy holds 1,000 idle keep-alive
//! connections (one request each) while its RSS is read. By default
//! everything is pinned to one CPU (see `--l7-pin`). Results go to stdout, `target/bench/l7.md` and
//! `target/bench/l7.json`; `--l7-profile` adds system-call counts and
//! `perf` profiles in `target/bench/l7-perf.txt`.
//!
//! It reuses the L4 bench's pieces: CPU placement and accounting, the
//! world, and the wrk runner.

use crate::bench::{cpu, first_line, machine_environment, read_trimmed, wrk};

mod measure;
mod peers;
mod profile;
mod report;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use canary_tests::agent::Agent;
use canary_tests::checkout::{Checkout, VIP4};
use canary_tests::httpclient::{HttpArgs, run_http};
use canary_tests::{TestCgroup, unique_prefix, wait_for_tcp};

use crate::setup::{ensure_packages, say};
use measure::{Client, Cpus, Rss, Run};
use peers::Proxy;

/// Debian packages the L7 part drives (nginx-light is a transitional
/// package for nginx in Debian 12).
const PACKAGES: &[&str] = &["wrk", "nginx", "haproxy"];

/// The scenario the shim serves.
const EXAMPLE: &str = "deploy/examples/composite-routing";
/// Shim ports of the two agents: away from the default 15001, so they
/// never take the port of another agent (a test's) in its namespaces.
const SHIM_PORT: u16 = 15101;
const SHIM_PORT_NO_METRICS: u16 = 15102;
const HEADER: &str = "x-canary-user: true";
/// v2's share without the header.
const V2_SHARE: f64 = 0.05;

/// `cargo xtask bench` with both parts' arguments.
#[derive(clap::Args, Debug)]
pub struct BenchAll {
    #[command(flatten)]
    pub l4: crate::bench::BenchArgs,
    #[command(flatten)]
    pub l7: L7Args,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum L7Mode {
    /// After the L4 part.
    On,
    /// L4 part only.
    Off,
    /// L7 part only.
    Only,
}

#[derive(clap::Args, Debug, Clone)]
pub struct L7Args {
    /// The L7 part (canary's shim beside nginx and HAProxy): `on` runs it
    /// after the L4 part, `off` skips it, `only` skips the L4 part.
    #[arg(id = "l7", long = "l7", value_enum, default_value_t = L7Mode::On)]
    pub mode: L7Mode,
    /// Seconds per wrk run (L7).
    #[arg(id = "l7_seconds", long = "l7-seconds", default_value_t = 5)]
    pub seconds: u64,
    /// Rounds (L7); the report shows the median of the rounds.
    #[arg(id = "l7_rounds", long = "l7-rounds", default_value_t = 3)]
    pub rounds: usize,
    /// wrk connections (`-c`, L7); wrk runs one thread.
    #[arg(id = "l7_connections", long = "l7-connections", default_value_t = 32)]
    pub connections: u32,
    /// Idle keep-alive connections held open while each proxy's RSS is
    /// read.
    #[arg(
        id = "l7_idle_connections",
        long = "l7-idle-connections",
        default_value_t = 1000
    )]
    pub idle_connections: u32,
    /// Request metrics on / off: this many wrk runs through both agents
    /// at once.
    #[arg(id = "l7_metrics_runs", long = "l7-metrics-runs", default_value_t = 5)]
    pub metrics_pairs: usize,
    /// Head to head: this many wrk runs through canary and nginx at once
    /// (and as many through canary and HAProxy), per route. The targets
    /// are judged on these: both proxies of a run see the same machine.
    #[arg(id = "l7_pairs", long = "l7-pairs", default_value_t = 5)]
    pub pairs: usize,
    /// Seconds per wrk run of the runs through two proxies at once (head
    /// to head, metrics on / off).
    #[arg(
        id = "l7_metrics_seconds",
        long = "l7-pair-seconds",
        alias = "l7-metrics-seconds",
        default_value_t = 4
    )]
    pub metrics_seconds: u64,
    /// CPU placement (L7). `same`: the proxy, wrk and the backends on the
    /// first CPU (req/s is the whole path's per CPU; no cross-CPU wakeups,
    /// which cost the waker a lot on a VM). `split`: the proxies alone on
    /// the second CPU, wrk and the backends on the first. `none`: the
    /// scheduler's choice.
    #[arg(id = "l7_pin", long = "l7-pin", value_enum, default_value_t = cpu::Pin::Same)]
    pub pin: cpu::Pin,
    /// Use the release binaries already built.
    #[arg(id = "l7_no_build", long = "l7-no-build")]
    pub no_build: bool,
    /// Do not raise the scheduling priority for the L7 part.
    #[arg(id = "l7_no_boost", long = "l7-no-boost")]
    pub no_boost: bool,
    /// Also count each proxy's system calls and context switches per
    /// request (`perf stat`) and profile both canary agents (`perf
    /// record`), one more wrk run each, into target/bench/l7-perf.txt.
    #[arg(id = "l7_profile", long = "l7-profile")]
    pub profile: bool,
}

// === impl L7Args ===

impl L7Args {
    /// Whether `cargo xtask bench` runs the L4 part too.
    pub fn with_l4(&self) -> bool {
        self.mode != L7Mode::Only
    }
}

/// One proxy as measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peer {
    Canary,
    CanaryNoMetrics,
    Nginx,
    Haproxy,
}

impl Peer {
    pub const ALL: [Peer; 4] = [
        Peer::Canary,
        Peer::CanaryNoMetrics,
        Peer::Nginx,
        Peer::Haproxy,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Peer::Canary => "canary",
            Peer::CanaryNoMetrics => "canary_no_request_metrics",
            Peer::Nginx => "nginx",
            Peer::Haproxy => "haproxy",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Peer::Canary => "canary shim",
            Peer::CanaryNoMetrics => "canary, --no-request-metrics",
            Peer::Nginx => "nginx",
            Peer::Haproxy => "HAProxy",
        }
    }
}

/// With or without the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// No header: the 95/5 split.
    Split,
    /// `x-canary-user: true`: the header route to v2.
    Header,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::Split, Variant::Header];

    pub fn key(self) -> &'static str {
        match self {
            Variant::Split => "split",
            Variant::Header => "header",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Variant::Split => "95/5",
            Variant::Header => "header→v2",
        }
    }

    fn headers(self) -> &'static [&'static str] {
        match self {
            Variant::Split => &[],
            Variant::Header => &[HEADER],
        }
    }
}

/// Everything measured, for the report.
pub struct Results {
    pub args: L7Args,
    pub runs: BTreeMap<(Peer, Variant), Vec<Run>>,
    /// (request metrics on, off): wrk through the two agents at the same
    /// time (95/5).
    pub metrics_pairs: Vec<(Run, Run)>,
    /// Head to head, (other peer, route) → (canary's run, the other's):
    /// wrk through canary and the other proxy at the same time.
    pub head_to_head: BTreeMap<(Peer, Variant), Vec<(Run, Run)>>,
    pub rss: BTreeMap<Peer, Vec<Rss>>,
    /// The agents' CPU use while idle, CPU-s per s (their background work:
    /// namespace scans, ticks, metrics).
    pub agent_idle_cpu: BTreeMap<Peer, f64>,
    /// Sanity: peer → (requests, v2 share without the header, v2 share
    /// with it).
    pub sanity: BTreeMap<Peer, (u64, f64, f64)>,
    pub placement: String,
    pub env: BTreeMap<&'static str, String>,
    pub profile: Option<String>,
    /// Runs discarded and run again (socket errors or non-2xx).
    pub reruns: Vec<String>,
    pub wall_s: f64,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Removes a directory on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything the L7 part runs on. Field order is drop order: proxies,
/// agents (they unpin their programs), cgroups, the checkout world
/// (backends, client cgroup, namespaces), the temporary directory.
struct Lab {
    nginx: Proxy,
    haproxy: Proxy,
    canary: Agent,
    canary_off: Agent,
    /// wrk to the agent without request metrics.
    off_cgroup: TestCgroup,
    /// wrk to nginx and HAProxy: no canary programs.
    plain: TestCgroup,
    /// The backends, for their CPU time.
    servers: TestCgroup,
    checkout: Checkout,
    dir: TempDir,
}

impl Lab {
    fn start(prefix: &str, bins: &Bins, cpus: Cpus) -> Result<Lab> {
        let dir = TempDir(std::env::temp_dir().join(format!("canary-{prefix}-l7")));
        std::fs::create_dir_all(&dir.0)?;
        let checkout = Checkout::start(prefix, &bins.backend)?;
        let servers = TestCgroup::new(prefix, "servers")?;
        for backend in &checkout.backends {
            std::fs::write(servers.procs_file(), backend.pid().to_string())
                .with_context(|| format!("moving backend {} to its cgroup", backend.pid()))?;
            if let Some(c) = cpus.load {
                cpu::pin_process(backend.pid(), c)?;
            }
        }
        let plain = TestCgroup::new(prefix, "plain")?;
        let off_cgroup = TestCgroup::new(prefix, "nometrics")?;
        let config = std::fs::canonicalize(EXAMPLE)?;
        let agent = |name: &str, cgroup: &Path, extra: &[&str]| {
            Agent::start_at_with_args(
                &config,
                cgroup,
                PathBuf::from(format!("/sys/fs/bpf/canary-bench-{prefix}-{name}")),
                PathBuf::from(format!("/run/canary-bench-{prefix}-{name}")),
                extra,
            )
            .with_context(|| format!("starting the {name} agent"))
        };
        let port = SHIM_PORT.to_string();
        let canary = agent("l7", checkout.cgroup.path(), &["--shim-port", &port])?;
        let port_off = SHIM_PORT_NO_METRICS.to_string();
        let canary_off = agent(
            "l7-off",
            off_cgroup.path(),
            &["--shim-port", &port_off, "--no-request-metrics"],
        )?;
        for a in [&canary, &canary_off] {
            if let (Some(c), Some(pid)) = (cpus.proxy, a.pid()) {
                cpu::pin_process(pid, c)?;
            }
        }
        // The agents open their listeners in each namespace on their next
        // scan (once a second).
        let netns = checkout.client.netns();
        for port in [SHIM_PORT, SHIM_PORT_NO_METRICS] {
            wait_for_tcp(
                Some(netns),
                SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(10),
            )
            .context("the shim's listener in the client namespace")?;
        }
        let nginx = peers::nginx(prefix, &dir.0, netns, cpus.proxy)?;
        let haproxy = peers::haproxy(prefix, &dir.0, netns, cpus.proxy)?;
        Ok(Lab {
            nginx,
            haproxy,
            canary,
            canary_off,
            off_cgroup,
            plain,
            servers,
            checkout,
            dir,
        })
    }

    /// Where a peer is dialled, from which cgroup.
    fn target(&self, peer: Peer) -> (SocketAddr, &TestCgroup) {
        let vip: SocketAddr = VIP4.parse().expect("constant");
        match peer {
            Peer::Canary => (vip, &self.checkout.cgroup),
            Peer::CanaryNoMetrics => (vip, &self.off_cgroup),
            Peer::Nginx => (self.nginx.addr, &self.plain),
            Peer::Haproxy => (self.haproxy.addr, &self.plain),
        }
    }

    fn client(&self, peer: Peer, cpus: Cpus) -> Client<'_> {
        Client {
            netns: self.checkout.client.netns(),
            cgroup: self.target(peer).1,
            cpu: cpus.load,
        }
    }

    /// The processes whose CPU and memory count as the peer's.
    fn pids(&self, peer: Peer) -> Result<Vec<u32>> {
        let agent = |a: &Agent| a.pid().map(|p| vec![p]).context("the agent is not running");
        match peer {
            Peer::Canary => agent(&self.canary),
            Peer::CanaryNoMetrics => agent(&self.canary_off),
            Peer::Nginx => self.nginx.pids(),
            Peer::Haproxy => self.haproxy.pids(),
        }
    }

    fn log(&self, peer: Peer) -> String {
        match peer {
            Peer::Canary => self.canary.log_text(),
            Peer::CanaryNoMetrics => self.canary_off.log_text(),
            Peer::Nginx => self.nginx.log_text(),
            Peer::Haproxy => self.haproxy.log_text(),
        }
    }
}

/// The release binaries the L7 part runs.
struct Bins {
    canary: PathBuf,
    backend: PathBuf,
    http: PathBuf,
}

fn release_bins(build: bool) -> Result<Bins> {
    let bin = crate::bench::release_bin_finder(build, "--l7-no-build")?;
    Ok(Bins {
        canary: bin("canary")?,
        backend: bin("canary-backend")?,
        http: bin("canary-http")?,
    })
}

/// Raises the soft open-files limit to the hard one: wrk, the agent and
/// the proxies inherit it and hold 1,000 connections (2,000 sockets).
fn raise_nofile() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit");
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit");
        }
    }
    Ok(lim.rlim_cur)
}

pub fn run(args: &L7Args) -> Result<()> {
    if args.mode == L7Mode::Off {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the bench needs root (network namespaces, cgroups, BPF): run `sudo -E cargo xtask bench`"
        );
    }
    let wall = Instant::now();
    say(format!(
        "bench l7: checking tools ({})",
        PACKAGES.join(", ")
    ));
    ensure_packages(PACKAGES)?;
    let nofile = raise_nofile()?;
    if nofile < u64::from(args.idle_connections) * 2 + 256 {
        bail!(
            "open-files limit {nofile} is too low for {} connections",
            args.idle_connections
        );
    }
    let bins = release_bins(!args.no_build)?;
    if std::env::var_os("CANARY_BIN").as_deref() != Some(bins.canary.as_os_str()) {
        // SAFETY: no thread of this process reads the environment now:
        // the L4 part's helper threads ended with its runs.
        unsafe { std::env::set_var("CANARY_BIN", &bins.canary) };
    }
    // SAFETY: the handler only stores to an atomic. wrk gets the
    // terminal's SIGINT too and stops; the guards then clean up.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
    let _boost = if args.no_boost {
        None
    } else {
        Some(cpu::Boost::apply(-10)?)
    };
    let (cpus, placement) = placement(args.pin);
    let prefix = unique_prefix();
    say(format!(
        "bench l7: building the topology (namespaces {prefix}-*, cgroups canary-{prefix}-*), \
         two agents on {EXAMPLE}, nginx and HAProxy; {placement}"
    ));
    let lab = Lab::start(&prefix, &bins, cpus)?;
    let mut results = Results {
        args: args.clone(),
        runs: BTreeMap::new(),
        metrics_pairs: Vec::new(),
        head_to_head: BTreeMap::new(),
        rss: BTreeMap::new(),
        agent_idle_cpu: BTreeMap::new(),
        sanity: BTreeMap::new(),
        placement,
        env: environment(),
        profile: None,
        reruns: Vec::new(),
        wall_s: 0.0,
    };
    measure_all(&lab, &bins, cpus, &mut results)?;
    say("bench l7: tearing down (proxies, agents, pins, backends, cgroups, namespaces)");
    drop(lab);
    results.wall_s = wall.elapsed().as_secs_f64();
    results
        .env
        .insert("loadavg_end", read_trimmed("/proc/loadavg"));
    println!("{}", report::text(&results));
    let dir = PathBuf::from(crate::bench::target_dir()).join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("l7.md"), report::markdown(&results))?;
    std::fs::write(
        dir.join("l7.json"),
        serde_json::to_string_pretty(&report::json(&results))? + "\n",
    )?;
    if let Some(p) = &results.profile {
        std::fs::write(dir.join("l7-perf.txt"), p)?;
    }
    say(format!(
        "bench l7: wrote {0}/l7.md and {0}/l7.json ({1:.0} s in all)",
        dir.display(),
        results.wall_s
    ));
    Ok(())
}

/// Where wrk, the backends and the proxies run. The last allowed CPU is
/// the proxies' (and, with `same`, everyone's): the L4 part and the tests
/// pin to the first one, so a run beside them collides less.
fn placement(pin: cpu::Pin) -> (Cpus, String) {
    let allowed = cpu::allowed_cpus();
    match (pin, allowed.first(), allowed.last()) {
        (cpu::Pin::Split, Some(&first), Some(&last)) if first != last => (
            Cpus {
                load: Some(first),
                proxy: Some(last),
            },
            format!("proxies pinned alone to CPU {last}, wrk and the backends to CPU {first}"),
        ),
        (cpu::Pin::None, _, _) | (_, None, _) | (_, _, None) => {
            (Cpus::default(), "unpinned".into())
        }
        (_, _, Some(&last)) => (
            Cpus {
                load: Some(last),
                proxy: Some(last),
            },
            format!("proxies, wrk and the backends all pinned to CPU {last}"),
        ),
    }
}

/// A run that saw socket errors (wrk's 2 s timeout: the CPU was taken
/// from the whole path for that long) or non-2xx answers is run once
/// more, and the second run is kept.
fn clean_run(
    lab: &Lab,
    cpus: Cpus,
    peer: Peer,
    variant: Variant,
    args: &L7Args,
    seconds: u64,
    results: &mut Results,
) -> Result<Run> {
    let r = one_run(lab, cpus, peer, variant, args.connections, seconds)?;
    if r.wrk.socket_errors + r.wrk.non_2xx == 0 {
        return Ok(r);
    }
    say(format!(
        "bench l7:   (discarded, run again: {})",
        run_line(peer, variant, &r)
    ));
    results
        .reruns
        .push(format!("{} ({})", peer.label(), variant.key()));
    std::thread::sleep(Duration::from_millis(500));
    one_run(lab, cpus, peer, variant, args.connections, seconds)
}

fn measure_all(lab: &Lab, bins: &Bins, cpus: Cpus, results: &mut Results) -> Result<()> {
    let args = results.args.clone();
    sanity(lab, bins, results)?;
    // The agents' own background work, for the reader of the CPU column.
    let idle = Duration::from_secs(2);
    let before: Vec<u64> = [Peer::Canary, Peer::CanaryNoMetrics]
        .iter()
        .map(|p| measure::sched_ns(&lab.pids(*p)?))
        .collect::<Result<_>>()?;
    std::thread::sleep(idle);
    for (p, b) in [Peer::Canary, Peer::CanaryNoMetrics].iter().zip(before) {
        let used = measure::sched_ns(&lab.pids(*p)?)?.saturating_sub(b);
        results
            .agent_idle_cpu
            .insert(*p, used as f64 / 1e9 / idle.as_secs_f64());
    }
    say("bench l7: warming up every peer (1 s of wrk each, not counted)");
    for peer in Peer::ALL {
        check_interrupted()?;
        one_run(lab, cpus, peer, Variant::Split, args.connections, 1)?;
    }
    let per_round = 6.0 * (args.seconds as f64 + 0.4);
    say(format!(
        "bench l7: throughput: {} rounds × 6 runs × {} s (about {:.0} s)",
        args.rounds,
        args.seconds,
        per_round * args.rounds as f64
    ));
    for round in 0..args.rounds.max(1) {
        for variant in Variant::ALL {
            for peer in round_order(round) {
                check_interrupted()?;
                let r = clean_run(lab, cpus, peer, variant, &args, args.seconds, results)?;
                say(format!(
                    "bench l7:   round {}/{} {}",
                    round + 1,
                    args.rounds,
                    run_line(peer, variant, &r)
                ));
                results.runs.entry((peer, variant)).or_default().push(r);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    head_to_head(lab, cpus, &args, results)?;
    metrics_pairs(lab, cpus, &args, results)?;
    say(format!(
        "bench l7: RSS with {} idle keep-alive connections, {} rounds",
        args.idle_connections, args.rounds
    ));
    let script = lab.dir.0.join("idle.lua");
    std::fs::write(&script, measure::idle_script(args.idle_connections))?;
    for round in 0..args.rounds.max(1) {
        for i in 0..3 {
            let peer = [Peer::Canary, Peer::Nginx, Peer::Haproxy][(i + round) % 3];
            check_interrupted()?;
            let (target, _) = lab.target(peer);
            let pids = || lab.pids(peer);
            let r = measure::rss_at(
                &lab.client(peer, cpus),
                &pids,
                target,
                args.idle_connections,
                &script,
            )
            .with_context(|| {
                format!(
                    "{}: RSS at {} connections",
                    peer.label(),
                    args.idle_connections
                )
            })?;
            say(format!(
                "bench l7:   round {}/{} {:<14} RSS {:.1} MiB idle → {:.1} MiB with {} connections \
                 (+{} descriptors, {} requests, {} ms)",
                round + 1,
                args.rounds,
                peer.label(),
                r.idle_kib as f64 / 1024.0,
                r.loaded_kib as f64 / 1024.0,
                args.idle_connections,
                r.extra_fds,
                r.requests,
                r.settle_ms
            ));
            results.rss.entry(peer).or_default().push(r);
        }
    }
    if args.profile {
        let mut text = profile::syscalls(lab, cpus, &args)?;
        text += &profile::perf_record(lab, cpus, &args)?;
        results.profile = Some(text);
    }
    // Every peer must still be up: a crash would void its numbers.
    for peer in Peer::ALL {
        for pid in lab.pids(peer)? {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                bail!(
                    "{} exited during the bench; log:\n{}",
                    peer.label(),
                    lab.log(peer)
                );
            }
        }
    }
    Ok(())
}

/// One run, for the progress log.
fn run_line(peer: Peer, variant: Variant, r: &Run) -> String {
    let (p, c, s) = r.split_us();
    let (user, sys) = r.proxy_user_sys_us();
    format!(
        "{:<30} {:<10} {:>8.0} req/s  p50 {:>7} p99 {:>7}  proxy {:.4} CPU-s/1000 req ({:>3.0}% \
         of a CPU, {:.2} context switches/req); µs/req proxy {p:.1} (user {user:.1} sys {sys:.1}) \
         wrk {c:.1} backends {s:.1}{}",
        peer.label(),
        variant.label(),
        r.wrk.requests_per_sec,
        report::fmt_us(r.wrk.latency_p50_us),
        report::fmt_us(r.wrk.latency_p99_us),
        r.cpu_s_per_1000(),
        r.proxy_cpu_share() * 100.0,
        r.ctx_switches_per_request(),
        if r.wrk.socket_errors + r.wrk.non_2xx > 0 {
            format!(
                "  ({} socket errors, {} non-2xx)",
                r.wrk.socket_errors, r.wrk.non_2xx
            )
        } else {
            String::new()
        }
    )
}

/// Head to head: wrk through canary and nginx at the same time, then
/// through canary and HAProxy, `--l7-pairs` runs per route. On this VM a
/// run lands in one of a few throughput modes for seconds at a time, and
/// one proxy measured after another can land in different ones (one build
/// has measured 0.86–1.17× nginx's CPU per request in sequential rounds);
/// two proxies loaded at once share the mode, so their ratio holds from
/// run to run. Both run at half the CPU each, so absolute figures are not
/// those of the rounds.
fn head_to_head(lab: &Lab, cpus: Cpus, args: &L7Args, results: &mut Results) -> Result<()> {
    if args.pairs == 0 {
        return Ok(());
    }
    say(format!(
        "bench l7: head to head: {} runs × {} s per route and peer, wrk through canary and the \
         peer at once",
        args.pairs, args.metrics_seconds
    ));
    for other in [Peer::Nginx, Peer::Haproxy] {
        for variant in Variant::ALL {
            let runs = at_once(
                lab,
                cpus,
                [Peer::Canary, other],
                variant,
                args.pairs,
                args,
                results,
            )?;
            results.head_to_head.insert((other, variant), runs);
        }
    }
    Ok(())
}

/// Request metrics on / off: wrk through both agents at the same time
/// (the same config, the same client namespace and CPU, each agent with
/// its cgroup), so whatever else slows the machine slows both alike; the
/// ratio of the two is the metrics' cost.
fn metrics_pairs(lab: &Lab, cpus: Cpus, args: &L7Args, results: &mut Results) -> Result<()> {
    say(format!(
        "bench l7: request metrics on / off: {} runs × {} s, wrk through both agents at once",
        args.metrics_pairs, args.metrics_seconds
    ));
    let peers = [Peer::Canary, Peer::CanaryNoMetrics];
    let runs = at_once(
        lab,
        cpus,
        peers,
        Variant::Split,
        args.metrics_pairs,
        args,
        results,
    )?;
    results.metrics_pairs = runs;
    Ok(())
}

/// `n` runs of wrk through both `peers` at once, each as (first peer's
/// run, second's).
/// The wrk processes start in alternating order; a run with socket errors
/// or non-2xx answers is run once more.
fn at_once(
    lab: &Lab,
    cpus: Cpus,
    peers: [Peer; 2],
    variant: Variant,
    n: usize,
    args: &L7Args,
    results: &mut Results,
) -> Result<Vec<(Run, Run)>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        check_interrupted()?;
        let order = if i % 2 == 0 {
            peers
        } else {
            [peers[1], peers[0]]
        };
        let mut attempt = 0;
        let (a, b) = loop {
            attempt += 1;
            let mut runs = peer_runs(
                lab,
                cpus,
                &order,
                variant,
                args.connections,
                args.metrics_seconds,
            )?;
            let (Some(second), Some(first)) = (runs.pop(), runs.pop()) else {
                bail!("wrk returned fewer runs than proxies");
            };
            let (a, b) = if i % 2 == 0 {
                (first, second)
            } else {
                (second, first)
            };
            let clean = [&a, &b]
                .iter()
                .all(|r| r.wrk.socket_errors + r.wrk.non_2xx == 0);
            if clean || attempt == 2 {
                break (a, b);
            }
            say("bench l7:   (discarded for socket errors or non-2xx, run again)");
            results.reruns.push(format!(
                "{} + {} ({})",
                peers[0].label(),
                peers[1].label(),
                variant.key()
            ));
        };
        for (peer, r) in [(peers[0], &a), (peers[1], &b)] {
            say(format!(
                "bench l7:   {}/{} {}",
                i + 1,
                n,
                run_line(peer, variant, r)
            ));
        }
        out.push((a, b));
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(out)
}

/// The peers of one round, rotated from round to round.
fn round_order(round: usize) -> Vec<Peer> {
    let base = [Peer::Canary, Peer::Nginx, Peer::Haproxy];
    (0..base.len())
        .map(|i| base[(i + round) % base.len()])
        .collect()
}

fn one_run(
    lab: &Lab,
    cpus: Cpus,
    peer: Peer,
    variant: Variant,
    connections: u32,
    seconds: u64,
) -> Result<Run> {
    let mut runs = peer_runs(lab, cpus, &[peer], variant, connections, seconds)?;
    runs.pop().context("wrk returned no run")
}

/// wrk through each of `peers` at the same time.
fn peer_runs(
    lab: &Lab,
    cpus: Cpus,
    peers: &[Peer],
    variant: Variant,
    connections: u32,
    seconds: u64,
) -> Result<Vec<Run>> {
    let legs = peers
        .iter()
        .map(|p| {
            Ok(measure::Leg {
                client: lab.client(*p, cpus),
                proxy_pids: lab.pids(*p)?,
                target: lab.target(*p).0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    measure::wrk_runs(
        &legs,
        lab.servers.path(),
        cpus,
        variant.headers(),
        connections,
        seconds,
    )
    .with_context(|| {
        format!(
            "{} ({})",
            peers
                .iter()
                .map(|p| p.label())
                .collect::<Vec<_>>()
                .join(" + "),
            variant.key()
        )
    })
}

/// Every peer answers, from the pods it should, at the split it should:
/// 1,000 requests without the header on 50 keep-alive connections (v2
/// within 4 binomial σ of 5%), 200 with it (all v2). A broken path would
/// make every number after it meaningless, so this fails the bench.
fn sanity(lab: &Lab, bins: &Bins, results: &mut Results) -> Result<()> {
    say("bench l7: checking every peer routes as the YAML says (1,000 + 200 requests each)");
    for peer in Peer::ALL {
        check_interrupted()?;
        let (target, cgroup) = lab.target(peer);
        let netns = lab.checkout.client.netns();
        let get = |args: HttpArgs| {
            run_http(
                &bins.http,
                Some(netns),
                Some(cgroup),
                &args,
                Duration::from_secs(30),
            )
        };
        let split = get(HttpArgs::new(target, 50, 20).concurrency(8))
            .with_context(|| format!("{}: sanity requests", peer.label()))?;
        let header = get(HttpArgs::new(target, 10, 20).concurrency(4).header(HEADER))
            .with_context(|| format!("{}: sanity requests with the header", peer.label()))?;
        let share = |r: &canary_tests::httpclient::HttpReport| {
            r.version("v2") as f64 / r.requests.max(1) as f64
        };
        let sigma = (V2_SHARE * (1.0 - V2_SHARE) / split.requests.max(1) as f64).sqrt();
        if split.ok != 1000 || header.ok != 200 {
            bail!(
                "{}: not every request answered 200: {split:?} {header:?}; log:\n{}",
                peer.label(),
                lab.log(peer)
            );
        }
        if (share(&split) - V2_SHARE).abs() > 4.0 * sigma || split.by_pod.len() != 3 {
            bail!(
                "{}: v2 share {:.3} without the header (expected {V2_SHARE} ± {:.3}), pods {:?}",
                peer.label(),
                share(&split),
                4.0 * sigma,
                split.by_pod
            );
        }
        if header.version("v2") != header.requests {
            bail!(
                "{}: with {HEADER}, {:?} instead of only v2",
                peer.label(),
                header.by_version
            );
        }
        say(format!(
            "bench l7:   {:<30} ok: v2 {:.1}% without the header ({}), 100% with it",
            peer.label(),
            share(&split) * 100.0,
            split
                .by_pod
                .iter()
                .map(|(p, n)| format!("{p} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        results
            .sanity
            .insert(peer, (split.requests, share(&split), share(&header)));
    }
    Ok(())
}

fn environment() -> BTreeMap<&'static str, String> {
    let mut env = machine_environment();
    env.insert("nginx", first_line("nginx", &["-v"]));
    env.insert("haproxy", first_line("haproxy", &["-v"]));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_rotate() {
        assert_eq!(round_order(0), [Peer::Canary, Peer::Nginx, Peer::Haproxy]);
        assert_eq!(round_order(1), [Peer::Nginx, Peer::Haproxy, Peer::Canary]);
        assert_eq!(round_order(2), [Peer::Haproxy, Peer::Canary, Peer::Nginx]);
    }
}
