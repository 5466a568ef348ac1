//! `cargo xtask bench`: canary beside its peers, in one run, as ratios.
//!
//! Every scenario runs from a client network namespace on the same bridge
//! as the same three checkout pods (see [`world`]):
//!
//! | scenario | client | target |
//! |---|---|---|
//! | direct | canary's netns, cgroup without programs | pod 10.77.0.11 |
//! | direct, canary attached | canary's netns and cgroup | pod 10.77.0.11 |
//! | canary, one endpoint | canary's netns and cgroup | VIP 10.96.0.11 → 10.77.0.11 |
//! | canary, 90/10 | canary's netns and cgroup | VIP 10.96.0.10 |
//! | canary, 10k services | canary's netns, cgroup of the 10k agent | VIP 10.96.0.10 |
//! | direct, conntrack on | iptables netns | pod 10.77.0.11 |
//! | iptables, 90/10 | iptables netns (1 service) | VIP 10.96.0.10 |
//! | iptables, 10k services | iptables netns (10,001 services) | VIP 10.96.0.10 |
//!
//! Each round runs every scenario with wrk (new connection per request, and
//! keep-alive), in an order rotated from round to round; the report gives
//! the median of the rounds. Then the at-once runs: wrk through both
//! scenarios of a compared pair at the same time (canary attached and the
//! direct path, the VIPs and the direct path, canary and iptables, 10,000
//! services and one, the 90/10 VIP and the one-endpoint VIP), whose
//! per-run ratios hold where sequential rounds swing with the VM; the
//! targets are judged on them. Then `connect()` timing with `canary-probe
//! --connect-timing` (interleaved rounds, differences paired by round), and
//! how fast a `canary weights` change reaches new connections
//! (`canary-probe --timeline`). Results go to stdout, `target/bench/l4.md`
//! and `target/bench/l4.json`.
//!
//! On a small or shared machine req/s moves with everything else that runs,
//! so the bench also (see [`cpu`], [`bpfstats`]): pins clients and backends
//! to one CPU (`--pin`), raises its priority for the run (`--no-boost` to
//! skip), accounts the CPU time of the client's and the backends' cgroups
//! per request, reports how busy the rest of the machine was, and reads
//! canary's in-kernel cost per connection from the kernel's BPF run-time
//! statistics.

mod bpfstats;
mod configs;
pub(crate) mod cpu;
mod iptables;
mod report;
pub(crate) mod world;
pub(crate) mod wrk;

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use canary_tests::checkout::{PODS, PORT, VIP4};
use canary_tests::probe::{ConnectTiming, ProbeArgs, ProbeReport};
use canary_tests::{ChildGuard, run_in, spawn_in, unique_prefix};

use crate::setup::{ensure_packages, say};
use iptables::Backend;
use world::{Client, ClientId, World};
use wrk::{Load, Mode, WrkResult};

/// A wrk run is measured again when other work took more than this share
/// of the bench's CPU meanwhile.
const MAX_BACKGROUND: f64 = 0.15;

/// Debian packages the bench drives.
const PACKAGES: &[&str] = &["wrk", "iptables", "bpftool"];

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 2)]
    seconds: u64,
    /// Rounds; the report shows the median of the rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// wrk connections (`-c`); wrk runs one thread.
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// `connect()` calls timed per scenario, in all.
    #[arg(long, default_value_t = 5000)]
    connects: u64,
    /// Rounds the timed `connect()` calls are split into, interleaving the
    /// scenarios (so each round compares paths under the same conditions).
    #[arg(long, default_value_t = 10)]
    connect_rounds: usize,
    /// Services loaded in the scale scenarios.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// iptables flavour for the kube-proxy peer (default: legacy if
    /// installed, else nft).
    #[arg(long, value_enum)]
    iptables: Option<Backend>,
    /// Use the release binaries already built instead of building them.
    #[arg(long)]
    no_build: bool,
    /// CPU placement of clients and backends. `same` (one CPU for the
    /// whole path) makes req/s the path's throughput per CPU and keeps the
    /// scheduler's placement out of the numbers.
    #[arg(long, value_enum, default_value_t = cpu::Pin::Same)]
    pin: cpu::Pin,
    /// Do not raise the bench's scheduling priority (nice and autogroup
    /// nice -10 for the run) over other work on the machine.
    #[arg(long)]
    no_boost: bool,
    /// Run only these scenarios (keys as in l4.json: direct,
    /// direct_canary_attached, canary_one, canary_split, canary_10k,
    /// direct_conntrack, iptables_split, iptables_10k) and, if listed,
    /// `weights`. Ratios against scenarios left out show n/a.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// At-once runs: this many wrk runs per mode through both scenarios
    /// of each compared pair (VIPs and direct, canary and iptables, 10k
    /// services and one) at the same time. The targets are judged on
    /// these.
    #[arg(long, default_value_t = 6)]
    pairs: usize,
    /// Seconds per at-once wrk run. Longer than `--seconds`: keep-alive
    /// ratios of 2 s runs moved ±5% from run to run, of 5 s runs ±2–3%.
    #[arg(long, default_value_t = 5)]
    at_once_seconds: u64,
}

