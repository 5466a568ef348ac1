//! The bench's results as a terminal table, as markdown for the README,
//! and as JSON.

use std::fmt::Write as _;

use canary_tests::probe::ConnectTiming;
use serde_json::{Value, json};

use super::wrk::WrkResult;
use super::{Results, WeightsTrial};

/// Tolerance for "unchanged with 10,000 services".
const UNCHANGED: f64 = 0.97;

/// Median of the rounds and the half-spread in percent of it.
#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    spread_pct: f64,
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn stat(r: &Results, key: &str, mode: &str) -> Option<Stat> {
    stat_of(r, key, mode, |w| w.requests_per_sec)
}

fn stat_of(r: &Results, key: &str, mode: &str, f: fn(&WrkResult) -> f64) -> Option<Stat> {
    let mut v: Vec<f64> = r
        .wrk
        .iter()
        .find(|((k, m), _)| *k == key && *m == mode)?
        .1
        .iter()
        .map(f)
        .collect();
    let m = median(&mut v)?;
    let (lo, hi) = (v[0], v[v.len() - 1]);
    Some(Stat {
        median: m,
        spread_pct: if m > 0.0 { (hi - lo) / m * 50.0 } else { 0.0 },
    })
}

fn ratio(r: &Results, a: &str, b: &str, mode: &str) -> Option<f64> {
    let (a, b) = (stat(r, a, mode)?, stat(r, b, mode)?);
    (b.median > 0.0).then(|| a.median / b.median)
}

/// Best round of `a` over best round of `b`: other work on the machine only
/// ever slows a run down, so the best rounds are the least disturbed.
fn ratio_best(r: &Results, a: &str, b: &str, mode: &str) -> Option<f64> {
    let best = |key: &str| {
        r.wrk
            .iter()
            .find(|((k, m), _)| *k == key && *m == mode)
            .map(|(_, v)| v.iter().map(|w| w.requests_per_sec).fold(0.0, f64::max))
    };
    let (a, b) = (best(a)?, best(b)?);
    (b > 0.0).then(|| a / b)
}

/// Median over rounds of `a`'s run over `b`'s run in the same round: the
/// two ran seconds apart, so slow drifts of the machine cancel out.
fn ratio_paired(r: &Results, a: &str, b: &str, mode: &str) -> Option<f64> {
    let runs = |key: &str| {
        r.wrk
            .iter()
            .find(|((k, m), _)| *k == key && *m == mode)
            .map(|(_, v)| v)
    };
    let (a, b) = (runs(a)?, runs(b)?);
    let mut v: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, b)| b.requests_per_sec > 0.0)
        .map(|(a, b)| a.requests_per_sec / b.requests_per_sec)
        .collect();
    median(&mut v)
}

/// One kernel program's median ns and runs per request.
type ProgramCost = (String, f64, f64);

/// Median over the accounted runs of canary's in-kernel ns per new
/// connection and program runs per connection: in all, and per program
/// (name, ns, runs).
fn bpf_cost(r: &Results, key: &str) -> Option<(f64, f64, Vec<ProgramCost>)> {
    let runs = r.kernel.get(key)?;
    let mut ns: Vec<f64> = runs
        .iter()
        .filter_map(WrkResult::bpf_ns_per_request)
        .collect();
    let mut per: Vec<f64> = runs
        .iter()
        .filter_map(WrkResult::bpf_runs_per_request)
        .collect();
    let names: Vec<String> = runs.first()?.bpf.as_ref()?.keys().cloned().collect();
    let programs = names
        .into_iter()
        .filter_map(|name| {
            let pick = |f: fn(&(u64, u64)) -> u64| {
                let mut v: Vec<f64> = runs
                    .iter()
                    .filter_map(|w| {
                        let p = w.bpf.as_ref()?.get(&name)?;
                        Some(f(p) as f64 / w.requests.max(1) as f64)
                    })
                    .collect();
                median(&mut v)
            };
            let (ns, n) = (pick(|p| p.0)?, pick(|p| p.1)?);
            (n > 0.0).then_some((name.clone(), ns, n))
        })
        .collect();
    Some((median(&mut ns)?, median(&mut per)?, programs))
}

