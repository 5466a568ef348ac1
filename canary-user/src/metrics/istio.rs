//! The HTTP series, fed per request by the shim.
//!
//! This is the hot path: one lookup per request (a cheap hash of a few
//! label fields, then a field-by-field compare under a read lock, no
//! allocation once the series exists), a handful of relaxed atomic adds,
//! and the live view's one-second ring (about 250 ns in all, release
//! build). Counters and histograms are plain atomics; a `Collector`
//! encodes them with prometheus-client's encoder at scrape time.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, LabelSetEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::ENVOY_BUCKETS;
use super::live::{LiveRing, LiveTable};
use crate::observe::{Label, RequestRecord, Workload};

/// Family names (and help) of one request table.
#[derive(Debug)]
pub(super) struct Names {
    /// Counter, without `_total` (the encoder appends it).
    pub requests: (&'static str, &'static str),
    pub duration: (&'static str, &'static str),
    pub request_bytes: Option<(&'static str, &'static str)>,
    pub response_bytes: Option<(&'static str, &'static str)>,
}

/// Istio's own families: real traffic only.
pub(super) const PRIMARY: Names = Names {
    requests: (
        "istio_requests",
        "Requests served, by source, destination and response.",
    ),
    duration: (
        "istio_request_duration_milliseconds",
        "Request duration in milliseconds, from the request's first byte to the response's last.",
    ),
    request_bytes: Some((
        "istio_request_bytes",
        "Request size in bytes, head and body, as received from the client.",
    )),
    response_bytes: Some((
        "istio_response_bytes",
        "Response size in bytes, head and body, as sent to the client.",
    )),
};

/// Mirrored copies, apart so no `istio_*` query ever counts them.
pub(super) const MIRROR: Names = Names {
    requests: (
        "canary_mirror_requests",
        "Mirrored copies of requests, by mirror destination and its response (never in istio_requests_total).",
    ),
    duration: (
        "canary_mirror_request_duration_milliseconds",
        "Duration of mirrored copies in milliseconds, as istio_request_duration_milliseconds.",
    ),
    request_bytes: None,
    response_bytes: None,
};

/// Every series of one family set, bucketed by the hash of its labels.
#[derive(Debug)]
pub(super) struct RequestTable {
    names: Names,
    series: RwLock<HashMap<u64, Vec<Arc<RequestSeries>>>>,
}

/// The label values of one series, kept in the record's own types so that
/// a lookup compares without formatting anything.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SeriesKey {
    source: Workload,
    destination: Workload,
    destination_service: Label,
    destination_service_name: Label,
    destination_service_namespace: Label,
    protocol: &'static str,
    response_code: u16,
    grpc_status: Option<String>,
    response_flags: std::borrow::Cow<'static, str>,
}

#[derive(Debug)]
struct RequestSeries {
    key: SeriesKey,
    requests: AtomicU64,
    duration: AtomicHistogram,
    request_bytes: AtomicHistogram,
    response_bytes: AtomicHistogram,
    /// The live-view ring of the destination's (service, subset) this
    /// series was created for; a record for another subset with the same
    /// labels looks its ring up instead.
    live: Option<(Option<Label>, Arc<LiveRing>)>,
}

/// A histogram over [`ENVOY_BUCKETS`] made of atomics. The sum is kept in
/// thousandths of the unit (µs for milliseconds, 1/1000 byte for bytes) so
/// it can be a plain integer add.
#[derive(Debug, Default)]
struct AtomicHistogram {
    /// Non-cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; ENVOY_BUCKETS.len() + 1],
    sum_milli: AtomicU64,
}

/// Encodes one [`RequestTable`] at scrape time.
#[derive(Debug)]
pub(super) struct RequestCollector(pub Arc<RequestTable>);

// === impl RequestTable ===

impl RequestTable {
    pub fn new(names: Names) -> Self {
        RequestTable {
            names,
            series: RwLock::default(),
        }
    }

    /// Counts one request; `live` also feeds the status view.
    pub fn record(&self, r: &RequestRecord, live: Option<&LiveTable>) {
        let hash = hash_record(r);
        {
            let map = self.series.read().unwrap_or_else(|e| e.into_inner());
            if let Some(series) = map
                .get(&hash)
                .and_then(|bucket| bucket.iter().find(|s| s.key.matches(r)))
            {
                series.observe(r, live);
                return;
            }
        }
        self.insert(hash, r, live).observe(r, live);
    }

    #[cold]
    fn insert(&self, hash: u64, r: &RequestRecord, live: Option<&LiveTable>) -> Arc<RequestSeries> {
        let mut map = self.series.write().unwrap_or_else(|e| e.into_inner());
        let bucket = map.entry(hash).or_default();
        // Another thread may have inserted it between our two locks.
        if let Some(series) = bucket.iter().find(|s| s.key.matches(r)) {
            return series.clone();
        }
        let series = Arc::new(RequestSeries {
            key: SeriesKey::from(r),
            requests: AtomicU64::new(0),
            duration: AtomicHistogram::default(),
            request_bytes: AtomicHistogram::default(),
            response_bytes: AtomicHistogram::default(),
            live: live.map(|l| {
                (
                    r.subset.clone(),
                    l.ring(&r.destination_service, r.subset.as_deref()),
                )
            }),
        });
        bucket.push(series.clone());
        series
    }

    /// Every series, ordered by service, workloads and response (for a
    /// readable exposition; ties in any order).
    fn snapshot(&self) -> Vec<Arc<RequestSeries>> {
        let map = self.series.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Arc<RequestSeries>> = map.values().flatten().cloned().collect();
        drop(map);
        all.sort_by(|a, b| a.key.sort_key().cmp(&b.key.sort_key()));
        all
    }
}