/// One measured path.
pub struct Scenario {
    pub key: &'static str,
    pub label: &'static str,
    pub client: ClientId,
    pub target: SocketAddr,
    /// What the sanity check expects to see answer.
    pub expect: Expect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Only `checkout-v1-a`, and `getpeername()` shows the target.
    OnePod,
    /// v1 (two pods) 90%, v2 10%, and `getpeername()` shows the VIP.
    Split,
}

/// The pod the direct baseline (and the one-endpoint VIP) reaches.
fn direct_target() -> SocketAddr {
    SocketAddr::new(PODS[0].2.parse().expect("constant"), PORT)
}

fn scenarios() -> Vec<Scenario> {
    let vip: SocketAddr = VIP4.parse().expect("constant");
    let s = |key, label, client, target, expect| Scenario {
        key,
        label,
        client,
        target,
        expect,
    };
    vec![
        s(
            "direct",
            "direct (one pod)",
            ClientId::Plain,
            direct_target(),
            Expect::OnePod,
        ),
        s(
            "direct_canary_attached",
            "direct, canary attached",
            ClientId::CanarySmall,
            direct_target(),
            Expect::OnePod,
        ),
        s(
            "canary_one",
            "canary VIP, one endpoint",
            ClientId::CanarySmall,
            configs::one_vip(),
            Expect::OnePod,
        ),
        s(
            "canary_split",
            "canary VIP, 90/10",
            ClientId::CanarySmall,
            vip,
            Expect::Split,
        ),
        s(
            "canary_10k",
            "canary, 10k services",
            ClientId::CanaryLarge,
            vip,
            Expect::Split,
        ),
        s(
            "direct_conntrack",
            "direct, conntrack on",
            ClientId::Iptables1,
            direct_target(),
            Expect::OnePod,
        ),
        s(
            "iptables_split",
            "iptables DNAT, 90/10",
            ClientId::Iptables1,
            vip,
            Expect::Split,
        ),
        s(
            "iptables_10k",
            "iptables, 10k services",
            ClientId::Iptables10k,
            vip,
            Expect::Split,
        ),
    ]
}

/// Everything measured, for the report.
pub struct Results {
    pub args_json: serde_json::Value,
    pub env: BTreeMap<&'static str, String>,
    pub scenarios: Vec<Scenario>,
    /// (scenario key, mode) → one result per round.
    pub wrk: BTreeMap<(&'static str, &'static str), Vec<WrkResult>>,
    /// scenario key → new-connection wrk runs made with the kernel's BPF
    /// run-time accounting on (kept apart: the accounting's own clock
    /// reads would slow canary's runs and not the direct ones).
    pub kernel: BTreeMap<&'static str, Vec<WrkResult>>,
    /// scenario key → one timing per connect round (round i of every
    /// scenario ran in the same pass).
    pub connect: BTreeMap<&'static str, Vec<ConnectTiming>>,
    /// (scenario key, the scenario it is compared with, mode) → (its run,
    /// the other's) of wrk runs made at the same time (see `at_once`).
    pub at_once: BTreeMap<AtOnceKey, Vec<(WrkResult, WrkResult)>>,
    /// scenario key → the sanity probe's report.
    pub sanity: BTreeMap<&'static str, ProbeReport>,
    pub weights: Vec<WeightsTrial>,
    pub setup: BTreeMap<&'static str, f64>,
    pub load: Load,
    /// `load`, for as long as each at-once run lasts.
    pub at_once_load: Load,
    pub rounds: usize,
    pub services: usize,
    /// CPUs the bench's path runs on (for the background share).
    pub cpus: usize,
    pub machine_cpus: usize,
    /// How clients and backends were placed, for the report.
    pub placement: String,
    /// wrk runs measured again because other work disturbed them.
    pub repeated: usize,
    pub wall_s: f64,
}