/// Median across rounds of each percentile.
#[derive(Clone, Copy, Debug, Default)]
struct Timing {
    p50: f64,
    p99: f64,
    mean: f64,
}

fn timing(r: &Results, key: &str) -> Option<Timing> {
    let rounds: &Vec<ConnectTiming> = r.connect.get(key)?;
    let pick = |f: fn(&ConnectTiming) -> u64| {
        let mut v: Vec<f64> = rounds.iter().map(|t| f(t) as f64).collect();
        median(&mut v)
    };
    Some(Timing {
        p50: pick(|t| t.p50)?,
        p99: pick(|t| t.p99)?,
        mean: pick(|t| t.mean)?,
    })
}

/// Median over rounds of the paired difference `key` − `base` in p50 and
/// p99 (round i of both ran back to back, under the same conditions).
fn added(r: &Results, key: &str, base: &str) -> Option<(f64, f64)> {
    let (a, b) = (r.connect.get(key)?, r.connect.get(base)?);
    let diff = |f: fn(&ConnectTiming) -> u64| {
        let mut v: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(x, y)| f(x) as f64 - f(y) as f64)
            .collect();
        median(&mut v)
    };
    Some((diff(|t| t.p50)?, diff(|t| t.p99)?))
}

/// Total connect() samples per scenario, and rounds.
fn connect_samples(r: &Results) -> (u64, usize) {
    r.connect
        .values()
        .next()
        .map_or((0, 0), |v| (v.iter().map(|t| t.samples).sum(), v.len()))
}

/// Medians over the trials: first v2 connection after the CLI returned,
/// CLI round trip, last v1 connection after the CLI returned, loop
/// interval, and first v2 connection after the CLI was started.
fn weights(r: &Results) -> Option<(f64, f64, f64, f64, f64)> {
    let pick = |f: fn(&WeightsTrial) -> f64| {
        let mut v: Vec<f64> = r.weights.iter().map(f).collect();
        median(&mut v)
    };
    Some((
        pick(|t| t.first_v2_after_return_ms)?,
        pick(|t| t.cli_ms)?,
        pick(|t| t.last_v1_after_return_ms)?,
        pick(|t| t.loop_interval_ms)?,
        pick(|t| t.cli_ms + t.first_v2_after_return_ms)?,
    ))
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), |x| format!("{x:.2}"))
}

fn fmt_pair(a: Option<f64>, b: Option<f64>) -> String {
    format!("{} / {}", fmt_ratio(a), fmt_ratio(b))
}

/// One target from the issue.
struct Target {
    what: String,
    /// Ratio of the medians (what the verdict uses).
    value: Option<f64>,
    /// Median of the per-round ratios.
    paired: Option<f64>,
    /// Ratio of the best rounds.
    best: Option<f64>,
    /// Median of the ratios of runs made at the same time (the pairs in
    /// `AT_ONCE`); the verdict uses it when there is one.
    at_once: Option<f64>,
    goal: f64,
}

impl Target {
    fn verdict(&self) -> &'static str {
        match self.at_once.or(self.value) {
            Some(v) if v >= self.goal => "PASS",
            Some(_) => "MISS",
            None => "n/a",
        }
    }
}

/// Per at-once run of scenario `a` beside `b` in `mode`, `a`'s req/s over
/// `b`'s.
fn at_once_ratios(r: &Results, a: &str, b: &str, mode: &str) -> Vec<f64> {
    r.at_once
        .iter()
        .find(|((ka, kb, m), _)| *ka == a && *kb == b && *m == mode)
        .map_or(Vec::new(), |(_, runs)| {
            runs.iter()
                .filter(|(_, o)| o.requests_per_sec > 0.0)
                .map(|(x, o)| x.requests_per_sec / o.requests_per_sec)
                .collect()
        })
}

/// The median of [`at_once_ratios`].
fn ratio_at_once(r: &Results, a: &str, b: &str, mode: &str) -> Option<f64> {
    median(&mut at_once_ratios(r, a, b, mode))
}

