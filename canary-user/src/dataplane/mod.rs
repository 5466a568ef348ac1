//! The only module that touches aya: load the kernel programs, attach and
//! pin them, and write compiled routes into the maps.
//!
//! Pinned layout under `--pin-path` (default `/sys/fs/bpf/canary`):
//! `SERVICES`, `TABLES`, `BACKENDS`, `MAGLEV`, `FLOWS`, `COUNTERS`,
//! `CLIENT_IDS` (maps) and `links/<program>` (cgroup links). Everything
//! keeps working with no agent running; a new agent adopts it.

pub mod encode;
pub mod identities;
pub mod maglev;
pub mod orig_dst;
mod programs;
pub mod slots;
mod sys;
mod writer;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

pub use encode::{EncodedRoute, addr_words, backend_addr, encode, words_addr};
pub use programs::{KernelLogLevel, check_cgroup};
pub use sys::cgroup2_mount;
pub use writer::{ApplyStats, Dataplane};

/// Where the dataplane lives and what it attaches to.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    pub pin_path: PathBuf,
    pub cgroup: PathBuf,
    pub log_level: KernelLogLevel,
    /// sockops looks every connecting socket up instead of reading the
    /// mark connect4 sets; forced on kernels before 6.12.
    pub sockops_lookup: bool,
    /// Slots of `FLOW_SLOTS` the programs use, `1..=MAX_FLOWS`.
    pub flow_slots: u32,
}

/// Map names, as pinned. Kept in one list so cleanup and compatibility
/// checks cannot miss one.
pub const MAP_NAMES: [&str; 10] = [
    "SERVICES",
    "TABLES",
    "BACKENDS",
    "MAGLEV",
    "FLOWS",
    "FLOW_SLOTS",
    "FLOW_EPOCH",
    "COUNTERS",
    "CLIENT_IDS",
    "ORIG_DST",
];

/// Makes sure `pin_path` can hold pins: bpffs is mounted at its parent
/// (mounting it at /sys/fs/bpf if that is where it belongs) and the
/// directory exists.
fn prepare_pin_path(pin_path: &Path) -> Result<()> {
    let parent = pin_path.parent().unwrap_or(Path::new("/"));
    if !sys::is_bpffs(parent) {
        if parent == Path::new("/sys/fs/bpf") {
            sys::mount_bpffs(parent).context("mounting bpffs at /sys/fs/bpf")?;
        } else {
            bail!(
                "{} is not on a BPF filesystem; choose a --pin-path under /sys/fs/bpf",
                pin_path.display()
            );
        }
    }
    std::fs::create_dir_all(pin_path.join("links"))
        .with_context(|| format!("creating {}", pin_path.display()))?;
    Ok(())
}

/// Removes every pin canary made: links first (which detaches the programs
/// from the cgroup), then maps. The kernel frees what nothing references.
/// Returns what it removed, for the operator.
pub fn cleanup(pin_path: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !pin_path.exists() {
        return Ok(removed);
    }
    let links = pin_path.join("links");
    if links.exists() {
        for entry in std::fs::read_dir(&links)? {
            let path = entry?.path();
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            removed.push(path);
        }
        std::fs::remove_dir(&links)?;
    }
    for entry in std::fs::read_dir(pin_path)? {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        removed.push(path);
    }
    std::fs::remove_dir(pin_path)?;
    Ok(removed)
}
