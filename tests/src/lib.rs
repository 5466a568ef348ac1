//! The test kit shared by canary's end-to-end tests and `cargo xtask run`.
//!
//! Everything a privileged test needs to build a small network without
//! touching the machine's own: network namespaces joined by a bridge that
//! lives in its own namespace ([`Topology`]), a cgroup v2 directory for the
//! programs under test ([`TestCgroup`]), processes started inside both
//! ([`spawn_in`], [`run_in`]), and the two helper binaries that play server
//! (`canary-backend`, see [`backend`]) and client (`canary-probe`, see
//! [`probe`]).
//!
//! Every resource is held by a guard that removes it on drop, also while a
//! test panics. Declare the [`Topology`] and [`TestCgroup`] *before* the
//! [`ChildGuard`]s that run in them, so the processes are gone first.

pub mod agent;
pub mod backend;
pub mod cgroup;
pub mod checkout;
pub mod e2e;
pub mod http;
pub mod httpclient;
mod ip;
pub mod net;
pub mod netns;
pub mod probe;
pub mod process;
pub mod prometheus;
pub mod topology;

use std::sync::atomic::{AtomicU32, Ordering};

pub use cgroup::{TestCgroup, cgroup2_mount};
pub use netns::{Netns, in_netns, wait_for_tcp};
pub use process::{ChildGuard, bin_path, run_in, spawn_in};
pub use topology::{Host, IfAddr, Topology};

/// Panics unless the process runs as root.
///
/// Privileged tests call this first: they never skip, so a run without
/// privileges (for example under `CI=true`) fails loudly instead of passing.
#[track_caller]
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "privileged test: run `cargo xtask test` as root (euid is {euid})"
    );
}

/// A short name prefix, unique on this machine while its resources exist.
///
/// At most 6 characters: `c`, four base-36 digits of the pid and one of a
/// per-process counter. Kernel interface names are limited to 15 bytes, so
/// the prefix has to stay short. A prefix that is still in use (a network
/// namespace or cgroup named after it exists, for example after a wrapped
/// pid or counter) is skipped; panics if all 36 of this process are.
pub fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id() % 36u32.pow(4);
    for _ in 0..36 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) % 36;
        let prefix = format!("c{}{}", base36(pid, 4), base36(n, 1));
        if !prefix_in_use(&prefix) {
            return prefix;
        }
    }
    panic!("all 36 name prefixes of pid {pid} are in use; leftovers in /run/netns or cgroup2?");
}

fn base36(mut n: u32, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn prefix_in_use(prefix: &str) -> bool {
    let netns = format!("{prefix}-");
    let in_dir = |dir: &std::path::Path, start: &str| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(start))
        })
    };
    let cgroup = format!("canary-{prefix}-");
    in_dir(std::path::Path::new(netns::NETNS_RUN_DIR), &netns)
        || cgroup2_mount().is_ok_and(|mount| in_dir(&mount, &cgroup))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_and_distinct() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert!(a.len() <= 6, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn base36_pads_and_wraps() {
        assert_eq!(base36(0, 4), "0000");
        assert_eq!(base36(35, 2), "0z");
        assert_eq!(base36(36, 1), "0");
    }
}