fn targets(r: &Results) -> Vec<Target> {
    let t = |what: &str, a: &str, b: &str, mode: &str, goal| Target {
        what: what.into(),
        value: ratio(r, a, b, mode),
        paired: ratio_paired(r, a, b, mode),
        best: ratio_best(r, a, b, mode),
        at_once: ratio_at_once(r, a, b, mode),
        goal,
    };
    vec![
        t(
            "canary one-endpoint VIP / direct, new connections ≥ 0.97",
            "canary_one",
            "direct",
            "new_conn",
            0.97,
        ),
        t(
            "canary 90/10 VIP / direct, new connections ≥ 0.97",
            "canary_split",
            "direct",
            "new_conn",
            0.97,
        ),
        t(
            "canary one-endpoint VIP / direct, keep-alive ≥ 0.99",
            "canary_one",
            "direct",
            "keep_alive",
            0.99,
        ),
        t(
            "canary 90/10 VIP / direct, keep-alive ≥ 0.99",
            "canary_split",
            "direct",
            "keep_alive",
            0.99,
        ),
        t(
            "canary / iptables, 1 service, new connections ≥ 1.0",
            "canary_split",
            "iptables_split",
            "new_conn",
            1.0,
        ),
        t(
            "canary / iptables, 1 service, keep-alive ≥ 1.0",
            "canary_split",
            "iptables_split",
            "keep_alive",
            1.0,
        ),
        t(
            "canary 10k / canary 1 service, new connections ≥ 0.97 (unchanged)",
            "canary_10k",
            "canary_split",
            "new_conn",
            UNCHANGED,
        ),
        t(
            "canary 10k / canary 1 service, keep-alive ≥ 0.97 (unchanged)",
            "canary_10k",
            "canary_split",
            "keep_alive",
            UNCHANGED,
        ),
    ]
}

/// Median and maximum share of the bench's CPUs, and median share of the
/// whole machine, that other work used during the wrk runs.
fn background(r: &Results) -> Option<(f64, f64, f64)> {
    let runs = || r.wrk.values().flatten();
    let mut v: Vec<f64> = runs().map(|w| w.background_share(r.cpus)).collect();
    let mut machine: Vec<f64> = runs()
        .map(|w| w.machine_background_share(r.machine_cpus))
        .collect();
    let max = v.iter().copied().fold(0.0, f64::max);
    Some((median(&mut v)?, max, median(&mut machine)?))
}

/// CPU of one direct new connection, the whole path (client, kernel,
/// backend), median of the rounds, in ns.
fn direct_cpu_ns(r: &Results) -> Option<f64> {
    stat_of(r, "direct", "new_conn", WrkResult::cpu_us_per_request)
        .map(|s| s.median * 1000.0)
        .filter(|ns| *ns > 0.0)
}

fn cpu_cell(r: &Results, key: &str) -> String {
    let cell = |mode| {
        stat_of(r, key, mode, WrkResult::cpu_us_per_request)
            .map_or_else(|| "n/a".into(), |s| format!("{:.1}", s.median))
    };
    format!("{} / {}", cell("new_conn"), cell("keep_alive"))
}