/// (scenario, the scenario it ran beside, mode).
pub type AtOnceKey = (&'static str, &'static str, &'static str);

/// The comparisons that run at once: the cost canary puts on traffic that
/// is not for a Service (attached, direct), then the targets: the
/// VIPs against the direct path, canary against iptables, and canary
/// among 10,000 services against canary with one. And the 90/10 VIP
/// against the one-endpoint VIP: canary's work is the same on both sides,
/// so this is what spreading the load over three pods (where direct and
/// the one-endpoint VIP use one) costs the 90/10 ratios.
const AT_ONCE: [(&str, &str); 6] = [
    ("direct_canary_attached", "direct"),
    ("canary_one", "direct"),
    ("canary_split", "direct"),
    ("canary_split", "canary_one"),
    ("canary_split", "iptables_split"),
    ("canary_10k", "canary_split"),
];

/// One `canary weights` flip, 100/0 → 0/100, seen by a client loop.
#[derive(Clone, Copy, Debug)]
pub struct WeightsTrial {
    /// The CLI call took this long (it returns once the map is written).
    pub cli_ms: f64,
    /// Start of the first connection answered by v2, after the CLI
    /// returned (negative: before it returned).
    pub first_v2_after_return_ms: f64,
    /// Start of the last connection answered by v1, after the CLI returned.
    pub last_v1_after_return_ms: f64,
    /// Mean time between the loop's connections (its resolution).
    pub loop_interval_ms: f64,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM while the bench runs (wrk and the probes get
/// the terminal's SIGINT too and stop; the bench then returns an error and
/// the guards clean up), and puts the previous handlers back on drop.
struct InterruptGuard {
    previous: [(libc::c_int, libc::sighandler_t); 2],
}

impl InterruptGuard {
    fn install() -> Self {
        let handler = on_interrupt as *const () as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic.
        let previous =
            [libc::SIGINT, libc::SIGTERM].map(|sig| (sig, unsafe { libc::signal(sig, handler) }));
        InterruptGuard { previous }
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        for (sig, handler) in self.previous {
            if handler != libc::SIG_ERR {
                // SAFETY: restores the handler that was installed before.
                unsafe { libc::signal(sig, handler) };
            }
        }
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the bench needs root (network namespaces, cgroups, BPF, iptables): run `sudo -E cargo xtask bench`"
        );
    }
    say(format!("bench: checking tools ({})", PACKAGES.join(", ")));
    ensure_packages(PACKAGES)?;
    let backend = match args.iptables {
        Some(b) => b,
        None if Backend::Legacy.available() => Backend::Legacy,
        None => Backend::Nft,
    };
    if !backend.available() {
        bail!("{} is not installed", backend.restore_bin());
    }
    say(format!(
        "bench: the kube-proxy peer uses {}",
        backend.name()
    ));

    let built = Instant::now();
    let bins = release_bins(!args.no_build, args.pin)?;
    let build_s = built.elapsed().as_secs_f64();
    // The run's own clock starts after the build.
    let wall = Instant::now();
    // SAFETY: still single-threaded: nothing has spawned a thread yet, so
    // no one reads the environment concurrently.
    unsafe { std::env::set_var("CANARY_BIN", &bins.canary) };
    let _signals = InterruptGuard::install();
    let mut phase = Instant::now();

    let _boost = if args.no_boost {
        None
    } else {
        say(
            "bench: raising this session's scheduling priority for the run (nice -10; restored at the end)",
        );
        Some(cpu::Boost::apply(-10)?)
    };
    let prefix = unique_prefix();
    let load = Load {
        threads: 1,
        connections: args.connections,
        duration: Duration::from_secs(args.seconds),
        cpu: bins.placement.map(|p| p.client),
        busy_cpu: bins
            .placement
            .filter(|p| p.client == p.server)
            .map(|p| p.client),
    };
    let mut results = Results {
        args_json: serde_json::json!({
            "seconds": args.seconds,
            "rounds": args.rounds,
            "pairs": args.pairs,
            "at_once_seconds": args.at_once_seconds,
            "connections": args.connections,
            "connects": args.connects,
            "connect_rounds": args.connect_rounds,
            "services": args.services,
            "iptables": backend.name(),
        }),
        env: environment(backend),
        scenarios: scenarios()
            .into_iter()
            .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.key))
            .collect(),
        wrk: BTreeMap::new(),
        kernel: BTreeMap::new(),
        connect: BTreeMap::new(),
        sanity: BTreeMap::new(),
        at_once: BTreeMap::new(),
        weights: Vec::new(),
        setup: BTreeMap::new(),
        load,
        at_once_load: Load {
            duration: Duration::from_secs(args.at_once_seconds.max(1)),
            ..load
        },
        rounds: args.rounds.max(1),
        services: args.services,
        cpus: match bins.placement {
            Some(p) if p.client == p.server => 1,
            _ => std::thread::available_parallelism().map_or(1, usize::from),
        },
        machine_cpus: std::thread::available_parallelism().map_or(1, usize::from),
        repeated: 0,
        placement: match bins.placement {
            Some(p) if p.client == p.server => format!(
                "clients and backends share CPU {} (req/s = per CPU)",
                p.client
            ),
            Some(p) => format!("clients on CPU {}, backends on CPU {}", p.client, p.server),
            None => "unpinned".into(),
        } + if args.no_boost {
            ""
        } else {
            ", priority raised"
        },
        wall_s: 0.0,
    };

    say(format!(
        "bench: generating configs ({} generated Services for the scale scenario)",
        args.services
    ));
    let configs = configs::Configs::generate(
        &prefix,
        Path::new("deploy/examples/checkout"),
        args.services,
    )?;
    say(format!(
        "bench: building the topology (namespaces {prefix}-*, cgroups canary-{prefix}-*)"
    ));
    let base = world::Base::start(&prefix, &bins.backend)?;
    if let Some(p) = bins.placement {
        say(format!(
            "bench: pinning clients (wrk, probe) to CPU {} and the backends to CPU {}",
            p.client, p.server
        ));
        for backend in &base.checkout.backends {
            cpu::pin_process(backend.pid(), p.server)?;
        }
    }
    install_iptables(&base, backend, args.services, &mut results)?;
    check_interrupted()?;
    say(
        "bench: starting two canary agents (small config; 10k config, which takes a while to load)",
    );
    let world = base.with_agents(&prefix, &configs.small, &configs.large)?;
    results
        .setup
        .insert("canary_agent_10k_ready_s", world.large_start.as_secs_f64());
    let served = (World::served(&world.small)?, World::served(&world.large)?);
    say(format!(
        "bench: agents ready: {} and {} Services served ({:.1} s for the large one)",
        served.0,
        served.1,
        world.large_start.as_secs_f64()
    ));
    if served.1 < args.services {
        bail!(
            "the 10k agent serves only {} Services; its log:\n{}",
            served.1,
            world.large.log_text()
        );
    }

    let mut lap = |results: &mut Results, name: &'static str| {
        results.setup.insert(name, phase.elapsed().as_secs_f64());
        phase = Instant::now();
    };
    results.setup.insert("build_s", build_s);
    lap(&mut results, "setup_s");
    sanity(&world, &bins, &mut results)?;
    lap(&mut results, "sanity_s");
    throughput(&world, &mut results)?;
    at_once(&world, args.pairs, &mut results)?;
    lap(&mut results, "throughput_s");
    let programs = (
        bpfstats::agent_programs(&world.small.pin_path)?,
        bpfstats::agent_programs(&world.large.pin_path)?,
    );
    kernel_cost(&world, &programs, &mut results)?;
    lap(&mut results, "kernel_cost_s");
    connect_timing(
        &world,
        &bins,
        args.connects,
        args.connect_rounds.max(1),
        &mut results,
    )?;
    lap(&mut results, "connect_timing_s");
    if args.only.is_empty() || args.only.iter().any(|o| o == "weights") {
        results.weights = weights_latency(&world, &bins)?;
    }
    lap(&mut results, "weights_s");

    say("bench: tearing down (agents, pins, backends, cgroups, namespaces)");
    drop(world);
    drop(configs);
    lap(&mut results, "teardown_s");
    results.wall_s = wall.elapsed().as_secs_f64();
    results
        .env
        .insert("loadavg_end", read_trimmed("/proc/loadavg"));

    let text = report::text(&results);
    println!("{text}");
    let dir = PathBuf::from(target_dir()).join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("l4.md"), report::markdown(&results))?;
    std::fs::write(
        dir.join("l4.json"),
        serde_json::to_string_pretty(&report::json(&results))? + "\n",
    )?;
    say(format!(
        "bench: wrote {0}/l4.md and {0}/l4.json ({1:.0} s after the build; phases: {2})",
        dir.display(),
        results.wall_s,
        results
            .setup
            .iter()
            .filter(|(k, _)| k.ends_with("_s"))
            .map(|(k, v)| format!("{} {v:.0} s", k.trim_end_matches("_s")))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

/// The release binaries the bench runs, and where its processes run.
struct Bins {
    canary: PathBuf,
    backend: PathBuf,
    probe: PathBuf,
    placement: Option<cpu::Placement>,
}

// === impl Bins ===

impl Bins {
    fn probe_command(&self, args: &ProbeArgs) -> Command {
        let mut cmd = Command::new(&self.probe);
        cmd.args(args.to_args());
        if let Some(p) = self.placement {
            cpu::pin_command(&mut cmd, p.client);
        }
        cmd
    }

    /// Runs `canary-probe` from `client` to the end; its report.
    fn probe(&self, client: &Client<'_>, args: &ProbeArgs) -> Result<ProbeReport> {
        let out = run_in(
            self.probe_command(args),
            Some(client.netns),
            Some(client.cgroup),
            args.effective_wall_timeout(),
        )?;
        ProbeReport::from_json(&out)
    }

    /// Starts `canary-probe` from `client`; collect with `ProbeReport::wait`.
    fn spawn_probe(&self, client: &Client<'_>, args: &ProbeArgs) -> Result<ChildGuard> {
        let mut cmd = self.probe_command(args);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        spawn_in(cmd, Some(client.netns), Some(client.cgroup))
    }
}

pub(crate) fn target_dir() -> String {
    std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())
}

/// Builds (unless `build` is false) and locates the release binaries both
/// benches run; `skip_flag` is the option that skipped the build, for the
/// error when a binary is missing.
pub(crate) fn release_bin_finder(
    build: bool,
    skip_flag: &str,
) -> Result<impl Fn(&str) -> Result<PathBuf>> {
    if build {
        say(
            "bench: building release binaries (canary with its kernel object and profile-guided \
             optimisation, backend, probe, http client)",
        );
        crate::pgo::build_release(true)?;
    }
    let dir = std::fs::canonicalize(PathBuf::from(target_dir()).join("release"))
        .with_context(|| format!("no target/release: build first (drop {skip_flag})"))?;
    let skip_flag = skip_flag.to_owned();
    Ok(move |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if !p.is_file() {
            bail!("{} missing: build first (drop {skip_flag})", p.display());
        }
        Ok(p)
    })
}

