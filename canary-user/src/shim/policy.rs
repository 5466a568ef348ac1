//! A route's HTTP policy, compiled from the Istio fields once per config:
//! retries (Envoy's `retryOn` conditions and back-off), fault injection,
//! header operations, rewrites, redirects and direct responses.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use regex::Regex;

use crate::config::duration;
use crate::config::istio::{
    HeaderOperations, Headers, HttpDirectResponse, HttpFaultInjection, HttpRedirect, HttpRetry,
    HttpRewrite, Percent,
};

// === Retries ===

/// Envoy `retry_on` conditions as bits.
pub(crate) mod on {
    pub const FIVE_XX: u32 = 1;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const RESET: u32 = 1 << 2;
    pub const RESET_BEFORE_REQUEST: u32 = 1 << 3;
    pub const CONNECT_FAILURE: u32 = 1 << 4;
    pub const RETRIABLE_4XX: u32 = 1 << 5;
    pub const REFUSED_STREAM: u32 = 1 << 6;
    pub const RETRIABLE_STATUS_CODES: u32 = 1 << 7;
    pub const GRPC_CANCELLED: u32 = 1 << 8;
    pub const GRPC_DEADLINE_EXCEEDED: u32 = 1 << 9;
    pub const GRPC_INTERNAL: u32 = 1 << 10;
    pub const GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 11;
    pub const GRPC_UNAVAILABLE: u32 = 1 << 12;
    pub const GRPC: u32 = GRPC_CANCELLED
        | GRPC_DEADLINE_EXCEEDED
        | GRPC_INTERNAL
        | GRPC_RESOURCE_EXHAUSTED
        | GRPC_UNAVAILABLE;
    /// Conditions a failure without a response (reset, timeout) meets.
    pub const NO_RESPONSE: u32 = FIVE_XX | GATEWAY_ERROR | RESET;
}

/// Istio's default retry condition list (retry.go, Istio ≥ 1.24: 503 is no
/// longer retried by default).
pub(crate) const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

/// Envoy's default back-off base interval; the maximum is 10× the base.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(25);

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RetryPolicy {
    /// Retries after the first attempt; 0: none.
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: u32,
    /// `retriable-status-codes` (numeric `retryOn` tokens).
    pub codes: Vec<u16>,
    pub backoff_base: Duration,
    /// `retryIgnorePreviousHosts` (default true): a retry avoids the
    /// endpoints already tried when another one is available.
    pub other_host: bool,
}

impl RetryPolicy {
    pub fn none() -> Self {
        Self {
            retries: 0,
            per_try_timeout: None,
            on: 0,
            codes: Vec::new(),
            backoff_base: BACKOFF_BASE,
            other_host: true,
        }
    }

    /// Istio's policy when a route has no `retries`: 2 retries on
    /// connect-failure, refused-stream, unavailable, cancelled and
    /// retriable-status-codes (with no codes).
    pub fn istio_default() -> Self {
        let (on, codes) = parse_retry_on(DEFAULT_RETRY_ON);
        Self {
            retries: 2,
            on,
            codes,
            ..Self::none()
        }
    }

    /// Istio's `ConvertPolicy`: absent → the default policy; `attempts`
    /// absent or 0 → no retries; otherwise the default with the fields the
    /// route sets (numeric `retryOn` tokens imply retriable-status-codes).
    pub fn from_istio(r: Option<&HttpRetry>) -> Self {
        let Some(r) = r else {
            return Self::istio_default();
        };
        let attempts = r.attempts.unwrap_or(0);
        if attempts <= 0 {
            return Self::none();
        }
        let mut p = Self::istio_default();
        p.retries = u32::try_from(attempts).unwrap_or(u32::MAX);
        if let Some(on) = r.retry_on.as_deref().filter(|s| !s.is_empty()) {
            (p.on, p.codes) = parse_retry_on(on);
        }
        p.per_try_timeout = r
            .per_try_timeout
            .as_deref()
            .and_then(duration::parse)
            .filter(|d| !d.is_zero());
        if let Some(b) = r
            .backoff
            .as_deref()
            .and_then(duration::parse)
            .filter(|d| !d.is_zero())
        {
            p.backoff_base = b;
        }
        if let Some(ignore) = r.retry_ignore_previous_hosts {
            p.other_host = ignore;
        }
        p
    }

