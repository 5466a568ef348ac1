//! Choosing where a request goes: the subset (weighted random per request,
//! or the canary extension: the session hash against fixed-order
//! cumulative bands, the kernel's scheme), then the endpoint inside it
//! (Maglev on the hash, else Istio's LEAST_REQUEST / ROUND_ROBIN / RANDOM),
//! skipping endpoints that outlier detection ejected.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use canary_common::MAGLEV_SIZE;
use canary_common::hash::{fmix32, maglev_slot, source_hash, subset_point};
use http::HeaderMap;
use http::header::{COOKIE, HeaderName};

use super::matcher::query_param;
use crate::config::duration;
use crate::config::istio::{HashKey, Json, SimpleLb};
use crate::observe::{Label, Workload};

// === Hash policy ===

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum HashPolicy {
    Header(HeaderName),
    Cookie {
        name: String,
        path: Option<String>,
        /// `Some`: issue the cookie when absent (`0`: a session cookie).
        ttl: Option<Duration>,
    },
    Query(String),
    SourceIp,
}

/// A cookie the response must set (Envoy's generated hash cookie).
pub(crate) struct NewCookie(pub String);

impl HashPolicy {
    pub fn from_istio(k: HashKey<'_>) -> Option<HashPolicy> {
        Some(match k {
            HashKey::SourceIp => HashPolicy::SourceIp,
            HashKey::HttpHeaderName(h) => {
                HashPolicy::Header(HeaderName::from_bytes(h.as_bytes()).ok()?)
            }
            HashKey::HttpQueryParameterName(q) => HashPolicy::Query(q.to_string()),
            HashKey::HttpCookie(c) => HashPolicy::Cookie {
                name: c.name.clone()?,
                path: c.path.clone(),
                ttl: c.ttl.as_deref().and_then(duration::parse),
            },
        })
    }

    /// The request's hash; `None` when the key is missing (the simple
    /// policy applies then, as in Envoy). A missing cookie with a `ttl` is
    /// generated: the request hashes on the new value and the response
    /// sets it.
    pub fn hash(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        client: IpAddr,
    ) -> Option<(u32, Option<NewCookie>)> {
        match self {
            HashPolicy::Header(name) => {
                let v = headers.get(name)?;
                Some((hash_bytes(v.as_bytes()), None))
            }
            HashPolicy::Query(key) => Some((hash_bytes(query_param(query, key)?.as_bytes()), None)),
            HashPolicy::SourceIp => Some((ip_hash(client), None)),
            HashPolicy::Cookie { name, path, ttl } => {
                if let Some(v) = cookie(headers, name) {
                    return Some((hash_bytes(v.as_bytes()), None));
                }
                let ttl = (*ttl)?;
                let value = format!("{:016x}", fastrand::u64(..));
                let mut set = format!("{name}=\"{value}\"");
                if !ttl.is_zero() {
                    set.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                }
                if let Some(p) = path {
                    set.push_str(&format!("; Path={p}"));
                }
                set.push_str("; HttpOnly");
                Some((hash_bytes(value.as_bytes()), Some(NewCookie(set))))
            }
        }
    }
}

/// The value of cookie `name` (quotes stripped, as Envoy does).
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// FNV-1a over the key, folded and mixed to 32 bits.
pub(crate) fn hash_bytes(b: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for c in b {
        h ^= u64::from(*c);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix32((h ^ (h >> 32)) as u32)
}

/// The kernel's source hash of an address (`canary_common::hash`), so the
/// shim and the kernel put a client in the same band.
pub(crate) fn ip_hash(ip: IpAddr) -> u32 {
    let words = match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    };
    source_hash(&words)
}

// === Subset choice ===