/// The lines both the terminal and the markdown show under the table.
fn summary_lines(r: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let label = |key: &str| {
        r.scenarios
            .iter()
            .find(|s| s.key == key)
            .map_or("?", |s| s.label)
    };
    let pairs: std::collections::BTreeSet<(&str, &str)> =
        r.at_once.keys().map(|(a, b, _)| (*a, *b)).collect();
    for (a, b) in pairs {
        let cells: Vec<String> = [
            ("new_conn", "new connections"),
            ("keep_alive", "keep-alive"),
        ]
        .iter()
        .filter_map(|(mode, name)| {
            let mut v = at_once_ratios(r, a, b, mode);
            let runs = v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>();
            let m = median(&mut v)?;
            Some(format!("{name} {m:.3} ({})", runs.join(" ")))
        })
        .collect();
        out.push(format!(
            "at once, {} / {} (wrk through both at the same time, {} s runs, median of the \
             per-run ratios; each run in brackets): {}",
            label(a),
            label(b),
            r.at_once_load.duration.as_secs(),
            cells.join("; ")
        ));
    }
    if let Some((med, max, machine)) = background(r) {
        out.push(format!(
            "placement: {}; during the runs other work used {:.0}% (median; max {:.0}%) of the \
             bench's CPU{} and {:.0}% of the machine ({} disturbed run{} measured again){}",
            r.placement,
            med * 100.0,
            max * 100.0,
            if r.cpus == 1 { "" } else { "s" },
            machine * 100.0,
            r.repeated,
            if r.repeated == 1 { "" } else { "s" },
            if med > 0.10 || machine > 0.10 {
                " — a busy machine: treat differences of a few percent as noise"
            } else {
                ""
            }
        ));
    }
    let pair =
        |a: &str, b: &str| fmt_pair(ratio(r, a, b, "new_conn"), ratio(r, a, b, "keep_alive"));
    out.push(format!(
        "canary / iptables (new / ka): {} (1 service)   {} ({}k services)",
        pair("canary_split", "iptables_split"),
        pair("canary_10k", "iptables_10k"),
        r.services / 1000
    ));
    out.push(format!(
        "10k / 1 service (new / ka): canary {}   iptables {}",
        pair("canary_10k", "canary_split"),
        pair("iptables_10k", "iptables_split")
    ));
    out.push(format!(
        "iptables / its own baseline (direct with conntrack on) (new / ka): {}",
        pair("iptables_split", "direct_conntrack")
    ));
    if let (Some(d), Some(v), Some((a50, a99))) = (
        timing(r, "direct"),
        timing(r, "canary_one"),
        added(r, "canary_one", "direct"),
    ) {
        out.push(format!(
            "connect(): direct p50 {:.0} ns p99 {:.0} ns; VIP (one endpoint) p50 {:.0} ns p99 {:.0} ns; \
             added p50 {a50:+.0} ns, p99 {a99:+.0} ns (median of per-round differences)",
            d.p50, d.p99, v.p50, v.p99,
        ));
    }
    // What the programs weigh against a whole connection: the at-once
    // ratios set canary's cost against the client's share of the path
    // only (see the README), this against all of it.
    let direct_cpu_ns = direct_cpu_ns(r);
    let bpf: Vec<String> = [
        (
            "direct_canary_attached",
            "direct with canary attached (no VIP)",
        ),
        ("canary_one", "VIP, one endpoint"),
        ("canary_split", "VIP 90/10"),
        ("canary_10k", "VIP 90/10 among 10k services"),
    ]
    .iter()
    .filter_map(|(key, label)| {
        let (ns, runs, programs) = bpf_cost(r, key)?;
        let parts: Vec<String> = programs
            .iter()
            .map(|(name, ns, n)| {
                format!("{} {ns:.0} ns/{n:.1}×", name.trim_start_matches("canary_"))
            })
            .collect();
        let share = direct_cpu_ns.map_or_else(String::new, |d| {
            format!(" = {:.2}% of a direct connection", ns / d * 100.0)
        });
        Some(format!(
            "{label} {ns:.0} ns in {runs:.1} runs{share} ({})",
            parts.join(", ")
        ))
    })
    .collect();
    if !bpf.is_empty() {
        let whole = direct_cpu_ns.map_or_else(String::new, |d| {
            format!(
                "; a direct new connection costs {:.0} µs of CPU, all of the path \
                 (median of the rounds)",
                d / 1000.0
            )
        });
        out.push(format!(
            "canary's kernel programs per new connection (kernel BPF run-time stats, median): {}{whole}",
            bpf.join("; ")
        ));
    }
    if let Some((first, cli, last_v1, interval, since_start)) = weights(r) {
        out.push(format!(
            "weights → first new-split connection: {first:+.3} ms after the CLI returned, \
             {since_start:.3} ms after it started (CLI round trip {cli:.2} ms; last v1 connection \
             {last_v1:+.3} ms; the client loop connects every {interval:.3} ms; median of {})",
            r.weights.len()
        ));
    }
    out
}