    /// Whether a response with `status` (and gRPC status `grpc`, from the
    /// headers of a trailers-only response) is retried.
    pub fn retries_response(&self, status: u16, grpc: Option<u32>) -> bool {
        let on = self.on;
        if on & on::FIVE_XX != 0 && (500..600).contains(&status) {
            return true;
        }
        if on & on::GATEWAY_ERROR != 0 && matches!(status, 502..=504) {
            return true;
        }
        if on & on::RETRIABLE_4XX != 0 && status == 409 {
            return true;
        }
        if on & on::RETRIABLE_STATUS_CODES != 0 && self.codes.contains(&status) {
            return true;
        }
        if on & on::GRPC != 0
            && let Some(g) = grpc
        {
            let bit = match g {
                1 => on::GRPC_CANCELLED,
                4 => on::GRPC_DEADLINE_EXCEEDED,
                8 => on::GRPC_RESOURCE_EXHAUSTED,
                13 => on::GRPC_INTERNAL,
                14 => on::GRPC_UNAVAILABLE,
                _ => 0,
            };
            return on & bit != 0;
        }
        false
    }

    /// Whether anything after the request was sent can trigger a retry
    /// (so the request must be kept for a second attempt).
    pub fn may_retry_after_send(&self, grpc: bool, h2: bool) -> bool {
        if self.retries == 0 {
            return false;
        }
        let mut after = on::NO_RESPONSE | on::RETRIABLE_4XX;
        if !self.codes.is_empty() {
            after |= on::RETRIABLE_STATUS_CODES;
        }
        if grpc {
            after |= on::GRPC;
        }
        if h2 {
            after |= on::REFUSED_STREAM;
        }
        self.on & after != 0
    }

    /// Envoy's jittered exponential back-off before retry `n` (1-based):
    /// uniform in [0, base × (2ⁿ − 1)), at most 10 × base.
    pub fn backoff(&self, n: u32) -> Duration {
        let base = self.backoff_base.as_millis().max(1) as u64;
        let mult = (1u64 << n.min(16)) - 1;
        let ms = fastrand::u64(0..(base * mult).max(1)).min(base * 10);
        Duration::from_millis(ms)
    }
}

/// Parses a validated `retryOn` list into condition bits and status codes.
/// Conditions canary has no use for (`retriable-headers`,
/// `envoy-ratelimited`, `http3-post-connect-failure`) are ignored.
pub(crate) fn parse_retry_on(s: &str) -> (u32, Vec<u16>) {
    let mut bits = 0;
    let mut codes = Vec::new();
    for token in s.split(',').map(str::trim) {
        bits |= match token {
            "5xx" => on::FIVE_XX,
            "gateway-error" => on::GATEWAY_ERROR,
            "reset" => on::RESET,
            "reset-before-request" => on::RESET_BEFORE_REQUEST,
            "connect-failure" => on::CONNECT_FAILURE,
            "retriable-4xx" => on::RETRIABLE_4XX,
            "refused-stream" => on::REFUSED_STREAM,
            "retriable-status-codes" => on::RETRIABLE_STATUS_CODES,
            "cancelled" => on::GRPC_CANCELLED,
            "deadline-exceeded" => on::GRPC_DEADLINE_EXCEEDED,
            "internal" => on::GRPC_INTERNAL,
            "resource-exhausted" => on::GRPC_RESOURCE_EXHAUSTED,
            "unavailable" => on::GRPC_UNAVAILABLE,
            other => match other.parse::<u16>() {
                Ok(code) => {
                    codes.push(code);
                    on::RETRIABLE_STATUS_CODES
                }
                Err(_) => 0,
            },
        };
    }
    (bits, codes)
}

