//! What canary's kernel programs themselves cost, measured by the kernel.
//!
//! `BPF_ENABLE_STATS` makes the kernel time every BPF program run for as
//! long as the returned file descriptor is open (closing it, also by
//! exiting, turns the accounting off again, so nothing is left behind).
//! Each program's `run_time_ns` and `run_cnt` (read with `bpftool`) before
//! and after a wrk run give canary's in-kernel nanoseconds per request,
//! free of the scheduling noise that blurs req/s on a small machine. The
//! kernel's own cost of calling the programs (the cgroup hook dispatch) is
//! not included.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// `enum bpf_cmd`: BPF_ENABLE_STATS.
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `enum bpf_stats_type`: BPF_STATS_RUN_TIME.
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time accounting for every BPF program, while this lives.
pub struct StatsGuard {
    _fd: OwnedFd,
}

impl StatsGuard {
    pub fn enable() -> Result<Self> {
        // union bpf_attr { struct { __u32 type; } enable_stats; ... }
        let attr: [u32; 2] = [BPF_STATS_RUN_TIME, 0];
        // SAFETY: `attr` is a valid, zero-padded bpf_attr prefix of the
        // size passed; the kernel only reads it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("bpf(BPF_ENABLE_STATS)");
        }
        // SAFETY: a fresh descriptor that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(StatsGuard { _fd: fd })
    }
}

/// An agent's kernel programs: (name, program id).
pub type Programs = Vec<(String, u64)>;

/// The program ids behind an agent's pinned links (`<pin>/links/*`).
pub fn agent_programs(pin_path: &Path) -> Result<Programs> {
    let links = pin_path.join("links");
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(&links).with_context(|| format!("reading {}", links.display()))?
    {
        let path = entry?.path();
        let json = bpftool(&["link", "show", "pinned", &path.to_string_lossy()])?;
        let id = json["prog_id"]
            .as_u64()
            .with_context(|| format!("no prog_id for {}: {json}", path.display()))?;
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        out.push((name, id));
    }
    out.sort();
    Ok(out)
}

/// `(run_time_ns, run_cnt)` of every program, by id.
pub fn snapshot() -> Result<BTreeMap<u64, (u64, u64)>> {
    let json = bpftool(&["prog", "show"])?;
    let Some(progs) = json.as_array() else {
        bail!("bpftool prog show: expected a JSON array");
    };
    Ok(progs
        .iter()
        .filter_map(|p| {
            let id = p["id"].as_u64()?;
            let ns = p["run_time_ns"].as_u64().unwrap_or(0);
            let cnt = p["run_cnt"].as_u64().unwrap_or(0);
            Some((id, (ns, cnt)))
        })
        .collect())
}

/// Nanoseconds and runs of each program in `ids` between two snapshots,
/// by program name.
pub fn delta(
    before: &BTreeMap<u64, (u64, u64)>,
    after: &BTreeMap<u64, (u64, u64)>,
    ids: &[(String, u64)],
) -> BTreeMap<String, (u64, u64)> {
    ids.iter()
        .map(|(name, id)| {
            let (b_ns, b_cnt) = before.get(id).copied().unwrap_or_default();
            let (a_ns, a_cnt) = after.get(id).copied().unwrap_or_default();
            (
                name.clone(),
                (a_ns.saturating_sub(b_ns), a_cnt.saturating_sub(b_cnt)),
            )
        })
        .collect()
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing bpftool {}", args.join(" ")))
}