fn duration_ms(r: &RequestRecord) -> f64 {
    r.duration.as_secs_f64() * 1000.0
}

/// Hashes the fields that usually tell series apart; the others are
/// compared on lookup (a shared hash only lengthens a bucket).
fn hash_record(r: &RequestRecord) -> u64 {
    let mut h = FxHasher::default();
    r.response_code.hash(&mut h);
    r.response_flags.hash(&mut h);
    r.destination_service.hash(&mut h);
    r.destination.workload.hash(&mut h);
    r.destination.version.hash(&mut h);
    r.source.workload.hash(&mut h);
    h.finish()
}

/// The multiply-rotate hash of rustc's `FxHasher`: several times faster
/// than SipHash on short strings. Label values come from config and
/// response codes, not from what a client sends, and a collision only
/// costs a compare, so hash flooding is no concern.
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(tail));
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

// === impl SeriesKey ===

impl SeriesKey {
    fn matches(&self, r: &RequestRecord) -> bool {
        self.response_code == r.response_code
            && self.protocol == r.protocol
            && self.destination == r.destination
            && self.destination_service == r.destination_service
            && self.response_flags == r.response_flags
            && self.source == r.source
            && self.grpc_status == r.grpc_status
            && self.destination_service_name == r.destination_service_name
            && self.destination_service_namespace == r.destination_service_namespace
    }

    fn sort_key(&self) -> (&str, &str, &str, &str, u16, &str, &str) {
        (
            &self.destination_service,
            &self.destination.workload,
            &self.destination.version,
            &self.source.workload,
            self.response_code,
            &self.response_flags,
            self.grpc_status.as_deref().unwrap_or(""),
        )
    }
}

impl From<&RequestRecord> for SeriesKey {
    fn from(r: &RequestRecord) -> Self {
        SeriesKey {
            source: r.source.clone(),
            destination: r.destination.clone(),
            destination_service: r.destination_service.clone(),
            destination_service_name: r.destination_service_name.clone(),
            destination_service_namespace: r.destination_service_namespace.clone(),
            protocol: r.protocol,
            response_code: r.response_code,
            grpc_status: r.grpc_status.clone(),
            response_flags: r.response_flags.clone(),
        }
    }
}

impl EncodeLabelSet for SeriesKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let code = self.response_code.to_string();
        super::peer_labels(
            &self.source,
            &self.destination,
            &self.destination_service,
            &self.destination_service_name,
            &self.destination_service_namespace,
        )
        .encode(encoder)?;
        [
            ("request_protocol", self.protocol),
            ("response_code", code.as_str()),
            // Empty for non-gRPC, as Istio leaves it.
            (
                "grpc_response_status",
                self.grpc_status.as_deref().unwrap_or(""),
            ),
            ("response_flags", &*self.response_flags),
            ("connection_security_policy", "unknown"),
        ]
        .encode(encoder)
    }
}

// === impl RequestSeries ===

impl RequestSeries {
    fn observe(&self, r: &RequestRecord, live: Option<&LiveTable>) {
        self.requests.fetch_add(1, Relaxed);
        let ms = duration_ms(r);
        let micros = u64::try_from(r.duration.as_micros()).unwrap_or(u64::MAX);
        self.duration.observe(ms, micros);
        self.request_bytes
            .observe(r.request_bytes as f64, r.request_bytes.saturating_mul(1000));
        self.response_bytes.observe(
            r.response_bytes as f64,
            r.response_bytes.saturating_mul(1000),
        );
        let Some(live) = live else { return };
        match &self.live {
            Some((subset, ring)) if *subset == r.subset => {
                ring.record(live.now(), r.response_code, ms)
            }
            _ => live
                .ring(&r.destination_service, r.subset.as_deref())
                .record(live.now(), r.response_code, ms),
        }
    }
}

// === impl AtomicHistogram ===

impl AtomicHistogram {
    /// `value` picks the bucket (`le` is inclusive); `milli` is the same
    /// value in thousandths, added to the sum.
    fn observe(&self, value: f64, milli: u64) {
        let i = ENVOY_BUCKETS.partition_point(|le| *le < value);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_milli.fetch_add(milli, Relaxed);
    }

    /// `(sum, count, buckets)` as prometheus-client encodes them. The count
    /// is the buckets' total, so `_count` always equals `le="+Inf"`.
    fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = ENVOY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(le, n)| (le, n.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_milli.load(Relaxed) as f64 / 1000.0;
        (sum, count, buckets)
    }
}

// === impl RequestCollector ===

impl Collector for RequestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = &self.0;
        let names = &table.names;
        let series = table.snapshot();
        {
            let (name, help) = names.requests;
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &series {
                family
                    .encode_family(&s.key)?
                    .encode_counter::<NoLabelSet, u64, u64>(&s.requests.load(Relaxed), None)?;
            }
        }
        type Pick = fn(&RequestSeries) -> &AtomicHistogram;
        let histograms: [(Option<(&str, &str)>, Pick); 3] = [
            (Some(names.duration), |s| &s.duration),
            (names.request_bytes, |s| &s.request_bytes),
            (names.response_bytes, |s| &s.response_bytes),
        ];
        for (family_name, pick) in histograms {
            let Some((name, help)) = family_name else {
                continue;
            };
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for s in &series {
                let (sum, count, buckets) = pick(s).read();
                family
                    .encode_family(&s.key)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}
