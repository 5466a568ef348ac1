//! The L7 results as a terminal table, as markdown for the README, and as
//! JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::measure::Run;
use super::{Peer, Results, Variant};

/// Published anchors (shared/reference/perf-anchors.md §0 #12, Istio 1.24
/// at 1000 HTTP rps with 1 KB bodies): vCPU per 1000 rps and MB.
const ANCHORS: [(&str, f64, f64); 3] = [
    ("Istio sidecar", 0.20, 60.0),
    ("Istio waypoint", 0.25, 60.0),
    ("ztunnel (L4 only)", 0.06, 12.0),
];
/// Issue 3: nginx and HAProxy on this machine kind, CPU-s per 1000 tiny
/// loopback requests.
const PEER_ANCHOR: f64 = 0.0125;

/// Median of the rounds and the half-spread in percent of it.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub spread_pct: f64,
}

pub fn median(values: &mut [f64]) -> Option<f64> {
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

fn stat_of(mut v: Vec<f64>) -> Option<Stat> {
    let m = median(&mut v)?;
    let (lo, hi) = (v[0], v[v.len() - 1]);
    Some(Stat {
        median: m,
        spread_pct: if m > 0.0 { (hi - lo) / m * 50.0 } else { 0.0 },
    })
}

/// The runs of a peer: the rounds', or for the agent without request
/// metrics (and `Variant::Split` only) its half of the metrics pairs.
fn runs(r: &Results, peer: Peer, variant: Variant) -> Vec<&Run> {
    match (peer, variant) {
        (Peer::CanaryNoMetrics, Variant::Split) => r.metrics_pairs.iter().map(|p| &p.1).collect(),
        (Peer::CanaryNoMetrics, Variant::Header) => Vec::new(),
        _ => r
            .runs
            .get(&(peer, variant))
            .map_or(Vec::new(), |v| v.iter().collect()),
    }
}

/// One half of the metrics pairs: `on` true for the agent with request
/// metrics.
fn pair_stat(r: &Results, on: bool, f: fn(&Run) -> f64) -> Option<Stat> {
    stat_of(
        r.metrics_pairs
            .iter()
            .map(|(a, b)| f(if on { a } else { b }))
            .collect(),
    )
}

fn stat(r: &Results, peer: Peer, variant: Variant, f: fn(&Run) -> Option<f64>) -> Option<Stat> {
    stat_of(runs(r, peer, variant).into_iter().filter_map(f).collect())
}

fn rps(r: &Results, peer: Peer, variant: Variant) -> Option<Stat> {
    stat(r, peer, variant, |w| Some(w.wrk.requests_per_sec))
}

fn p50(r: &Results, peer: Peer, variant: Variant) -> Option<Stat> {
    stat(r, peer, variant, |w| w.wrk.latency_p50_us)
}

fn p99(r: &Results, peer: Peer, variant: Variant) -> Option<Stat> {
    stat(r, peer, variant, |w| w.wrk.latency_p99_us)
}

fn cpu(r: &Results, peer: Peer, variant: Variant) -> Option<Stat> {
    stat(r, peer, variant, |w| Some(w.cpu_s_per_1000()))
}

/// Medians of µs per request: proxy, of which user space, wrk, backends.
fn split_us(r: &Results, peer: Peer, variant: Variant) -> Option<(f64, f64, f64, f64)> {
    let pick = |f: fn(&Run) -> f64| {
        median(
            &mut runs(r, peer, variant)
                .into_iter()
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    Some((
        pick(|w| w.split_us().0)?,
        pick(|w| w.proxy_user_sys_us().0)?,
        pick(|w| w.split_us().1)?,
        pick(|w| w.split_us().2)?,
    ))
}

/// Median RSS (MiB) idle and at the idle connections.
fn rss(r: &Results, peer: Peer) -> Option<(f64, f64)> {
    let v = r.rss.get(&peer)?;
    let mib = |f: fn(&super::measure::Rss) -> u64| {
        median(&mut v.iter().map(|s| f(s) as f64 / 1024.0).collect::<Vec<_>>())
    };
    Some((mib(|s| s.idle_kib)?, mib(|s| s.loaded_kib)?))
}

/// The first round's RSS (MiB): idle, at the connections, of which anon.
fn rss_first(r: &Results, peer: Peer) -> Option<(f64, f64, f64)> {
    let s = r.rss.get(&peer)?.first()?;
    let mib = |k: u64| k as f64 / 1024.0;
    Some((mib(s.idle_kib), mib(s.loaded_kib), mib(s.loaded_anon_kib)))
}

fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b.median > 0.0).then(|| a.median / b.median)
}

/// Median over the metrics runs of canary's req/s over the agent's
/// without request metrics (both loaded at the same time).
fn metrics_paired(r: &Results) -> Option<f64> {
    median(
        &mut r
            .metrics_pairs
            .iter()
            .filter(|(_, b)| b.wrk.requests_per_sec > 0.0)
            .map(|(a, b)| a.wrk.requests_per_sec / b.wrk.requests_per_sec)
            .collect::<Vec<_>>(),
    )
}

/// Per run, `f` with request metrics over `f` without.
fn metrics_ratios(r: &Results, f: fn(&Run) -> f64) -> Vec<f64> {
    r.metrics_pairs
        .iter()
        .filter(|(_, b)| f(b) > 0.0)
        .map(|(a, b)| f(a) / f(b))
        .collect()
}

/// Head to head with `other` on `variant`: per run, `f` of canary's leg
/// over `f` of the other's.
fn h2h_ratios(r: &Results, other: Peer, variant: Variant, f: fn(&Run) -> Option<f64>) -> Vec<f64> {
    r.head_to_head
        .get(&(other, variant))
        .map_or(Vec::new(), |runs| {
            runs.iter()
                .filter_map(|(c, o)| Some((f(c)?, f(o)?)))
                .filter(|(_, o)| *o > 0.0)
                .map(|(c, o)| c / o)
                .collect()
        })
}

/// The median of [`h2h_ratios`].
fn h2h(r: &Results, other: Peer, variant: Variant, f: fn(&Run) -> Option<f64>) -> Option<f64> {
    median(&mut h2h_ratios(r, other, variant, f))
}

fn h2h_rps(w: &Run) -> Option<f64> {
    Some(w.wrk.requests_per_sec)
}

fn h2h_p50(w: &Run) -> Option<f64> {
    w.wrk.latency_p50_us
}

fn h2h_p99(w: &Run) -> Option<f64> {
    w.wrk.latency_p99_us
}

fn h2h_cpu(w: &Run) -> Option<f64> {
    Some(w.cpu_s_per_1000())
}

/// Median µs per request of one leg of the head-to-head runs: proxy, of
/// which user space.
fn h2h_us(r: &Results, other: Peer, variant: Variant, canary: bool) -> Option<(f64, f64)> {
    let runs = r.head_to_head.get(&(other, variant))?;
    let leg = |p: &(Run, Run)| if canary { &p.0 } else { &p.1 }.split_us().0;
    let user = |p: &(Run, Run)| if canary { &p.0 } else { &p.1 }.proxy_user_sys_us().0;
    Some((
        median(&mut runs.iter().map(leg).collect::<Vec<_>>())?,
        median(&mut runs.iter().map(user).collect::<Vec<_>>())?,
    ))
}

/// What the head-to-head table shows.
fn h2h_intro(r: &Results) -> Option<String> {
    (!r.head_to_head.is_empty()).then(|| {
        format!(
            "head to head: wrk through canary and the peer at once, {} runs × {} s per route, \
             the two wrk started in alternating order; medians of the per-run ratios canary / \
             peer. Each proxy had about half the CPU, so its µs per request are not the \
             rounds'.",
            r.args.pairs, r.args.metrics_seconds
        )
    })
}

/// The head-to-head table: one row per peer and route.
fn h2h_rows(r: &Results) -> Vec<[String; 7]> {
    let mut out = Vec::new();
    for other in [Peer::Nginx, Peer::Haproxy] {
        for variant in Variant::ALL {
            let Some(runs) = r.head_to_head.get(&(other, variant)) else {
                continue;
            };
            let (Some(c), Some(o)) = (
                h2h_us(r, other, variant, true),
                h2h_us(r, other, variant, false),
            ) else {
                continue;
            };
            let per_run = h2h_ratios(r, other, variant, h2h_cpu)
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ");
            out.push([
                format!(
                    "canary / {} ({}), {} runs",
                    other.label(),
                    variant.label(),
                    runs.len()
                ),
                fmt_ratio(h2h(r, other, variant, h2h_rps)),
                fmt_ratio(h2h(r, other, variant, h2h_p50)),
                fmt_ratio(h2h(r, other, variant, h2h_p99)),
                format!("{} ({per_run})", fmt_ratio(h2h(r, other, variant, h2h_cpu))),
                format!("{:.1} ({:.1}+{:.1})", c.0, c.1, c.0 - c.1),
                format!("{:.1} ({:.1}+{:.1})", o.0, o.1, o.0 - o.1),
            ]);
        }
    }
    out
}

const H2H_HEADERS: [&str; 7] = [
    "head to head (at once)",
    "req/s",
    "p50",
    "p99",
    "CPU per request (per run)",
    "canary µs/req (user+sys)",
    "peer µs/req (user+sys)",
];

pub fn fmt_us(us: Option<f64>) -> String {
    match us {
        None => "n/a".into(),
        Some(us) if us >= 1000.0 => format!("{:.2}ms", us / 1000.0),
        Some(us) => format!("{us:.0}µs"),
    }
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), |x| format!("{x:.2}×"))
}