/// A `timeout`/`perTryTimeout` string; zero means none.
pub(crate) fn timeout(s: Option<&str>) -> Option<Duration> {
    s.and_then(duration::parse).filter(|d| !d.is_zero())
}

// === Sampling ===

/// A percentage as a fraction of 1 000 000 (Envoy's MILLION denominator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fraction(pub u32);

impl Fraction {
    pub const ALL: Fraction = Fraction(1_000_000);

    pub fn of_percent(p: f64) -> Fraction {
        Fraction((p.clamp(0.0, 100.0) * 10_000.0).round() as u32)
    }

    /// `percentage: {value}`, or the deprecated integer, or `absent`.
    pub fn from_istio(p: Option<&Percent>, deprecated: Option<i64>, absent: Fraction) -> Fraction {
        match (p.and_then(|p| p.value), deprecated) {
            (Some(v), _) => Fraction::of_percent(v),
            (None, Some(v)) => Fraction::of_percent(v as f64),
            (None, None) => absent,
        }
    }

    pub fn sample(self) -> bool {
        match self.0 {
            0 => false,
            n if n >= 1_000_000 => true,
            n => fastrand::u32(0..1_000_000) < n,
        }
    }
}

// === Fault injection ===

#[derive(Clone, Debug)]
pub(crate) struct Fault {
    pub delay: Option<(Duration, Fraction)>,
    pub abort: Option<(Abort, Fraction)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Abort {
    Http(StatusCode),
    /// A gRPC status code: a trailers-only gRPC response.
    Grpc(u32),
}

impl Fault {
    /// Istio leaves a delay or abort without a percentage off.
    pub fn from_istio(f: &HttpFaultInjection) -> Fault {
        let delay = f.delay.as_ref().and_then(|d| {
            let fixed = timeout(d.fixed_delay.as_deref())?;
            let p = Fraction::from_istio(d.percentage.as_ref(), d.percent, Fraction(0));
            Some((fixed, p))
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let kind = match (&a.http_status, &a.grpc_status) {
                (Some(s), _) => Abort::Http(
                    u16::try_from(*s)
                        .ok()
                        .and_then(|s| StatusCode::from_u16(s).ok())?,
                ),
                (None, Some(g)) => Abort::Grpc(grpc_code(g)?),
                (None, None) => return None,
            };
            Some((
                kind,
                Fraction::from_istio(a.percentage.as_ref(), None, Fraction(0)),
            ))
        });
        Fault { delay, abort }
    }
}

/// The numeric code of a gRPC status name.
pub(crate) fn grpc_code(name: &str) -> Option<u32> {
    crate::config::istio::GRPC_STATUS_NAMES
        .iter()
        .position(|n| *n == name)
        .map(|i| i as u32)
}

// === Header operations ===

/// `headers.request` or `headers.response` of one level (route or
/// destination): remove, then set (overwrite), then add (append), as
/// Envoy applies them.
#[derive(Clone, Debug, Default)]
pub(crate) struct HeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// `set`/`add` of `:authority` or `host`: a host rewrite.
    pub authority: Option<HeaderValue>,
}

impl HeaderOps {
    /// Compiles one side; names it cannot use go to `bad`.
    pub fn from_istio(ops: Option<&HeaderOperations>, bad: &mut Vec<String>) -> HeaderOps {
        let mut out = HeaderOps::default();
        let Some(ops) = ops else {
            return out;
        };
        let authority =
            |n: &str| n.eq_ignore_ascii_case(":authority") || n.eq_ignore_ascii_case("host");
        for name in &ops.remove {
            // Pseudo-headers and Host cannot be removed (Istio drops them).
            if name.starts_with(':') || authority(name) {
                continue;
            }
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(n) => out.remove.push(n),
                Err(_) => bad.push(name.clone()),
            }
        }
        for (list, map) in [(&mut out.set, &ops.set), (&mut out.add, &ops.add)] {
            for (name, value) in map {
                let Ok(v) = HeaderValue::from_str(value) else {
                    bad.push(format!("{name}: {value}"));
                    continue;
                };
                if authority(name) {
                    out.authority = Some(v);
                    continue;
                }
                if name.starts_with(':') {
                    continue;
                }
                match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(n) => list.push((n, v)),
                    Err(_) => bad.push(name.clone()),
                }
            }
        }
        out
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

