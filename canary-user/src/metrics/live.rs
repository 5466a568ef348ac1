//! The live view behind `canary status --watch`: requests/s, error rate and
//! p99 per destination over the last few seconds, computed on the node from
//! a small ring of one-second buckets (no Prometheus needed), plus
//! connections/s from successive kernel counter snapshots.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::kernel::TcpSample;

/// The live view covers this many complete seconds before the current one.
pub const WINDOW_SECS: u64 = 10;

/// One slot per second of the window, plus the second being filled.
const RING: usize = WINDOW_SECS as usize + 1;

/// Latency buckets per doubling: bounds grow by 2^(1/8) ≈ 9%, so a p99 is
/// within about 5% after interpolation.
const PER_OCTAVE: f64 = 8.0;
/// Lower bound of the first bucket, ms.
const LAT_MIN_MS: f64 = 0.1;
/// 20 doublings from 0.1 ms: up to about 105 s; slower lands in the last.
const LAT_BUCKETS: usize = 160;

/// Live numbers of one destination (service and subset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveStats {
    /// Seconds the request numbers cover (up to [`WINDOW_SECS`]; fewer
    /// while the destination is new).
    pub window_secs: u64,
    /// Requests finished in the window (primary traffic, no mirrors).
    pub requests: u64,
    pub requests_per_sec: f64,
    /// Share of those requests answered 5xx, 0.0 to 1.0 (what Flagger's
    /// success rate counts as failures).
    pub error_rate: f64,
    /// 99th percentile duration, ms; `None` without requests.
    pub p99_ms: Option<f64>,
    /// New connections per second from the kernel counters; `None` until
    /// two snapshots a moment apart were handed to `set_tcp`.
    pub connections_per_sec: Option<f64>,
}

/// Monotonic time since an arbitrary origin.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Duration;
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock(Instant);

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

/// A destination: service FQDN and subset.
type DestinationKey = (String, Option<String>);

/// Every destination's ring.
pub(super) struct LiveTable {
    clock: Arc<dyn Clock>,
    rings: RwLock<HashMap<DestinationKey, Arc<LiveRing>>>,
}

#[derive(Debug)]
pub(super) struct LiveRing {
    requests: Mutex<Slots>,
    /// `(time, opened)` from `set_tcp`, oldest first; at most one older
    /// than the window (the anchor the rate is measured from).
    connections: Mutex<VecDeque<(Duration, u64)>>,
}

#[derive(Debug)]
struct Slots {
    /// The first second anything was recorded: a new destination's rate is
    /// not diluted by seconds before it existed.
    first: Option<u64>,
    slots: Box<[Slot; RING]>,
}

#[derive(Clone, Debug)]
struct Slot {
    second: u64,
    requests: u64,
    errors: u64,
    latency: [u32; LAT_BUCKETS],
}

// === impl SystemClock, ManualClock ===

