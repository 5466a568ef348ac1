//! Keeping the agent's heap small: one arena, and freed heap given back
//! to the kernel after a burst.
//!
//! glibc keeps what the program frees in its arenas for reuse. After a
//! burst of connections (hyper holds ~16 KiB of buffers per connection) the
//! agent's RSS would stay at the peak for good. `malloc_trim` returns every
//! whole free page. It walks the arenas under their locks, so it runs only
//! when the shim received no request for a whole tick: at once after a
//! burst, then every few ticks while it stays quiet.

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

/// Returns free heap pages to the kernel (glibc only; other allocators
/// manage this themselves).
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes every thread allocate from glibc's main arena. glibc gives
/// threads arenas of their own, each keeping its own free memory and
/// growing its own heap. In the agent nearly every allocation is the shim
/// thread's; the agent runtime's and the namespace helper's are few, so
/// the lock they share costs nothing measurable, and one arena holds less:
/// 0.8 MiB less RSS at 1000 idle shim connections. Call it before the
/// agent starts any thread.
pub fn use_one_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