/// Request and response operations of one level.
#[derive(Clone, Debug, Default)]
pub(crate) struct HeaderPolicy {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

impl HeaderPolicy {
    pub fn from_istio(h: Option<&Headers>, bad: &mut Vec<String>) -> HeaderPolicy {
        HeaderPolicy {
            request: HeaderOps::from_istio(h.and_then(|h| h.request.as_ref()), bad),
            response: HeaderOps::from_istio(h.and_then(|h| h.response.as_ref()), bad),
        }
    }
}

// === Rewrite, redirect, direct response ===

#[derive(Clone, Debug)]
pub(crate) enum UriRewrite {
    /// `rewrite.uri`: replaces the matched prefix (the whole path when the
    /// route matched an exact or regex URI).
    Prefix(String),
    /// `uriRegexRewrite`: every match replaced, `\1` groups as in RE2.
    Regex(Regex, String),
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Rewrite {
    pub uri: Option<UriRewrite>,
    pub authority: Option<HeaderValue>,
}

impl Rewrite {
    pub fn from_istio(r: &HttpRewrite) -> Rewrite {
        let uri = match (&r.uri, &r.uri_regex_rewrite) {
            (Some(u), _) => Some(UriRewrite::Prefix(u.clone())),
            (None, Some(rr)) => rr.match_.as_deref().and_then(|m| {
                let re = Regex::new(m).ok()?;
                Some(UriRewrite::Regex(
                    re,
                    re2_template(rr.rewrite.as_deref().unwrap_or_default()),
                ))
            }),
            (None, None) => None,
        };
        Rewrite {
            uri,
            authority: r
                .authority
                .as_deref()
                .and_then(|a| HeaderValue::from_str(a).ok()),
        }
    }
}

/// RE2's `\1` substitution groups in the regex crate's `${1}` form.
fn re2_template(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Clone, Debug)]
pub(crate) struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: Option<u16>,
    /// `derivePort: FROM_PROTOCOL_DEFAULT` drops the port.
    pub protocol_default_port: bool,
    pub code: StatusCode,
}

impl Redirect {
    pub fn from_istio(r: &HttpRedirect) -> Redirect {
        Redirect {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            scheme: r.scheme.clone(),
            port: r.port.and_then(|p| u16::try_from(p).ok()),
            protocol_default_port: r.derive_port.as_deref() == Some("FROM_PROTOCOL_DEFAULT"),
            code: r
                .redirect_code
                .and_then(|c| u16::try_from(c).ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::MOVED_PERMANENTLY),
        }
    }

    /// The `Location` for a request to `authority` (host[:port]) with
    /// `path_and_query`.
    pub fn location(&self, authority: &str, path_and_query: &str) -> String {
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let (req_host, req_port) = split_host_port(authority);
        let host = match &self.authority {
            Some(a) => split_host_port(a).0,
            None => req_host,
        };
        let port = match (self.port, self.protocol_default_port) {
            (Some(p), _) => Some(p.to_string()),
            (None, true) => None,
            (None, false) if self.authority.is_some() => self
                .authority
                .as_deref()
                .and_then(|a| split_host_port(a).1)
                .map(str::to_string),
            (None, false) => req_port.map(str::to_string),
        };
        let path = match &self.uri {
            Some(u) => match path_and_query.split_once('?') {
                Some((_, q)) if !u.contains('?') => format!("{u}?{q}"),
                _ => u.clone(),
            },
            None => path_and_query.to_string(),
        };
        match port {
            Some(p) => format!("{scheme}://{host}:{p}{path}"),
            None => format!("{scheme}://{host}{path}"),
        }
    }
}