/// One target of the issues (informational: never fails the command).
pub struct Target {
    pub what: &'static str,
    pub value: String,
    pub pass: Option<bool>,
}

impl Target {
    fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a",
        }
    }
}

/// The targets against nginx are judged head to head (both proxies loaded
/// at once, medians of the per-run ratios) when those runs were made, and
/// on the sequential rounds' medians otherwise.
pub fn targets(r: &Results) -> Vec<Target> {
    let s = Variant::Split;
    let paired = r.head_to_head.contains_key(&(Peer::Nginx, s));
    let (rps_ratio, p99_ratio, cpu_ratio, how) = if paired {
        (
            h2h(r, Peer::Nginx, s, h2h_rps),
            h2h(r, Peer::Nginx, s, h2h_p99),
            h2h(r, Peer::Nginx, s, h2h_cpu),
            "head to head",
        )
    } else {
        (
            ratio(rps(r, Peer::Canary, s), rps(r, Peer::Nginx, s)),
            ratio(p99(r, Peer::Canary, s), p99(r, Peer::Nginx, s)),
            ratio(cpu(r, Peer::Canary, s), cpu(r, Peer::Nginx, s)),
            "sequential rounds",
        )
    };
    let rss_c = rss(r, Peer::Canary).map(|(_, at)| at);
    let on_off = metrics_paired(r);
    vec![
        Target {
            what: "canary shim ≥ 1.2× nginx req/s, with lower p99 (95/5)",
            value: format!(
                "{}, p99 {} ({how})",
                fmt_ratio(rps_ratio),
                fmt_ratio(p99_ratio)
            ),
            pass: match (rps_ratio, p99_ratio) {
                (Some(x), Some(p)) => Some(x >= 1.2 && p < 1.0),
                _ => None,
            },
        },
        Target {
            what: "canary CPU-s per 1000 requests ≤ 0.8× nginx's (95/5)",
            value: format!("{} ({how})", fmt_ratio(cpu_ratio)),
            pass: cpu_ratio.map(|x| x <= 0.8),
        },
        Target {
            what: "canary agent RSS < 30 MB at the idle connections",
            value: rss_c.map_or_else(|| "n/a".into(), |m| format!("{m:.1} MiB")),
            // MB as in the issue: 30 × 10^6 bytes.
            pass: rss_c.map(|m| m * 1024.0 * 1024.0 < 30e6),
        },
        Target {
            what: "shim req/s with request metrics within 3% of without",
            value: format!(
                "{} (median over runs with both agents loaded at once)",
                fmt_ratio(on_off)
            ),
            pass: on_off.map(|x| x >= 0.97),
        },
    ]
}