fn release_bins(build: bool, pin: cpu::Pin) -> Result<Bins> {
    let bin = release_bin_finder(build, "--no-build")?;
    Ok(Bins {
        canary: bin("canary")?,
        backend: bin("canary-backend")?,
        probe: bin("canary-probe")?,
        placement: cpu::Placement::new(pin),
    })
}

/// kube-proxy's rules: checkout-service alone in `ipt1`; after `services`
/// generated Services in `ipt10k`.
fn install_iptables(
    base: &world::Base,
    backend: Backend,
    services: usize,
    results: &mut Results,
) -> Result<()> {
    let pods: Vec<SocketAddrV4> = PODS
        .iter()
        .map(|(_, _, v4, _)| SocketAddrV4::new(v4.parse().expect("constant"), PORT))
        .collect();
    let vip: SocketAddrV4 = VIP4.parse().expect("constant");
    // 90/10 between the subsets; v1 has two pods.
    let checkout = iptables::Service {
        name: "prod/checkout-service:http".into(),
        vip,
        endpoints: vec![(pods[0], 0.45), (pods[1], 0.45), (pods[2], 0.10)],
    };
    say("bench: kube-proxy rules for 1 Service in the ipt1 namespace");
    let (_, rules1) = iptables::install(
        backend,
        base.ipt1.netns(),
        &iptables::ruleset(std::slice::from_ref(&checkout)),
    )?;
    say(format!(
        "bench: kube-proxy rules for {services} + 1 Services in the ipt10k namespace (iptables-restore)"
    ));
    let mut all = iptables::generated(services, &pods, PORT);
    all.push(checkout);
    let (took, rules10k) =
        iptables::install(backend, base.ipt10k.netns(), &iptables::ruleset(&all))?;
    say(format!(
        "bench: {rules10k} nat rules loaded in {:.1} s",
        took.as_secs_f64()
    ));
    results.setup.insert("iptables_rules_1", rules1 as f64);
    results.setup.insert("iptables_rules_10k", rules10k as f64);
    results
        .setup
        .insert("iptables_restore_10k_s", took.as_secs_f64());
    Ok(())
}