/// `host:port` → (`host`, `Some(port)`), IPv6 literals kept in brackets.
pub(crate) fn split_host_port(a: &str) -> (&str, Option<&str>) {
    if let Some(end) = a.rfind(']') {
        return match a[end + 1..].strip_prefix(':') {
            Some(p) => (&a[..=end], Some(p)),
            None => (a, None),
        };
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (a, None),
    }
}

#[derive(Clone, Debug)]
pub(crate) struct DirectResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

impl DirectResponse {
    pub fn from_istio(d: &HttpDirectResponse) -> DirectResponse {
        let status = d
            .status
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK);
        let body = d
            .body
            .as_ref()
            .map(|b| match (&b.string, &b.bytes) {
                (Some(s), _) => Bytes::from(s.clone()),
                (None, Some(b64)) => Bytes::from(base64_decode(b64)),
                (None, None) => Bytes::new(),
            })
            .unwrap_or_default();
        DirectResponse { status, body }
    }
}

/// Standard base64 (padding optional); invalid characters are skipped.
fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policy_follows_istio_convert_policy() {
        let default = RetryPolicy::from_istio(None);
        assert_eq!(default.retries, 2);
        assert!(default.on & on::CONNECT_FAILURE != 0);
        assert!(
            !default.retries_response(503, None),
            "503 is not retried by default"
        );
        assert!(
            default.retries_response(200, Some(14)),
            "gRPC unavailable is"
        );
        assert!(!default.may_retry_after_send(false, false));
        assert!(default.may_retry_after_send(true, true));

        let off = RetryPolicy::from_istio(Some(&HttpRetry {
            attempts: Some(0),
            ..Default::default()
        }));
        assert_eq!(off.retries, 0);

        let codes = RetryPolicy::from_istio(Some(&HttpRetry {
            attempts: Some(3),
            per_try_timeout: Some("2s".into()),
            retry_on: Some("connect-failure,503".into()),
            ..Default::default()
        }));
        assert_eq!(codes.retries, 3);
        assert_eq!(codes.per_try_timeout, Some(Duration::from_secs(2)));
        assert!(codes.retries_response(503, None));
        assert!(!codes.retries_response(500, None));
        // A retryOn without gRPC conditions does not retry gRPC statuses.
        assert!(!codes.retries_response(200, Some(14)));
        let five = RetryPolicy::from_istio(Some(&HttpRetry {
            attempts: Some(1),
            retry_on: Some("5xx".into()),
            ..Default::default()
        }));
        assert!(five.retries_response(500, None));
        assert!(five.may_retry_after_send(false, false));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = RetryPolicy::istio_default();
        for n in 1..10 {
            for _ in 0..100 {
                let b = p.backoff(n);
                assert!(b <= Duration::from_millis(250), "{b:?}");
                assert!(
                    b < Duration::from_millis(25 * ((1 << n) - 1)).max(Duration::from_millis(1))
                );
            }
        }
    }

    #[test]
    fn redirect_locations() {
        let r = Redirect {
            uri: Some("/v2/login".into()),
            authority: None,
            scheme: None,
            port: None,
            protocol_default_port: false,
            code: StatusCode::MOVED_PERMANENTLY,
        };
        assert_eq!(
            r.location("checkout:8080", "/login?next=1"),
            "http://checkout:8080/v2/login?next=1"
        );
        let r = Redirect {
            uri: None,
            authority: Some("new.example.com".into()),
            scheme: Some("https".into()),
            port: None,
            protocol_default_port: true,
            code: StatusCode::FOUND,
        };
        assert_eq!(
            r.location("checkout:8080", "/a"),
            "https://new.example.com/a"
        );
        assert_eq!(split_host_port("[fd00::1]:80"), ("[fd00::1]", Some("80")));
    }

    #[test]
    fn templates_and_base64() {
        assert_eq!(re2_template(r"/v2/\1/x$"), "/v2/${1}/x$$");
        assert_eq!(base64_decode("aGVsbG8="), b"hello");
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(Fraction::of_percent(10.0), Fraction(100_000));
        assert!(!Fraction(0).sample());
        assert!(Fraction::ALL.sample());
    }
}