impl SystemClock {
    pub fn new() -> Self {
        SystemClock(Instant::now())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

impl ManualClock {
    pub fn new(start: Duration) -> Self {
        let clock = ManualClock::default();
        clock.set(start);
        clock
    }

    pub fn set(&self, t: Duration) {
        let nanos = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
        self.0.store(nanos, Ordering::Relaxed);
    }

    pub fn advance(&self, by: Duration) {
        self.set(self.now() + by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

// === impl LiveTable ===

impl LiveTable {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        LiveTable {
            clock,
            rings: RwLock::default(),
        }
    }

    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// The ring of `service`'s `subset`, created on first use.
    pub fn ring(&self, service: &str, subset: Option<&str>) -> Arc<LiveRing> {
        if let Some(ring) = self.get(service, subset) {
            return ring;
        }
        let mut rings = self.rings.write().unwrap_or_else(|e| e.into_inner());
        rings
            .entry((service.to_string(), subset.map(str::to_string)))
            .or_insert_with(|| Arc::new(LiveRing::new()))
            .clone()
    }

    fn get(&self, service: &str, subset: Option<&str>) -> Option<Arc<LiveRing>> {
        let rings = self.rings.read().unwrap_or_else(|e| e.into_inner());
        // Lookups by borrowed parts would need a second key type; status
        // asks once per destination per refresh, so the copy is fine.
        rings
            .get(&(service.to_string(), subset.map(str::to_string)))
            .cloned()
    }

    pub fn stats(&self, service: &str, subset: Option<&str>) -> LiveStats {
        match self.get(service, subset) {
            Some(ring) => ring.stats(self.now()),
            None => LiveStats::default(),
        }
    }

    /// Takes the `opened` totals of one kernel snapshot, summed per
    /// destination.
    pub fn record_connections(&self, samples: &[TcpSample]) {
        let mut opened: HashMap<(&str, Option<&str>), u64> = HashMap::new();
        for s in samples {
            *opened
                .entry((s.destination_service.as_str(), s.subset.as_deref()))
                .or_default() += s.counts.opened;
        }
        let now = self.now();
        for ((service, subset), total) in opened {
            self.ring(service, subset).record_connections(now, total);
        }
    }
}

// === impl LiveRing ===

impl LiveRing {
    fn new() -> Self {
        LiveRing {
            requests: Mutex::new(Slots {
                first: None,
                slots: Box::new(std::array::from_fn(|_| Slot::empty(u64::MAX))),
            }),
            connections: Mutex::default(),
        }
    }

    pub fn record(&self, now: Duration, response_code: u16, ms: f64) {
        let second = now.as_secs();
        let bucket = latency_bucket(ms);
        let mut ring = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        ring.first.get_or_insert(second);
        let slot = &mut ring.slots[(second % RING as u64) as usize];
        if slot.second != second {
            *slot = Slot::empty(second);
        }
        slot.requests += 1;
        slot.errors += u64::from((500..600).contains(&response_code));
        slot.latency[bucket] = slot.latency[bucket].saturating_add(1);
    }

    fn record_connections(&self, now: Duration, opened: u64) {
        let mut snaps = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        snaps.push_back((now, opened));
        let start = now.saturating_sub(Duration::from_secs(WINDOW_SECS));
        // Keep one snapshot at or before the window's start as the anchor.
        while snaps.len() > 2 && snaps[1].0 <= start {
            snaps.pop_front();
        }
    }

    pub fn stats(&self, now: Duration) -> LiveStats {
        let mut stats = self.request_stats(now.as_secs());
        stats.connections_per_sec = self.connection_rate(now);
        stats
    }

    /// Over the complete seconds `[now - WINDOW_SECS, now)`, not before the
    /// first record.
    fn request_stats(&self, now_sec: u64) -> LiveStats {
        let ring = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let Some(first) = ring.first else {
            return LiveStats::default();
        };
        let start = now_sec.saturating_sub(WINDOW_SECS).max(first);
        let window_secs = now_sec.saturating_sub(start);
        if window_secs == 0 {
            return LiveStats::default();
        }
        let mut requests = 0;
        let mut errors = 0;
        let mut latency = [0u64; LAT_BUCKETS];
        for slot in ring
            .slots
            .iter()
            .filter(|s| (start..now_sec).contains(&s.second))
        {
            requests += slot.requests;
            errors += slot.errors;
            for (sum, n) in latency.iter_mut().zip(&slot.latency) {
                *sum += u64::from(*n);
            }
        }
        LiveStats {
            window_secs,
            requests,
            requests_per_sec: requests as f64 / window_secs as f64,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p99_ms: quantile(&latency, 0.99),
            connections_per_sec: None,
        }
    }

    fn connection_rate(&self, now: Duration) -> Option<f64> {
        let snaps = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let (&(t0, first), &(t1, last)) = (snaps.front()?, snaps.back()?);
        let window = Duration::from_secs(WINDOW_SECS);
        // Stale (nobody reads the kernel any more), too short to tell, or
        // the counters were reset.
        if now.saturating_sub(t1) > window
            || t1.saturating_sub(t0) < Duration::from_millis(500)
            || last < first
        {
            return None;
        }
        Some((last - first) as f64 / (t1 - t0).as_secs_f64())
    }
}

impl Slot {
    fn empty(second: u64) -> Self {
        Slot {
            second,
            requests: 0,
            errors: 0,
            latency: [0; LAT_BUCKETS],
        }
    }
}

/// The bucket whose upper bound is the first at or above `ms`.
fn latency_bucket(ms: f64) -> usize {
    if ms.is_nan() || ms <= LAT_MIN_MS {
        return 0;
    }
    let i = (PER_OCTAVE * (ms / LAT_MIN_MS).log2()).ceil();
    (i as usize).min(LAT_BUCKETS - 1)
}

/// Upper bound of bucket `i`, ms.
fn upper_bound(i: usize) -> f64 {
    LAT_MIN_MS * (i as f64 / PER_OCTAVE).exp2()
}

/// The `q` quantile, interpolated linearly inside its bucket as
/// Prometheus's `histogram_quantile` does.
fn quantile(buckets: &[u64; LAT_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { upper_bound(i - 1) };
            let upper = upper_bound(i);
            let into = ((rank - seen as f64) / *n as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * into);
        }
        seen += n;
    }
    Some(upper_bound(LAT_BUCKETS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_bound_their_values() {
        for ms in [0.05, 0.1, 0.11, 1.0, 9.9, 10.0, 250.0, 3000.0, 60_000.0] {
            let i = latency_bucket(ms);
            assert!(
                upper_bound(i) >= ms,
                "{ms} in bucket {i} ≤ {}",
                upper_bound(i)
            );
            if i > 0 {
                assert!(upper_bound(i - 1) < ms, "{ms} belongs below bucket {i}");
            }
        }
        assert_eq!(latency_bucket(1e9), LAT_BUCKETS - 1);
        assert_eq!(latency_bucket(f64::NAN), 0);
    }

    #[test]
    fn quantile_of_nothing_is_none() {
        assert_eq!(quantile(&[0; LAT_BUCKETS], 0.99), None);
    }
}