pub fn text(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\ncanary L4 bench: wrk -t{} -c{} -d{}s, median of {} rounds (± half the spread)",
        r.load.threads,
        r.load.connections,
        r.load.duration.as_secs(),
        r.rounds
    );
    let _ = writeln!(
        s,
        "{:<30} {:>18} {:>18}   {:<26} CPU µs/req (new / ka)",
        "scenario", "new-conn req/s", "keep-alive req/s", "ratio vs direct (new / ka)"
    );
    for sc in &r.scenarios {
        let cell = |mode| {
            stat(r, sc.key, mode).map_or_else(
                || "n/a".into(),
                |st| format!("{:.0} ±{:.1}%", st.median, st.spread_pct),
            )
        };
        let _ = writeln!(
            s,
            "{:<30} {:>18} {:>18}   {:<26} {}",
            sc.label,
            cell("new_conn"),
            cell("keep_alive"),
            fmt_pair(
                ratio(r, sc.key, "direct", "new_conn"),
                ratio(r, sc.key, "direct", "keep_alive")
            ),
            cpu_cell(r, sc.key)
        );
    }
    for line in summary_lines(r) {
        let _ = writeln!(s, "{line}");
    }
    let (samples, rounds) = connect_samples(r);
    let _ = writeln!(
        s,
        "\nconnect() system call, ns (N={samples} per scenario in {rounds} interleaved rounds; \
         medians of the rounds)"
    );
    let _ = writeln!(
        s,
        "{:<30} {:>9} {:>9} {:>9} {:>14} {:>14}",
        "scenario", "p50", "p99", "mean", "p50 vs direct", "p99 vs direct"
    );
    for sc in &r.scenarios {
        if let Some(t) = timing(r, sc.key) {
            let (a50, a99) = added(r, sc.key, "direct").map_or_else(
                || (String::new(), String::new()),
                |(a, b)| (format!("{a:+.0}"), format!("{b:+.0}")),
            );
            let _ = writeln!(
                s,
                "{:<30} {:>9.0} {:>9.0} {:>9.0} {:>14} {:>14}",
                sc.label, t.p50, t.p99, t.mean, a50, a99
            );
        }
    }
    let _ = writeln!(s, "\ntargets (informational):");
    let _ = writeln!(
        s,
        "  {:<4}  {:<66} {:>6}  {:>6}  {:>6}  {:>7}",
        "", "", "median", "paired", "best", "at once"
    );
    for t in targets(r) {
        let _ = writeln!(
            s,
            "  {:<4}  {:<66} {:>6}  {:>6}  {:>6}  {:>7}",
            t.verdict(),
            t.what,
            fmt_ratio(t.value),
            fmt_ratio(t.paired),
            fmt_ratio(t.best),
            fmt_ratio(t.at_once)
        );
    }
    let _ = writeln!(
        s,
        "\n{}; kernel {}, {} CPUs, load {} → {}; commit {}; {:.0} s",
        r.env.get("iptables").map_or("", String::as_str),
        r.env.get("kernel").map_or("", String::as_str),
        r.env.get("cpus").map_or("", String::as_str),
        r.env.get("loadavg_start").map_or("", String::as_str),
        r.env.get("loadavg_end").map_or("", String::as_str),
        r.env.get("commit").map_or("", String::as_str),
        r.wall_s
    );
    s
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### L4 fast path: canary beside direct and kube-proxy iptables\n"
    );
    let _ = writeln!(
        s,
        "`cargo xtask bench` (as root): wrk -t{} -c{} -d{}s, new connection per request \
         (`Connection: close`) and keep-alive; median of {} rounds in rotated order, ± half \
         the spread. All clients sit in network namespaces on the same bridge as the same three \
         backend pods; kube-proxy's iptables rules ({}, {}) live in namespaces of their own, \
         since a nat table turns conntrack on for its whole namespace.\n",
        r.load.threads,
        r.load.connections,
        r.load.duration.as_secs(),
        r.rounds,
        r.args_json["iptables"].as_str().unwrap_or(""),
        r.env.get("iptables").map_or("", String::as_str),
    );
    let _ = writeln!(
        s,
        "| scenario | new-conn req/s | keep-alive req/s | vs direct (new / ka) | CPU µs/req (new / ka) |\n|---|---:|---:|---:|---:|"
    );
    for sc in &r.scenarios {
        let cell = |mode| {
            stat(r, sc.key, mode).map_or_else(
                || "n/a".into(),
                |st| format!("{:.0} ±{:.1}%", st.median, st.spread_pct),
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            sc.label,
            cell("new_conn"),
            cell("keep_alive"),
            fmt_pair(
                ratio(r, sc.key, "direct", "new_conn"),
                ratio(r, sc.key, "direct", "keep_alive")
            ),
            cpu_cell(r, sc.key)
        );
    }
    let _ = writeln!(s);
    for line in summary_lines(r) {
        let _ = writeln!(s, "- {line}");
    }
    let (samples, rounds) = connect_samples(r);
    let _ = writeln!(
        s,
        "\n`connect()` system call, ns (N={samples} connect-only connections per scenario in \
         {rounds} interleaved rounds; medians of the rounds; differences paired by round):\n"
    );
    let _ = writeln!(
        s,
        "| scenario | p50 | p99 | mean | p50 vs direct | p99 vs direct |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    for sc in &r.scenarios {
        if let Some(t) = timing(r, sc.key) {
            let (a50, a99) = added(r, sc.key, "direct").map_or_else(
                || (String::new(), String::new()),
                |(a, b)| (format!("{a:+.0}"), format!("{b:+.0}")),
            );
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | {:.0} | {a50} | {a99} |",
                sc.label, t.p50, t.p99, t.mean
            );
        }
    }
    let _ = writeln!(
        s,
        "\nTargets (informational; the ratio of the medians, the median of the ratios within \
         each round, the ratio of the best rounds, and the median of the ratios of runs made \
         at the same time; the verdict is on the at-once ratio where there is one, else on the \
         medians):\n\n\
         | | target | median | paired | best | at once |\n|---|---|---:|---:|---:|---:|"
    );
    for t in targets(r) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            t.verdict(),
            t.what,
            fmt_ratio(t.value),
            fmt_ratio(t.paired),
            fmt_ratio(t.best),
            fmt_ratio(t.at_once)
        );
    }
    let _ = writeln!(
        s,
        "\nScenarios: *direct* connects to pod 10.77.0.11 from a cgroup without canary; *direct, \
         canary attached* does the same from canary's cgroup (the cost canary puts on traffic \
         that is not for a Service); *canary VIP, one endpoint* is a Service whose only endpoint \
         is that pod; *90/10* is the checkout example (v1 two pods, v2 one pod); *10k services* \
         adds {} generated Services (canary: to the config; iptables: {} KUBE-SVC chains before \
         the measured one); *direct, conntrack on* is the direct path from the iptables \
         namespace, iptables' own baseline. kube-proxy's filter-table rules are left out, which \
         favours iptables.\n",
        r.services, r.services
    );
    let _ = writeln!(
        s,
        "Method: clients (wrk, canary-probe) and backends are pinned to one CPU, so req/s is the \
         whole path's throughput per CPU and the scheduler's placement stays out of the numbers; \
         the bench raises its priority (nice and autogroup nice -10) for the run. *CPU µs/req* \
         is the client's and the backends' cgroup v2 `cpu.stat` usage per request, which moves \
         less than req/s when other work shares the machine. canary's kernel-program cost comes \
         from the kernel's own BPF run-time accounting (`BPF_ENABLE_STATS`), on only for one \
         extra new-connection run per canary scenario after the throughput rounds, since it adds \
         clock reads to every program run (the throughput rounds run without it, as production \
         does).\n"
    );
    let wrk = r.env.get("wrk").map_or("", String::as_str);
    let _ = writeln!(
        s,
        "Machine: kernel {}, {} CPUs, load average {} at the start; {}; commit {}; the run took \
         {:.0} s.",
        r.env.get("kernel").map_or("", String::as_str),
        r.env.get("cpus").map_or("", String::as_str),
        r.env.get("loadavg_start").map_or("", String::as_str),
        wrk.split(" Copyright").next().unwrap_or(wrk),
        r.env.get("commit").map_or("", String::as_str),
        r.wall_s,
    );
    s
}

