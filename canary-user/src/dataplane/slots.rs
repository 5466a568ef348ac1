//! Free-slot bookkeeping for the kernel's table and backend arrays.
//!
//! A table slot or backend range that was live is not reused at once: a
//! `connect()` that read the old `SERVICES` entry just before the flip may
//! still be reading it. Freed space sits in quarantine for a grace period
//! (far longer than any BPF program runs) before it can be handed out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long freed kernel slots stay untouched.
pub const GRACE: Duration = Duration::from_secs(2);

/// Contiguous ranges of an array map of `capacity` entries.
#[derive(Debug)]
pub struct RangeAllocator {
    /// start → length, non-overlapping, merged with neighbours.
    free: BTreeMap<u32, u32>,
    quarantine: Vec<(Instant, u32, u32)>,
}

impl RangeAllocator {
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self {
            free,
            quarantine: Vec::new(),
        }
    }

    /// First fit. `len` 0 gets an empty range at 0.
    pub fn alloc(&mut self, len: u32, now: Instant) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        self.release_expired(now);
        let (&start, &have) = self.free.iter().find(|(_, have)| **have >= len)?;
        self.free.remove(&start);
        if have > len {
            self.free.insert(start + len, have - len);
        }
        Some(start)
    }

    /// Marks `[start, start+len)` as in use (adopting state found in the
    /// kernel after a restart). Returns false if any of it was not free.
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some((&fs, &fl)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if start + len > fs + fl {
            return false;
        }
        self.free.remove(&fs);
        if start > fs {
            self.free.insert(fs, start - fs);
        }
        if fs + fl > start + len {
            self.free.insert(start + len, fs + fl - start - len);
        }
        true
    }

    pub fn free_later(&mut self, start: u32, len: u32, now: Instant) {
        if len > 0 {
            self.quarantine.push((now, start, len));
        }
    }

    fn release_expired(&mut self, now: Instant) {
        let (ready, wait): (Vec<_>, Vec<_>) = self
            .quarantine
            .drain(..)
            .partition(|(at, _, _)| now.duration_since(*at) >= GRACE);
        self.quarantine = wait;
        for (_, start, len) in ready {
            self.insert_free(start, len);
        }
    }

    fn insert_free(&mut self, mut start: u32, mut len: u32) {
        if let Some((&ps, &pl)) = self.free.range(..start).next_back()
            && ps + pl == start
        {
            self.free.remove(&ps);
            start = ps;
            len += pl;
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
    }

    /// Entries free right now (not counting quarantine).
    pub fn free_count(&self) -> u32 {
        self.free.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_and_merge_after_grace() {
        let t0 = Instant::now();
        let mut a = RangeAllocator::new(10);
        assert_eq!(a.alloc(4, t0), Some(0));
        assert_eq!(a.alloc(4, t0), Some(4));
        assert_eq!(a.alloc(4, t0), None);
        a.free_later(0, 4, t0);
        a.free_later(4, 4, t0);
        // Still in quarantine: nothing to hand out.
        assert_eq!(a.alloc(3, t0 + Duration::from_millis(10)), None);
        // After the grace period both ranges merged with the tail: 10 free.
        assert_eq!(a.alloc(10, t0 + GRACE), Some(0));
    }

    #[test]
    fn reserve_splits_free_space() {
        let mut a = RangeAllocator::new(100);
        assert!(a.reserve(10, 5));
        assert!(!a.reserve(12, 1), "already taken");
        assert_eq!(a.free_count(), 95);
        assert_eq!(a.alloc(10, Instant::now()), Some(0));
        assert_eq!(a.alloc(1, Instant::now()), Some(15));
    }

    #[test]
    fn empty_ranges_cost_nothing() {
        let mut a = RangeAllocator::new(1);
        assert_eq!(a.alloc(0, Instant::now()), Some(0));
        assert_eq!(a.free_count(), 1);
    }
}