/// 1,000 HTTP requests per scenario: each path works, answers from the
/// pods it should, at the split it should. A broken path would make every
/// number after it meaningless, so this fails the bench.
fn sanity(world: &World, bins: &Bins, results: &mut Results) -> Result<()> {
    say("bench: checking every path answers as expected (1,000 requests each)");
    const N: u64 = 1000;
    for s in &results.scenarios {
        check_interrupted()?;
        let r = bins
            .probe(
                &world.client(s.client),
                &ProbeArgs::count(s.target, N).concurrency(4),
            )
            .with_context(|| format!("{}: probe", s.label))?;
        let fail = |why: String| -> Result<()> {
            bail!("{}: {why}: {r:?}", s.label);
        };
        if r.ok != N || r.peer_is_target != N {
            fail(format!(
                "{} of {N} answered, {} showed the target as peer",
                r.ok, r.peer_is_target
            ))?;
        }
        match s.expect {
            Expect::OnePod => {
                if r.by_pod.get(configs::ONE_POD) != Some(&N) {
                    fail(format!("expected only {}", configs::ONE_POD))?;
                }
            }
            Expect::Split => {
                // Within 4 binomial standard deviations of 10%.
                let v2 = r.version_share("v2");
                let sigma = (0.1 * 0.9 / N as f64).sqrt();
                if (v2 - 0.1).abs() > 4.0 * sigma || r.by_pod.len() != 3 {
                    fail(format!("v2 share {v2:.3}, pods {:?}", r.by_pod))?;
                }
            }
        }
        say(format!(
            "bench:   {:<28} ok {N}/{N}, {}",
            s.label,
            r.by_pod
                .iter()
                .map(|(p, n)| format!("{p} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        results.sanity.insert(s.key, r);
    }
    Ok(())
}

/// `rounds` × every scenario × both modes, with wrk (the kernel's BPF
/// accounting off, as in production).
fn throughput(world: &World, results: &mut Results) -> Result<()> {
    let n = results.scenarios.len();
    let per_run = results.load.duration.as_secs_f64();
    say(format!(
        "bench: throughput: {} rounds × {n} scenarios × 2 modes × {per_run:.0} s (about {:.0} s)",
        results.rounds,
        (results.rounds * n * 2) as f64 * (per_run + 0.3)
    ));
    // A run during which other work took a good part of the bench's CPU is
    // measured again, a bounded number of times.
    let max_repeats = (results.rounds * n * 2).div_ceil(8);
    for round in 0..results.rounds {
        for i in 0..n {
            // Rotate the order each round, and the mode order too.
            let s = &results.scenarios[(i + round) % n];
            let modes = if (i + round) % 2 == 0 {
                Mode::ALL
            } else {
                [Mode::KeepAlive, Mode::NewConn]
            };
            for mode in modes {
                let r = loop {
                    check_interrupted()?;
                    let r = measure(world, &results.load, s, mode, None)?;
                    let others = r.background_share(results.cpus);
                    say(format!(
                        "bench:   round {}/{} {:<28} {:<10} {:>9.0} req/s {:>6.1} µs CPU/req, \
                         others {:>3.0}%{}",
                        round + 1,
                        results.rounds,
                        s.label,
                        mode.key(),
                        r.requests_per_sec,
                        r.cpu_us_per_request(),
                        others * 100.0,
                        if r.socket_errors + r.non_2xx > 0 {
                            format!(
                                "  ({} socket errors, {} non-2xx)",
                                r.socket_errors, r.non_2xx
                            )
                        } else {
                            String::new()
                        }
                    ));
                    // Let the server side's closing sockets and threads settle.
                    std::thread::sleep(Duration::from_millis(100));
                    if others > MAX_BACKGROUND && results.repeated < max_repeats {
                        results.repeated += 1;
                        say(format!(
                            "bench:   other work took {:.0}% of the bench's CPU during that run; \
                             measuring it again ({} of at most {max_repeats} repeats)",
                            others * 100.0,
                            results.repeated
                        ));
                        continue;
                    }
                    break r;
                };
                results.wrk.entry((s.key, mode.key())).or_default().push(r);
            }
        }
    }
    Ok(())
}

/// wrk through both scenarios of each [`AT_ONCE`] pair at the same time,
/// `pairs` runs per pair and mode, the two wrk started in alternating
/// order. Rounds run one after the other can land in different throughput
/// modes of this VM (the direct path alone has ranged 5200–7400 new
/// connections/s); two loads at once share the mode, so their ratio holds
/// from run to run. Each wrk gets about half the CPU and the backend pods
/// serve both, so the ratio weighs the difference against the client's
/// share of the path rather than the whole path's: for canary against
/// the direct path, the stricter reading.
fn at_once(world: &World, pairs: usize, results: &mut Results) -> Result<()> {
    let find = |key: &str| results.scenarios.iter().find(|s| s.key == key);
    let legs: Vec<(&Scenario, &Scenario)> = AT_ONCE
        .iter()
        .filter_map(|(a, b)| Some((find(a)?, find(b)?)))
        .collect();
    if pairs == 0 || legs.is_empty() {
        return Ok(());
    }
    say(format!(
        "bench: at once: {pairs} runs × {} pairs of scenarios × 2 modes × {} s, wrk through both \
         scenarios of a pair at the same time",
        legs.len(),
        results.at_once_load.duration.as_secs()
    ));
    let mut out: BTreeMap<AtOnceKey, Vec<(WrkResult, WrkResult)>> = BTreeMap::new();
    for i in 0..pairs {
        for (s, other) in &legs {
            for mode in Mode::ALL {
                check_interrupted()?;
                let (first, second) = if i % 2 == 0 {
                    (*s, *other)
                } else {
                    (*other, *s)
                };
                let (a, b) = std::thread::scope(|scope| {
                    let load = &results.at_once_load;
                    let a = scope.spawn(|| measure(world, load, first, mode, None));
                    let b = scope.spawn(|| measure(world, load, second, mode, None));
                    (join(a), join(b))
                });
                let (a, b) = (a?, b?);
                let (mine, theirs) = if i % 2 == 0 { (a, b) } else { (b, a) };
                say(format!(
                    "bench:   at once {}/{pairs} {:<26} {:>8.0} req/s beside {:<24} {:>8.0} req/s \
                     ({:<10}): {:.3}",
                    i + 1,
                    s.label,
                    mine.requests_per_sec,
                    other.label,
                    theirs.requests_per_sec,
                    mode.key(),
                    mine.requests_per_sec / theirs.requests_per_sec.max(1.0)
                ));
                out.entry((s.key, other.key, mode.key()))
                    .or_default()
                    .push((mine, theirs));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    results.at_once = out;
    Ok(())
}

/// The result of a scoped measuring thread; a panic is an error.
fn join(h: std::thread::ScopedJoinHandle<'_, Result<WrkResult>>) -> Result<WrkResult> {
    h.join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("a wrk thread panicked")))
}

/// canary's in-kernel cost per new connection: one wrk run per canary
/// scenario with the kernel's BPF run-time accounting on (only for this
/// phase: it adds clock reads to every program run). `programs` are the
/// small and the large agent's kernel programs.
fn kernel_cost(
    world: &World,
    programs: &(bpfstats::Programs, bpfstats::Programs),
    results: &mut Results,
) -> Result<()> {
    let canary: Vec<&Scenario> = results
        .scenarios
        .iter()
        .filter(|s| matches!(s.client, ClientId::CanarySmall | ClientId::CanaryLarge))
        .collect();
    if canary.is_empty() {
        return Ok(());
    }
    say(
        "bench: canary's kernel cost: one new-connection run per canary scenario with the kernel's BPF run-time accounting on (BPF_ENABLE_STATS)",
    );
    let _stats = bpfstats::StatsGuard::enable()?;
    let mut measured = Vec::new();
    for s in canary {
        check_interrupted()?;
        let progs = match s.client {
            ClientId::CanaryLarge => &programs.1,
            _ => &programs.0,
        };
        measured.push((
            s.key,
            measure(world, &results.load, s, Mode::NewConn, Some(progs))?,
        ));
    }
    for (key, r) in measured {
        results.kernel.entry(key).or_default().push(r);
    }
    Ok(())
}

/// `connects` connect-only connections per scenario, in `rounds` rounds
/// that visit every scenario in turn, each `connect()` timed by the probe.
fn connect_timing(
    world: &World,
    bins: &Bins,
    connects: u64,
    rounds: usize,
    results: &mut Results,
) -> Result<()> {
    let per_round = connects.div_ceil(rounds as u64).max(1);
    say(format!(
        "bench: connect() timing: {rounds} rounds × {per_round} connect-only connections per scenario"
    ));
    let n = results.scenarios.len();
    for round in 0..rounds {
        for i in 0..n {
            check_interrupted()?;
            let s = &results.scenarios[(i + round) % n];
            let r = bins
                .probe(
                    &world.client(s.client),
                    &ProbeArgs::count(s.target, per_round)
                        .connect_only()
                        .connect_timing(),
                )
                .with_context(|| format!("{}: connect timing", s.label))?;
            if r.failed > 0 {
                bail!("{}: {} connects failed: {:?}", s.label, r.failed, r.errors);
            }
            let t = r
                .connect_ns
                .context("the probe reported no connect timing")?;
            results.connect.entry(s.key).or_default().push(t);
        }
    }
    Ok(())
}

/// One wrk run of scenario `s` shaped by `load` (the rounds' or the
/// at-once runs'), with canary's kernel-program time when
/// `progs` (the programs attached to the client's cgroup) are given.
fn measure(
    world: &World,
    load: &Load,
    s: &Scenario,
    mode: Mode,
    progs: Option<&bpfstats::Programs>,
) -> Result<WrkResult> {
    let before = progs.map(|_| bpfstats::snapshot()).transpose()?;
    let mut r = load
        .run(
            &world.client(s.client),
            world.servers.path(),
            s.target,
            mode,
        )
        .with_context(|| format!("{} ({})", s.label, mode.key()))?;
    if let (Some(ids), Some(before)) = (progs, before) {
        r.bpf = Some(bpfstats::delta(&before, &bpfstats::snapshot()?, ids));
    }
    Ok(r)
}

fn unix_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// With the agent serving 100/0, a client loop running, flip to 0/100 with
/// the CLI and see when the first connection lands on v2.
fn weights_latency(world: &World, bins: &Bins) -> Result<Vec<WeightsTrial>> {
    const HOST: &str = "checkout-service";
    say(
        "bench: weights → effect: flipping checkout-service 100/0 → 0/100 under a client loop (3 times)",
    );
    let agent = &world.small;
    let client = world.client(ClientId::CanarySmall);
    let vip: SocketAddr = VIP4.parse().expect("constant");
    let mut trials = Vec::new();
    let result = (|| -> Result<()> {
        for trial in 0..3 {
            check_interrupted()?;
            agent.weights(HOST, &["v1=100", "v2=0"])?;
            let stop = std::env::temp_dir().join(format!(
                "canary-bench-{}-weights-stop-{trial}",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&stop);
            let probe =
                bins.spawn_probe(&client, &ProbeArgs::until_file(vip, &stop, 20).timeline())?;
            std::thread::sleep(Duration::from_millis(300));
            let before = unix_ns();
            let flipped = agent.weights(HOST, &["v1=0", "v2=100"]);
            let after = unix_ns();
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(&stop, b"")?;
            let report = ProbeReport::wait(probe, Duration::from_secs(30));
            let _ = std::fs::remove_file(&stop);
            flipped?;
            let report = report?;
            if report.failed > 0 {
                bail!(
                    "connections failed across the weight change: {:?}",
                    report.errors
                );
            }
            let span = |v: &str| {
                report
                    .timeline
                    .as_ref()
                    .and_then(|t| t.get(v))
                    .copied()
                    .with_context(|| format!("no connection answered by {v}: {report:?}"))
            };
            let (v1, v2) = (span("v1")?, span("v2")?);
            let ms = |ns: i128| ns as f64 / 1e6;
            let t = WeightsTrial {
                cli_ms: ms(after - before),
                first_v2_after_return_ms: ms(i128::from(v2.first_unix_ns) - after),
                last_v1_after_return_ms: ms(i128::from(v1.last_unix_ns) - after),
                loop_interval_ms: report.elapsed_ms as f64 / report.attempted.max(1) as f64,
            };
            say(format!(
                "bench:   CLI {:.2} ms; first v2 connection {:+.3} ms after it returned; \
                 last v1 {:+.3} ms",
                t.cli_ms, t.first_v2_after_return_ms, t.last_v1_after_return_ms
            ));
            trials.push(t);
        }
        Ok(())
    })();
    // Back to the file's weights whatever happened.
    let _ = agent.cli(&["weights", HOST, "--reset"]);
    result.map(|()| trials)
}

pub(crate) fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The first line a tool prints about itself (some print their version on
/// stderr, or exit non-zero after it), or "" if it cannot be run.
pub(crate) fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// What both bench reports say about the machine and the checkout: kernel,
/// CPUs, load at the start, commit.
pub(crate) fn machine_environment() -> BTreeMap<&'static str, String> {
    // git's answer only when it succeeds (not its error outside a checkout).
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).map_or_else(
        || "unknown (not a git checkout)".to_owned(),
        |head| {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            let note = if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            };
            format!("{head}{note}")
        },
    );
    let mut env = BTreeMap::new();
    env.insert("kernel", read_trimmed("/proc/sys/kernel/osrelease"));
    env.insert(
        "cpus",
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_default(),
    );
    env.insert("loadavg_start", read_trimmed("/proc/loadavg"));
    env.insert("commit", commit);
    env
}

fn environment(backend: Backend) -> BTreeMap<&'static str, String> {
    let mut env = machine_environment();
    env.insert("wrk", first_line("wrk", &["--version"]));
    env.insert(
        "iptables",
        first_line(backend.restore_bin(), &["--version"]),
    );
    env
}
