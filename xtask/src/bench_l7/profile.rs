//! `--l7-profile`: where each proxy's CPU goes. System calls and context
//! switches per request of every peer (`perf stat` on the proxy's
//! processes during one more wrk run), and a `perf record` profile of
//! both canary agents.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};
use canary_tests::spawn_in;

use super::measure::Cpus;
use super::{L7Args, Lab, Peer, Variant, one_run};
use crate::setup::say;

/// x86-64 system call numbers the proxies use on their request path.
const SYSCALLS: [(&str, &[u32]); 9] = [
    ("read/readv/recvfrom/recvmsg", &[0, 19, 45, 47]),
    ("write/writev/sendto/sendmsg", &[1, 20, 44, 46]),
    ("epoll_wait/epoll_pwait(2)", &[232, 281, 441]),
    ("epoll_ctl", &[233]),
    ("futex", &[202]),
    ("accept/accept4", &[43, 288]),
    ("connect", &[42]),
    ("close", &[3]),
    ("sched_yield", &[24]),
];

/// Counts every system call, the ones in [`SYSCALLS`], and the context
/// switches of each peer's processes during one wrk run (95/5).
pub fn syscalls(lab: &Lab, cpus: Cpus, args: &L7Args) -> Result<String> {
    if !cfg!(target_arch = "x86_64") {
        return Ok("system call counts: x86-64 only\n".into());
    }
    let mut out = format!(
        "==== per request, during wrk -t1 -c{} -d{}s (95/5), perf stat on the proxy's \
         processes ====\n{:<30} {:>9} {:>7} {:>7}",
        args.connections, args.seconds, "", "req/s", "syscall", "ctxsw"
    );
    for (name, _) in SYSCALLS {
        let _ = write!(out, " {name:>12.12}");
    }
    out.push('\n');
    for peer in Peer::ALL {
        say(format!(
            "bench l7: counting system calls of {} (perf stat, one more wrk run)",
            peer.label()
        ));
        let pids: Vec<String> = lab.pids(peer)?.iter().map(u32::to_string).collect();
        let file = lab.dir.0.join(format!("perf-stat-{}.csv", peer.key()));
        let mut cmd = Command::new("perf");
        cmd.args(["stat", "-x,", "-o"]).arg(&file);
        cmd.args(["-e", "raw_syscalls:sys_enter", "-e", "context-switches"]);
        for (_, ids) in SYSCALLS {
            let filter = ids
                .iter()
                .map(|i| format!("id == {i}"))
                .collect::<Vec<_>>()
                .join(" || ");
            cmd.args(["-e", "raw_syscalls:sys_enter", "--filter", &filter]);
        }
        cmd.args(["-p", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut perf = spawn_in(cmd, None, None)?;
        std::thread::sleep(Duration::from_millis(300));
        let run = one_run(
            lab,
            cpus,
            peer,
            Variant::Split,
            args.connections,
            args.seconds,
        );
        perf.kill_with(libc::SIGINT)?;
        perf.wait_timeout(Duration::from_secs(10))?;
        let run = run?;
        let text = std::fs::read_to_string(&file).context("perf stat output")?;
        // Lines in order: all syscalls, context switches, then SYSCALLS.
        let counts: Vec<f64> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                l.split(',')
                    .next()
                    .unwrap_or("")
                    .parse::<f64>()
                    .unwrap_or(f64::NAN)
            })
            .collect();
        let n = run.wrk.requests.max(1) as f64;
        let per = |i: usize| counts.get(i).map_or(f64::NAN, |c| c / n);
        let _ = write!(
            out,
            "{:<30} {:>9.0} {:>7.2} {:>7.2}",
            peer.label(),
            run.wrk.requests_per_sec,
            per(0),
            per(1)
        );
        for i in 0..SYSCALLS.len() {
            let _ = write!(out, " {:>12.2}", per(i + 2));
        }
        out.push('\n');
    }
    out.push_str(
        "(wrk's own request may span several proxy reads; the counts include the proxy's idle \
         work during the run)\n\n",
    );
    Ok(out)
}

/// `perf record` (DWARF call graphs) of each canary agent during one more
/// wrk run each; the top of `perf report` by self time, and with
/// children. At 2999 Hz a 5 s run gives ~7000 samples, enough to rank
/// symbols under 1% (499 Hz gave ~1200).
pub fn perf_record(lab: &Lab, cpus: Cpus, args: &L7Args) -> Result<String> {
    let mut out = String::new();
    for peer in [Peer::Canary, Peer::CanaryNoMetrics] {
        let pid = lab.pids(peer)?[0];
        let data = lab.dir.0.join(format!("perf-{}.data", peer.key()));
        say(format!(
            "bench l7: profiling {} (perf record during one more wrk run)",
            peer.label()
        ));
        let mut rec = Command::new("perf");
        rec.args([
            "record",
            "-q",
            "-F",
            "2999",
            "--call-graph",
            "dwarf,16384",
            "-o",
        ])
        .arg(&data)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut perf = spawn_in(rec, None, None)?;
        std::thread::sleep(Duration::from_millis(300));
        let r = one_run(
            lab,
            cpus,
            peer,
            Variant::Split,
            args.connections,
            args.seconds,
        );
        perf.kill_with(libc::SIGINT)?;
        perf.wait_timeout(Duration::from_secs(60))?;
        let r = r?;
        let report = |extra: &[&str]| -> Result<String> {
            let out = Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-header",
                    "--percent-limit",
                    "0.5",
                    "-i",
                ])
                .arg(&data)
                .args(extra)
                .output()
                .context("perf report")?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let dso = report(&["--no-children", "-g", "none", "--sort", "dso"])?;
        let flat = report(&["--no-children", "-g", "none", "--sort", "dso,symbol"])?;
        let tree = report(&["--children", "-g", "none", "--sort", "symbol"])?;
        let _ = std::fs::remove_file(&data);
        let _ = write!(
            out,
            "==== perf profile of {} (agent pid {pid}) during wrk -t1 -c{} -d{}s, 95/5: {:.0} \
             req/s, {:.4} CPU-s/1000 req ====\n\n== self time by dso ==\n{dso}\n\
             == self time by dso, symbol ==\n{flat}\n\
             == with children, by symbol ==\n{tree}\n",
            peer.label(),
            args.connections,
            args.seconds,
            r.wrk.requests_per_sec,
            r.cpu_s_per_1000()
        );
    }
    Ok(out)
}
