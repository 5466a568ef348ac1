//! Keeping the agent's heap small and cheap: its allocator, and freed
//! heap given back to the kernel after a burst.
//!
//! The `canary` binary allocates with jemalloc (`main.rs`), for the shim's
//! sake: hyper re-allocates an 8 KiB read buffer per request on both sides
//! of the shim (its header values still point into the old one when it
//! reads again), and the request future is 3.4 KB. glibc serves blocks
//! that size from its bins, consolidating its fastbins on the way;
//! jemalloc keeps them in a per-thread cache. Head to head with nginx
//! that was 5–8% less CPU per request. Its settings ([`JEMALLOC_CONF`]):
//! one arena (nearly every allocation is the shim thread's, and one arena
//! holds less), a thread cache only up to 8 KiB blocks, and freed pages
//! given back after a second instead of ten.
//!
//! After a burst of connections the pages that held their buffers would
//! stay resident until jemalloc's decay gets to them, and glibc's (for the
//! C code in the process) for good. So when the shim received no request
//! for a whole tick, at once after a burst and then every few ticks while
//! it stays quiet, both are purged.

/// jemalloc's options, as its `malloc_conf` symbol (NUL-terminated).
pub const JEMALLOC_CONF: &[u8; 63] =
    b"narenas:1,tcache_max:8192,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Quiet ticks between two trims.
const EVERY: u32 = 5;

#[derive(Debug, Default)]
pub struct Trimmer {
    last_requests: u64,
    /// Quiet ticks since the last trim (`None`: never trimmed).
    since_trim: Option<u32>,
}

impl Trimmer {
    /// Called once per agent tick with the shim's request count; returns
    /// whether it trimmed.
    pub fn tick(&mut self, requests: u64) -> bool {
        let quiet = requests == self.last_requests;
        self.last_requests = requests;
        if !quiet {
            // The first quiet tick after this trims at once: a burst just
            // ended.
            self.since_trim = None;
            return false;
        }
        match self.since_trim {
            Some(n) if n + 1 < EVERY => {
                self.since_trim = Some(n + 1);
                false
            }
            _ => {
                release_free_heap();
                self.since_trim = Some(0);
                true
            }
        }
    }
}

/// Returns free heap pages to the kernel: jemalloc's (all arenas) and
/// glibc's.
pub fn release_free_heap() {
    // MALLCTL_ARENAS_ALL.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: a NUL-terminated control name, and no old or new value, as
    // `arena.<i>.purge` takes; jemalloc initialises itself if it has not.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_conf_is_one_c_string() {
        let (last, body) = JEMALLOC_CONF.split_last().expect("not empty");
        assert_eq!(*last, 0);
        assert!(!body.contains(&0));
        let text = std::str::from_utf8(body).expect("ASCII");
        for opt in text.split(',') {
            assert!(opt.split_once(':').is_some(), "{opt} is not key:value");
        }
    }

    #[test]
    fn trims_only_when_quiet_and_then_every_few_ticks() {
        let mut t = Trimmer::default();
        // Busy: never.
        assert!(!t.tick(10));
        assert!(!t.tick(20));
        // First quiet tick: at once (the burst just ended).
        assert!(t.tick(20));
        // Still quiet: again only after EVERY ticks.
        for _ in 1..EVERY {
            assert!(!t.tick(20));
        }
        assert!(t.tick(20));
        // Busy again, then quiet: at once again.
        assert!(!t.tick(30));
        assert!(t.tick(30));
        assert!(!t.tick(30));
    }
}
