//! Where the bench's processes run, and how much CPU they use.
//!
//! Throughput on a small shared machine moves with everything else that
//! runs on it. CPU time per request does much less: the bench reads the
//! cgroup v2 `cpu.stat` of the client's cgroup (wrk, with the softirq work
//! it does inline, which this kernel charges to the task) and of the
//! backends' cgroup around every run, and the machine's busy time from
//! `/proc/stat`, so a report can say how much of the machine others used
//! meanwhile.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};

/// How the bench places its clients (wrk, probe) and backends on CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pin {
    /// Let the scheduler place everything.
    None,
    /// Clients on the first allowed CPU, backends on the second.
    Split,
    /// Clients and backends on the first allowed CPU.
    Same,
}

/// Client and server CPUs.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub client: usize,
    pub server: usize,
}

impl Placement {
    /// `None` when not pinning (or `Split` on a one-CPU machine).
    pub fn new(pin: Pin) -> Option<Self> {
        let cpus = allowed_cpus();
        match (pin, cpus.as_slice()) {
            (Pin::None, _) | (_, []) => None,
            (Pin::Split, [a, b, ..]) => Some(Placement {
                client: *a,
                server: *b,
            }),
            (Pin::Split, [_]) => None,
            (Pin::Same, [a, ..]) => Some(Placement {
                client: *a,
                server: *a,
            }),
        }
    }
}

/// CPU time a cgroup has used, in microseconds (`usage_usec` of
/// `cpu.stat`, present in cgroup v2 without any controller enabled).
pub fn cgroup_usage_us(cgroup: &Path) -> Result<u64> {
    let path = cgroup.join("cpu.stat");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usage_usec in {}", path.display()))
}

/// Busy time (everything but idle and iowait) of one CPU, or of the whole
/// machine, from `/proc/stat`, in microseconds.
pub fn busy_us(cpu: Option<usize>) -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let label = cpu.map_or_else(|| "cpu".to_owned(), |c| format!("cpu{c}"));
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
        .with_context(|| format!("no {label} line in /proc/stat"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    Ok(busy * 1_000_000 / hz)
}

/// Raises the scheduling priority of the bench and everything it starts,
/// for the length of the run: the nice value of this process (inherited
/// by its children) and, since autogroup scheduling shares CPU time
/// between sessions before nice values count, of this session's
/// autogroup. Restores the autogroup's value on drop.
pub struct Boost {
    autogroup: Option<i32>,
}

const AUTOGROUP: &str = "/proc/self/autogroup";

impl Boost {
    pub fn apply(nice: i32) -> Result<Self> {
        // SAFETY: setpriority has no memory-safety preconditions.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setpriority");
        }
        // "/autogroup-7 nice 0"; absent when autogroup is off.
        let previous = std::fs::read_to_string(AUTOGROUP).ok().and_then(|s| {
            s.split_whitespace()
                .last()
                .and_then(|n| n.parse::<i32>().ok())
        });
        if previous.is_some() {
            std::fs::write(AUTOGROUP, nice.to_string())
                .with_context(|| format!("writing {AUTOGROUP}"))?;
        }
        Ok(Boost {
            autogroup: previous,
        })
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some(previous) = self.autogroup {
            let _ = std::fs::write(AUTOGROUP, previous.to_string());
        }
    }
}

/// The CPUs this process may run on.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: all-zero bytes are a valid cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

fn only(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: all-zero bytes are a valid cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET checks `cpu` against the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// Makes `cmd`'s process run on `cpu` only, from its first instruction.
pub fn pin_command(cmd: &mut Command, cpu: usize) {
    let set = only(cpu);
    // SAFETY: the closure makes one async-signal-safe system call on a
    // cpu_set_t that was built before fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Moves every thread of running process `pid` to `cpu`; threads it
/// creates later inherit the mask.
pub fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    let set = only(cpu);
    let tasks = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let Ok(tid) = entry?.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        // SAFETY: `set` is a valid cpu_set_t of the size passed; `tid` is
        // a thread of our own child.
        if unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &raw const set) }
            != 0
        {
            let err = std::io::Error::last_os_error();
            // A thread that just exited is fine.
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err).with_context(|| format!("pinning thread {tid} to CPU {cpu}"));
            }
        }
    }
    Ok(())
}