pub fn json(r: &Results) -> Value {
    let scenarios: Vec<Value> = r
        .scenarios
        .iter()
        .map(|sc| {
            let runs = |mode: &str| -> Value {
                r.wrk
                    .iter()
                    .find(|((k, m), _)| *k == sc.key && *m == mode)
                    .map_or(Value::Null, |(_, v)| {
                        Value::Array(v.iter().map(super::wrk::WrkResult::to_json).collect())
                    })
            };
            let st = |mode: &str| {
                stat(r, sc.key, mode).map(|s| json!({"median": s.median, "spread_pct": s.spread_pct}))
            };
            json!({
                "key": sc.key,
                "label": sc.label,
                "target": sc.target.to_string(),
                "client": format!("{:?}", sc.client),
                "new_conn": {"req_per_sec": st("new_conn"), "runs": runs("new_conn"),
                             "vs_direct": ratio(r, sc.key, "direct", "new_conn")},
                "keep_alive": {"req_per_sec": st("keep_alive"), "runs": runs("keep_alive"),
                               "vs_direct": ratio(r, sc.key, "direct", "keep_alive")},
                "connect_ns": {
                    "median_of_rounds": timing(r, sc.key).map(|t| json!({"p50": t.p50, "p99": t.p99, "mean": t.mean})),
                    "added_vs_direct": added(r, sc.key, "direct").map(|(p50, p99)| json!({"p50": p50, "p99": p99})),
                    "rounds": r.connect.get(sc.key).map(|v| serde_json::to_value(v).unwrap_or(Value::Null)),
                },
                "canary_bpf_per_new_connection": bpf_cost(r, sc.key).map(|(ns, runs, progs)| json!({
                    "ns": ns,
                    "runs": runs,
                    "share_of_direct_connection_cpu": direct_cpu_ns(r).map(|d| ns / d),
                    "programs": progs.iter().map(|(name, ns, runs)| json!({"program": name, "ns": ns, "runs": runs})).collect::<Vec<_>>(),
                })),
                "sanity": r.sanity.get(sc.key).map(|p| json!({
                    "ok": p.ok, "failed": p.failed, "peer_is_target": p.peer_is_target,
                    "by_pod": p.by_pod, "by_version": p.by_version,
                })),
            })
        })
        .collect();
    let pair = |a: &str, b: &str| json!({"new_conn": ratio(r, a, b, "new_conn"), "keep_alive": ratio(r, a, b, "keep_alive")});
    json!({
        "placement": r.placement,
        "repeated_runs": r.repeated,
        "background_share": background(r).map(|(med, max, machine)| json!({
            "bench_cpus_median": med, "bench_cpus_max": max, "machine_median": machine,
        })),
        "args": r.args_json,
        "environment": r.env,
        "setup": r.setup,
        "wall_seconds": r.wall_s,
        "scenarios": scenarios,
        "ratios": {
            "canary_vs_iptables_1": pair("canary_split", "iptables_split"),
            "canary_vs_iptables_10k": pair("canary_10k", "iptables_10k"),
            "canary_10k_vs_1": pair("canary_10k", "canary_split"),
            "iptables_10k_vs_1": pair("iptables_10k", "iptables_split"),
            "iptables_vs_direct_conntrack": pair("iptables_split", "direct_conntrack"),
        },
        "weights_to_effect": {
            "trials": r.weights.iter().map(|t| json!({
                "cli_ms": t.cli_ms,
                "first_v2_after_return_ms": t.first_v2_after_return_ms,
                "last_v1_after_return_ms": t.last_v1_after_return_ms,
                "loop_interval_ms": t.loop_interval_ms,
            })).collect::<Vec<_>>(),
            "median": weights(r).map(|(first, cli, last, interval, since_start)| json!({
                "first_v2_after_return_ms": first, "cli_ms": cli,
                "last_v1_after_return_ms": last, "loop_interval_ms": interval,
                "first_v2_after_cli_start_ms": since_start,
            })),
        },
        "at_once": r.at_once.iter().map(|((a, b, mode), runs)| json!({
            "scenario": a, "beside": b, "mode": mode,
            "ratios": at_once_ratios(r, a, b, mode),
            "runs": runs.iter().map(|(x, o)| json!({"scenario": x.to_json(), "beside": o.to_json()})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "targets": targets(r).iter().map(|t| json!({
            "target": t.what, "median_ratio": t.value, "paired_ratio": t.paired, "best_ratio": t.best,
            "at_once_ratio": t.at_once,
            "goal": t.goal, "verdict": t.verdict(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