/// Picks a destination index from `weights`. With `point` (a hash on
/// [0, 10000)), the first destination whose cumulative band contains it
/// (fixed order, so a weight change only moves the band that changed);
/// else Envoy's weighted random. `None` if every weight is 0.
pub(crate) fn pick_weighted(weights: &[u32], bands: &[u32], point: Option<u32>) -> Option<usize> {
    if let Some(p) = point {
        return bands.iter().position(|b| p < *b);
    }
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(0..total);
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from(*w);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

pub(crate) fn point_of(hash: u32) -> u32 {
    subset_point(hash)
}

// === Endpoints and outlier detection ===

/// `outlierDetection` of a destination (istio-semantics §2.4).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OutlierConfig {
    /// 0: off.
    pub consecutive_5xx: u32,
    /// 0: off (the default).
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl OutlierConfig {
    /// Reads the Istio section; bad fields are reported in `bad`.
    pub fn from_istio(j: &Json, bad: &mut Vec<String>) -> Option<OutlierConfig> {
        let obj = j.as_object()?;
        let uint = |k: &str, default: u32, bad: &mut Vec<String>| match obj.get(k) {
            None => default,
            // UInt32Value: a number, or {value: n}.
            Some(v) => match v
                .as_u64()
                .or_else(|| v.get("value").and_then(|x| x.as_u64()))
            {
                Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
                None => {
                    bad.push(format!("outlierDetection.{k}: {v} is not a count"));
                    default
                }
            },
        };
        let dur = |k: &str, default: Duration, bad: &mut Vec<String>| match obj.get(k) {
            None => default,
            Some(v) => match v.as_str().and_then(duration::parse) {
                Some(d) if !d.is_zero() => d,
                _ => {
                    bad.push(format!("outlierDetection.{k}: {v} is not a duration"));
                    default
                }
            },
        };
        // The deprecated `consecutiveErrors` meant gateway errors.
        let legacy = uint("consecutiveErrors", 0, bad);
        let gateway = uint("consecutiveGatewayErrors", legacy, bad);
        let c5 = uint("consecutive5xxErrors", 5, bad);
        let _interval = dur("interval", Duration::from_secs(10), bad);
        Some(OutlierConfig {
            consecutive_5xx: c5,
            // "No effect if ≥ consecutive5xxErrors" (when that is on).
            consecutive_gateway: if c5 > 0 && gateway >= c5 { 0 } else { gateway },
            base_ejection: dur("baseEjectionTime", Duration::from_secs(30), bad),
            max_ejection_percent: uint("maxEjectionPercent", 10, bad).min(100),
        })
    }
}

/// Health of one endpoint; survives config updates (keyed by host,
/// subset and address).
#[derive(Debug, Default)]
pub(crate) struct Health {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since the shim's epoch; 0: not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    /// Requests in flight (LEAST_REQUEST).
    active: AtomicU32,
}

impl Health {
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    pub fn start(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) struct Endpoint {
    pub addr: SocketAddr,
    /// Pod name (the Maglev identity, as the dataplane names endpoints).
    pub pod: String,
    pub workload: Workload,
    pub health: Arc<Health>,
}

/// One destination (service host, subset, port) for one address family.
pub(crate) struct Cluster {
    pub host: Label,
    pub subset: Option<Label>,
    pub port: u16,
    pub service_name: Label,
    pub service_namespace: Label,
    pub endpoints: Vec<Endpoint>,
    /// The subset's consistent hash, when its policy has one.
    pub hash: Option<HashPolicy>,
    /// Maglev table over `endpoints` when `hash` is set.
    pub maglev: Vec<u16>,
    pub lb: SimpleLb,
    pub outlier: Option<OutlierConfig>,
    /// Connect and idle timeouts of its upstream connections.
    pub limits: super::upstream::Limits,
    rr: AtomicUsize,
}

/// The outcome of one attempt, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// A 5xx, a reset or a connect failure; `gateway`: 502/503/504 (and
    /// local-origin failures, which Envoy reports as those).
    Error {
        gateway: bool,
    },
}

impl Cluster {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: String,
        subset: Option<String>,
        port: u16,
        service_name: String,
        service_namespace: String,
        endpoints: Vec<Endpoint>,
        hash: Option<HashPolicy>,
        lb: SimpleLb,
        outlier: Option<OutlierConfig>,
        limits: super::upstream::Limits,
    ) -> Cluster {
        let maglev = if hash.is_some() && !endpoints.is_empty() {
            // The dataplane's endpoint names, so a source-IP hash picks the
            // same pod in the shim as in the kernel.
            let names: Vec<String> = endpoints
                .iter()
                .map(|e| format!("{}/{}", e.pod, e.addr))
                .collect();
            crate::dataplane::maglev::build(&names)
        } else {
            Vec::new()
        };
        Cluster {
            host: host.into(),
            subset: subset.map(Into::into),
            port,
            service_name: service_name.into(),
            service_namespace: service_namespace.into(),
            endpoints,
            hash,
            maglev,
            lb,
            outlier,
            limits,
            rr: AtomicUsize::new(fastrand::usize(..)),
        }
    }

    /// Picks an endpoint: never an ejected one; not one in `tried` when
    /// another is available. `hash` is used when this subset hashes.
    pub fn pick(&self, hash: Option<u32>, tried: &[SocketAddr], now_ms: u64) -> Option<&Endpoint> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let fresh = |e: &Endpoint| !e.health.is_ejected(now_ms) && !tried.contains(&e.addr);
        let healthy = |e: &Endpoint| !e.health.is_ejected(now_ms);
        if let (Some(h), false) = (hash, self.maglev.is_empty()) {
            let start = maglev_slot(h) as usize;
            // Walk the table from the key's slot: the first usable
            // endpoint (the key's own one unless ejected or tried).
            for ok in [&fresh as &dyn Fn(&Endpoint) -> bool, &healthy] {
                for i in 0..MAGLEV_SIZE as usize {
                    let e = &self.endpoints[self.maglev[(start + i) % self.maglev.len()] as usize];
                    if ok(e) {
                        return Some(e);
                    }
                    if i > 64 {
                        break;
                    }
                }
            }
        }
        let start = match self.lb {
            SimpleLb::RoundRobin => self.rr.fetch_add(1, Ordering::Relaxed) % n,
            _ => fastrand::usize(0..n),
        };
        let scan = |from: usize, ok: &dyn Fn(&Endpoint) -> bool| {
            (0..n)
                .map(|i| &self.endpoints[(from + i) % n])
                .find(|e| ok(e))
        };
        let first = scan(start, &fresh).or_else(|| scan(start, &healthy))?;
        if matches!(
            self.lb,
            SimpleLb::LeastRequest | SimpleLb::LeastConn | SimpleLb::Unspecified
        ) && n > 1
        {
            // Power of two choices, Envoy's LEAST_REQUEST.
            if let Some(second) = scan(fastrand::usize(0..n), &fresh)
                && second.health.active.load(Ordering::Relaxed)
                    < first.health.active.load(Ordering::Relaxed)
            {
                return Some(second);
            }
        }
        Some(first)
    }

    /// Records an attempt's outcome; returns true when it ejected `ep`.
    pub fn report(&self, ep: &Endpoint, outcome: Outcome, now_ms: u64) -> bool {
        let Some(cfg) = &self.outlier else {
            return false;
        };
        let h = &ep.health;
        match outcome {
            Outcome::Success => {
                h.consecutive_5xx.store(0, Ordering::Relaxed);
                h.consecutive_gateway.store(0, Ordering::Relaxed);
                false
            }
            Outcome::Error { gateway } => {
                let c5 = h.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
                let gw = if gateway {
                    h.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
                } else {
                    h.consecutive_gateway.store(0, Ordering::Relaxed);
                    0
                };
                let trip = (cfg.consecutive_5xx > 0 && c5 >= cfg.consecutive_5xx)
                    || (cfg.consecutive_gateway > 0 && gw >= cfg.consecutive_gateway);
                trip && self.eject(cfg, ep, now_ms)
            }
        }
    }

    fn eject(&self, cfg: &OutlierConfig, ep: &Endpoint, now_ms: u64) -> bool {
        let h = &ep.health;
        if h.is_ejected(now_ms) {
            return false;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.health.is_ejected(now_ms))
            .count();
        // maxEjectionPercent, but Envoy always ejects at least one host.
        let allowed =
            (ejected + 1) * 100 <= self.endpoints.len() * cfg.max_ejection_percent as usize;
        if ejected > 0 && !allowed {
            return false;
        }
        let times = h.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        // baseEjectionTime × ejections, at most Envoy's 300 s cap (or the
        // base itself when that is longer).
        let ms = (cfg.base_ejection.as_millis() as u64 * u64::from(times))
            .min((cfg.base_ejection.as_millis() as u64).max(300_000));
        h.ejected_until.store(now_ms + ms.max(1), Ordering::Relaxed);
        h.consecutive_5xx.store(0, Ordering::Relaxed);
        h.consecutive_gateway.store(0, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u8) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, i], 8080)),
            pod: format!("pod-{i}"),
            workload: Workload::unknown(),
            health: Arc::default(),
        }
    }

    fn cluster(n: u8, hash: Option<HashPolicy>, outlier: Option<OutlierConfig>) -> Cluster {
        Cluster::new(
            "checkout".into(),
            Some("v1".into()),
            8080,
            "checkout".into(),
            "prod".into(),
            (1..=n).map(ep).collect(),
            hash,
            SimpleLb::LeastRequest,
            outlier,
            crate::shim::upstream::Limits {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(60),
            },
        )
    }

    #[test]
    fn bands_keep_a_point_on_its_subset() {
        let bands = crate::compile::bands(&[95, 5]);
        assert_eq!(pick_weighted(&[95, 5], &bands, Some(9499)), Some(0));
        assert_eq!(pick_weighted(&[95, 5], &bands, Some(9500)), Some(1));
        assert_eq!(
            pick_weighted(&[0, 0], &crate::compile::bands(&[0, 0]), None),
            None
        );
        assert_eq!(pick_weighted(&[0, 7], &[0, 10000], None), Some(1));
    }

    #[test]
    fn maglev_is_sticky_and_retries_move_elsewhere() {
        let c = cluster(3, Some(HashPolicy::SourceIp), None);
        let h = hash_bytes(b"session-1");
        let a = c.pick(Some(h), &[], 0).expect("endpoint").addr;
        for _ in 0..10 {
            assert_eq!(c.pick(Some(h), &[], 0).expect("endpoint").addr, a);
        }
        assert_ne!(c.pick(Some(h), &[a], 0).expect("endpoint").addr, a);
    }

    #[test]
    fn ejection_respects_max_percent_but_ejects_one() {
        let cfg = OutlierConfig {
            consecutive_5xx: 2,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
        };
        let c = cluster(3, None, Some(cfg));
        let err = Outcome::Error { gateway: true };
        assert!(!c.report(&c.endpoints[0], err, 0));
        assert!(c.report(&c.endpoints[0], err, 0), "second 5xx ejects");
        assert!(c.endpoints[0].health.is_ejected(1000));
        // 10% of 3 endpoints: no second ejection.
        c.report(&c.endpoints[1], err, 0);
        assert!(!c.report(&c.endpoints[1], err, 0));
        for _ in 0..50 {
            assert_ne!(
                c.pick(None, &[], 1000).expect("one").addr,
                c.endpoints[0].addr
            );
        }
        // Back after baseEjectionTime.
        assert!(!c.endpoints[0].health.is_ejected(30_001));
    }

    #[test]
    fn hash_keys() {
        let mut h = HeaderMap::new();
        h.insert("session-id", "abc".parse().expect("value"));
        h.insert(COOKIE, "a=1; user=\"u-7\"".parse().expect("value"));
        let ip = IpAddr::from([10, 0, 0, 1]);
        let header = HashPolicy::Header(HeaderName::from_static("session-id"));
        assert_eq!(
            header.hash(&h, None, ip).map(|x| x.0),
            Some(hash_bytes(b"abc"))
        );
        let cookie = HashPolicy::Cookie {
            name: "user".into(),
            path: None,
            ttl: None,
        };
        assert_eq!(
            cookie.hash(&h, None, ip).map(|x| x.0),
            Some(hash_bytes(b"u-7"))
        );
        let missing = HashPolicy::Cookie {
            name: "sid".into(),
            path: Some("/".into()),
            ttl: Some(Duration::from_secs(3600)),
        };
        let (_, set) = missing.hash(&h, None, ip).expect("generated");
        let set = set.expect("cookie").0;
        assert!(
            set.starts_with("sid=\"") && set.ends_with("; Max-Age=3600; Path=/; HttpOnly"),
            "{set}"
        );
        let query = HashPolicy::Query("uid".into());
        assert!(query.hash(&h, Some("uid=9"), ip).is_some());
        assert!(query.hash(&h, None, ip).is_none());
        // Same bands as the kernel's source hash.
        assert_eq!(
            ip_hash(ip),
            source_hash(&[u32::from_be_bytes([10, 0, 0, 1]).to_be(), 0, 0, 0])
        );
    }
}