/// Lines shared by the terminal and the markdown report.
fn summary_lines(r: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let s = Variant::Split;
    for other in [Peer::Nginx, Peer::Haproxy] {
        let pair = |f: fn(&Results, Peer, Variant) -> Option<Stat>| {
            Variant::ALL
                .iter()
                .map(|v| fmt_ratio(ratio(f(r, Peer::Canary, *v), f(r, other, *v))))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        out.push(format!(
            "canary / {} (95/5 / header): req/s {}; p50 {}; p99 {}; CPU-s per 1000 req {}",
            other.label(),
            pair(rps),
            pair(p50),
            pair(p99),
            pair(cpu)
        ));
    }
    let rps_ratios = metrics_ratios(r, |w| w.wrk.requests_per_sec);
    let cpu_ratios = metrics_ratios(r, Run::cpu_s_per_1000);
    if let (Some(on), Some(off), Some(cpu_ratio)) = (
        pair_stat(r, true, Run::cpu_s_per_1000),
        pair_stat(r, false, Run::cpu_s_per_1000),
        median(&mut cpu_ratios.clone()),
    ) {
        out.push(format!(
            "request metrics on / off ({} runs of {} s, wrk through both agents at once, 95/5): \
             req/s {} per run, median {}; CPU per request {} per run, median {} ({:+.2} µs on \
             {:.1} µs per request)",
            r.metrics_pairs.len(),
            r.args.metrics_seconds,
            rps_ratios
                .iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            fmt_ratio(metrics_paired(r)),
            cpu_ratios
                .iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            fmt_ratio(Some(cpu_ratio)),
            (on.median - off.median) * 1000.0,
            off.median * 1000.0,
        ));
    }
    let ctx: Vec<String> = [Peer::Canary, Peer::Nginx, Peer::Haproxy]
        .iter()
        .filter_map(|p| {
            let st = stat(r, *p, s, |w| Some(w.ctx_switches_per_request()))?;
            Some(format!("{} {:.2}", p.label(), st.median))
        })
        .collect();
    if !ctx.is_empty() {
        out.push(format!(
            "proxy context switches per request (95/5, median): {}",
            ctx.join(", ")
        ));
    }
    let rss_lines: Vec<String> = [Peer::Canary, Peer::Nginx, Peer::Haproxy]
        .iter()
        .filter_map(|p| {
            let (idle, at, anon) = rss_first(r, *p)?;
            Some(format!(
                "{} {idle:.1} → {at:.1} (anon {anon:.1})",
                p.label()
            ))
        })
        .collect();
    if !rss_lines.is_empty() {
        out.push(format!(
            "RSS MiB, first round (before any {}-connection burst): {}; later rounds start from \
             what the allocator kept",
            r.args.idle_connections,
            rss_lines.join("; ")
        ));
    }
    let idle: Vec<String> = r
        .agent_idle_cpu
        .iter()
        .map(|(p, v)| format!("{} {:.4} CPU-s/s", p.label(), v))
        .collect();
    if let (Some(st), false) = (rps(r, Peer::Canary, s), idle.is_empty()) {
        let share = r
            .agent_idle_cpu
            .get(&Peer::Canary)
            .map_or(0.0, |v| v / (st.median / 1000.0));
        out.push(format!(
            "the canary CPU column is the whole agent process, idle work included: idle, {} \
             (at {:.0} req/s that is {:.5} CPU-s per 1000 req)",
            idle.join(", "),
            st.median,
            share
        ));
    }
    out.push(format!(
        "anchors: {}; nginx and HAProxy on this machine kind ≈ {PEER_ANCHOR} CPU-s per 1000 tiny \
         loopback requests (issue 3)",
        ANCHORS
            .iter()
            .map(|(n, v, mb)| format!("{n} {v} vCPU per 1000 rps, {mb:.0} MB"))
            .collect::<Vec<_>>()
            .join("; ")
            + " (Istio 1.24, 1 KB bodies; perf-anchors §0 #12)"
    ));
    // The sequential rounds only: a run through two proxies at once sees
    // the other leg as "other work".
    let busy: Vec<f64> = r
        .runs
        .values()
        .flatten()
        .map(|w| {
            let cpus = r
                .env
                .get("cpus")
                .and_then(|c| c.parse::<f64>().ok())
                .unwrap_or(1.0);
            let ours = w.proxy_cpu_us + w.wrk.client_cpu_us + w.wrk.server_cpu_us;
            w.wrk.machine_busy_us.saturating_sub(ours) as f64 / (w.wrk.wall_us.max(1) as f64 * cpus)
        })
        .collect();
    let mut b = busy.clone();
    if !r.reruns.is_empty() {
        out.push(format!(
            "runs discarded for socket errors or non-2xx answers and run again: {}",
            r.reruns.join(", ")
        ));
    }
    out.push(format!(
        "placement: {}; other work used {:.0}% of the machine during the runs (median; max \
         {:.0}%){}",
        r.placement,
        median(&mut b).unwrap_or(0.0) * 100.0,
        busy.iter().copied().fold(0.0, f64::max) * 100.0,
        if median(&mut b).unwrap_or(0.0) > 0.10 {
            " — a busy machine: req/s moves with it, CPU per request much less"
        } else {
            ""
        }
    ));
    out
}

fn row(r: &Results, peer: Peer, variant: Variant) -> Option<[String; 7]> {
    let st = rps(r, peer, variant)?;
    let cpu_st = cpu(r, peer, variant)?;
    let (p, user, c, s) = split_us(r, peer, variant)?;
    let rss_cell = if variant == Variant::Split {
        rss(r, peer).map_or_else(String::new, |(idle, at)| format!("{idle:.1} → {at:.1}"))
    } else {
        String::new()
    };
    Some([
        format!("{} ({})", peer.label(), variant.label()),
        format!("{:.0} ±{:.1}%", st.median, st.spread_pct),
        fmt_us(p50(r, peer, variant).map(|x| x.median)),
        fmt_us(p99(r, peer, variant).map(|x| x.median)),
        format!("{:.4} ±{:.1}%", cpu_st.median, cpu_st.spread_pct),
        format!("{p:.1} ({user:.1}+{:.1}) / {c:.1} / {s:.1}", p - user),
        rss_cell,
    ])
}

const HEADERS: [&str; 7] = [
    "peer (route)",
    "req/s",
    "p50",
    "p99",
    "proxy CPU-s/1000 req",
    "µs/req proxy (user+sys) / wrk / backends",
    "RSS MiB idle → conns",
];

/// The table: the peers of the rounds (the agent without request metrics
/// only ran beside the other one, under twice the load: see the metrics
/// line).
fn rows(r: &Results) -> Vec<[String; 7]> {
    let mut out = Vec::new();
    for variant in Variant::ALL {
        for peer in [Peer::Canary, Peer::Nginx, Peer::Haproxy] {
            if let Some(row) = row(r, peer, variant) {
                out.push(row);
            }
        }
    }
    out
}

/// One line of a terminal table: the first cell left-aligned, the rest
/// right-aligned, in `widths`.
fn aligned(cells: &[String], widths: &[usize]) -> String {
    cells
        .iter()
        .zip(widths)
        .enumerate()
        .map(|(i, (c, &w))| {
            if i == 0 {
                format!("{c:<w$}")
            } else {
                format!("{c:>w$}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn text(r: &Results) -> String {
    let a = &r.args;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\ncanary L7 bench: composite routing (x-canary-user: true → v2, else 95/5 per request), \
         wrk -t1 -c{} -d{}s keep-alive, median of {} rounds (± half the spread); RSS with {} idle \
         keep-alive connections",
        a.connections, a.seconds, a.rounds, a.idle_connections
    );
    let line = |cells: &[String]| aligned(cells, &[34, 14, 8, 8, 20, 40, 20]);
    let _ = writeln!(
        s,
        "{}",
        line(&HEADERS.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>())
    );
    for row in rows(r) {
        let _ = writeln!(s, "{}", line(&row));
    }
    if let Some(intro) = h2h_intro(r) {
        let _ = writeln!(s, "\n{intro}");
        for cells in std::iter::once(H2H_HEADERS.map(str::to_owned)).chain(h2h_rows(r)) {
            let _ = writeln!(s, "{}", aligned(&cells, &[40, 7, 7, 7, 34, 24, 24]));
        }
        let _ = writeln!(s);
    }
    for l in summary_lines(r) {
        let _ = writeln!(s, "{l}");
    }
    let _ = writeln!(s, "\ntargets (informational, never fail the command):");
    for t in targets(r) {
        let _ = writeln!(s, "  {:<4}  {:<58} {}", t.verdict(), t.what, t.value);
    }
    let _ = writeln!(
        s,
        "\n{}; {}; kernel {}, {} CPUs, load {} → {}; commit {}; {:.0} s",
        r.env.get("nginx").map_or("", String::as_str),
        r.env.get("haproxy").map_or("", String::as_str),
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
    let a = &r.args;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### L7: canary's shim beside nginx and HAProxy\n\n\
         `cargo xtask bench` (as root), L7 part: the composite-routing example \
         (`x-canary-user: true` → v2, everything else 95/5 between v1 and v2, chosen per \
         request), the same three backend pods and the same split for every proxy. Each proxy \
         runs single-worker in the client's network namespace: canary's shim (the agent's \
         single-threaded shim runtime; wrk dials the VIP and the kernel redirects it), nginx \
         (`worker_processes 1`, `split_clients` on `$request_id`, `map` on the header, keep-alive \
         upstreams, access log off), HAProxy (`nbthread 1`, header ACL then `rand(100) lt 5`, \
         `http-reuse always`, no log). wrk -t1 -c{} -d{}s keep-alive, {} rounds in rotated order; \
         medians, ± half the spread. CPU is utime+stime of the proxy's processes \
         (`/proc/<pid>/stat`; nginx master + worker; for canary the whole agent, idle work \
         included). RSS is VmRSS while {} idle keep-alive connections (one request each) are \
         open, read once they have been open for 3 s.\n",
        a.connections, a.seconds, a.rounds, a.idle_connections
    );
    let _ = writeln!(s, "| {} |", HEADERS.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(HEADERS.len()));
    for row in rows(r) {
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    if let Some(intro) = h2h_intro(r) {
        let _ = writeln!(s, "\n{intro}\n");
        let _ = writeln!(s, "| {} |", H2H_HEADERS.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(H2H_HEADERS.len()));
        for row in h2h_rows(r) {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
    }
    let _ = writeln!(s);
    for l in summary_lines(r) {
        let _ = writeln!(s, "- {l}");
    }
    let _ = writeln!(
        s,
        "\n| target (informational) | value | verdict |\n|---|---|---|"
    );
    for t in targets(r) {
        let _ = writeln!(s, "| {} | {} | {} |", t.what, t.value, t.verdict());
    }
    let _ = writeln!(
        s,
        "\nMachine: kernel {}, {} CPUs, load average {} at the start; {}; {}; commit {}; {:.0} s.",
        r.env.get("kernel").map_or("", String::as_str),
        r.env.get("cpus").map_or("", String::as_str),
        r.env.get("loadavg_start").map_or("", String::as_str),
        r.env.get("nginx").map_or("", String::as_str),
        r.env.get("haproxy").map_or("", String::as_str),
        r.env.get("commit").map_or("", String::as_str),
        r.wall_s
    );
    s
}

pub fn json(r: &Results) -> Value {
    let st = |x: Option<Stat>| x.map(|s| json!({"median": s.median, "spread_pct": s.spread_pct}));
    let peers: serde_json::Map<String, Value> = Peer::ALL
        .iter()
        .map(|p| {
            let variants: serde_json::Map<String, Value> = Variant::ALL
                .iter()
                .filter(|v| !runs(r, *p, **v).is_empty())
                .map(|v| {
                    (
                        v.key().to_owned(),
                        json!({
                            "requests_per_sec": st(rps(r, *p, *v)),
                            "latency_p50_us": st(p50(r, *p, *v)),
                            "latency_p99_us": st(p99(r, *p, *v)),
                            "proxy_cpu_s_per_1000_requests": st(cpu(r, *p, *v)),
                            "cpu_us_per_request": split_us(r, *p, *v).map(|(a, u, b, c)| json!({
                                "proxy": a, "proxy_user": u, "wrk": b, "backends": c})),
                            "runs": runs(r, *p, *v).into_iter().map(Run::to_json).collect::<Vec<_>>(),
                        }),
                    )
                })
                .collect();
            (
                p.key().to_owned(),
                json!({
                    "label": p.label(),
                    "variants": variants,
                    "rss_mib": rss(r, *p).map(|(idle, at)| json!({"idle": idle, "at_connections": at})),
                    "rss_first_round_mib": rss_first(r, *p).map(|(idle, at, anon)| json!({
                        "idle": idle, "at_connections": at, "at_connections_anon": anon})),
                    "rss_runs": r.rss.get(p).map(|v| v.iter().map(|s| s.to_json()).collect::<Vec<_>>()),
                    "agent_idle_cpu_s_per_s": r.agent_idle_cpu.get(p),
                    "sanity": r.sanity.get(p).map(|(n, split, header)| json!({
                        "requests": n, "v2_share_without_header": split, "v2_share_with_header": header})),
                }),
            )
        })
        .collect();
    let a = &r.args;
    json!({
        "args": {
            "seconds": a.seconds, "rounds": a.rounds, "connections": a.connections,
            "idle_connections": a.idle_connections, "pin": format!("{:?}", a.pin),
        },
        "placement": r.placement,
        "environment": r.env,
        "wall_seconds": r.wall_s,
        "reruns": r.reruns,
        "peers": peers,
        "head_to_head": r.head_to_head.iter().map(|((other, v), runs)| json!({
            "peer": other.key(), "route": v.key(),
            "canary_over_peer": {
                "requests_per_sec": h2h(r, *other, *v, h2h_rps),
                "latency_p50": h2h(r, *other, *v, h2h_p50),
                "latency_p99": h2h(r, *other, *v, h2h_p99),
                "cpu_per_request": h2h(r, *other, *v, h2h_cpu),
                "cpu_per_request_per_run": h2h_ratios(r, *other, *v, h2h_cpu),
            },
            "runs": runs.iter().map(|(c, o)| json!({"canary": c.to_json(), "peer": o.to_json()})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "metrics_pairs": r.metrics_pairs.iter().map(|(on, off)| json!({
            "on": on.to_json(), "off": off.to_json(),
        })).collect::<Vec<_>>(),
        "ratios": {
            "canary_vs_nginx_rps": ratio(rps(r, Peer::Canary, Variant::Split), rps(r, Peer::Nginx, Variant::Split)),
            "canary_vs_haproxy_rps": ratio(rps(r, Peer::Canary, Variant::Split), rps(r, Peer::Haproxy, Variant::Split)),
            "canary_vs_nginx_cpu": ratio(cpu(r, Peer::Canary, Variant::Split), cpu(r, Peer::Nginx, Variant::Split)),
            "canary_vs_haproxy_cpu": ratio(cpu(r, Peer::Canary, Variant::Split), cpu(r, Peer::Haproxy, Variant::Split)),
            "metrics_on_vs_off_rps": metrics_paired(r),
            "metrics_on_vs_off_rps_per_run": metrics_ratios(r, |w| w.wrk.requests_per_sec),
            "metrics_on_vs_off_cpu_per_request_per_run": metrics_ratios(r, Run::cpu_s_per_1000),
        },
        "targets": targets(r).iter().map(|t| json!({
            "target": t.what, "value": t.value, "verdict": t.verdict(),
        })).collect::<Vec<_>>(),
        "anchors": ANCHORS.iter().map(|(n, v, mb)| json!({
            "what": n, "vcpu_per_1000_rps": v, "memory_mb": mb,
            "source": "Istio 1.24 perf page via perf-anchors §0 #12",
        })).chain(std::iter::once(json!({
            "what": "nginx/HAProxy on this machine kind (issue 3)", "cpu_s_per_1000_requests": PEER_ANCHOR,
        }))).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_formats() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(fmt_us(Some(1500.0)), "1.50ms");
        assert_eq!(fmt_us(Some(420.4)), "420µs");
        let s = stat_of(vec![90.0, 100.0, 110.0]).expect("three values");
        assert!((s.spread_pct - 10.0).abs() < 1e-9);
    }
}
