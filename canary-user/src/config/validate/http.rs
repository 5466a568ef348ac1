//! The HTTP parts of a VirtualService rule: request matches, regexes,
//! header edits, timeouts, retries, faults, redirects, direct responses,
//! rewrites. Checks follow Istio's validation (istio-semantics §1.3,
//! §1.6-1.10).

use super::kube::port_number;
use super::unknown_fields;
use crate::config::duration;
use crate::config::error::{Diagnostics, Origin};
use crate::config::host;
use crate::config::istio::{
    HeaderOperations, Headers, HttpDirectResponse, HttpFaultInjection, HttpMatchRequest,
    HttpRedirect, HttpRetry, HttpRewrite, Percent, StringMatch,
};

const MATCH_FIELDS: &[&str] = &[
    "name",
    "uri",
    "scheme",
    "method",
    "authority",
    "headers",
    "port",
    "sourceLabels",
    "gateways",
    "queryParams",
    "ignoreUriCase",
    "withoutHeaders",
    "sourceNamespace",
    "statPrefix",
];

/// Envoy retry conditions Istio accepts (agentval.go), besides status codes.
const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Status codes Go's `net/http.StatusText` knows (what Istio accepts in
/// `retryOn`).
const KNOWN_STATUS: &[u16] = &[
    100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304,
    305, 307, 308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415,
    416, 417, 418, 421, 422, 423, 424, 425, 426, 428, 429, 431, 451, 500, 501, 502, 503, 504, 505,
    506, 507, 508, 510, 511,
];

use crate::config::istio::GRPC_STATUS_NAMES as GRPC_STATUS;

pub(super) fn match_request(at: &Origin, f: &str, m: &HttpMatchRequest, diags: &mut Diagnostics) {
    unknown_fields(diags, at, f, &m.extra, MATCH_FIELDS);
    for (name, sm, empty_prefix_ok) in [
        ("uri", &m.uri, true),
        ("scheme", &m.scheme, false),
        ("method", &m.method, false),
        ("authority", &m.authority, false),
    ] {
        if let Some(sm) = sm {
            string_match(at, &format!("{f}.{name}"), sm, empty_prefix_ok, diags);
        }
    }
    for (section, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, sm) in map {
            let hf = format!("{f}.{section}.{name}");
            header_name(at, &hf, name, false, diags);
            string_match(at, &hf, sm, false, diags);
        }
    }
    for (name, sm) in &m.query_params {
        string_match(at, &format!("{f}.queryParams.{name}"), sm, false, diags);
    }
    if m.port.is_some() {
        port_number(m.port, &format!("{f}.port"), at, diags);
    }
    if let Some(ns) = &m.source_namespace
        && !host::is_dns1123_label(ns)
    {
        diags.error(
            at,
            &format!("{f}.sourceNamespace"),
            format!("{ns:?} is not a namespace name"),
            "a DNS-1123 label",
        );
    }
}

fn string_match(
    at: &Origin,
    f: &str,
    sm: &StringMatch,
    empty_prefix_ok: bool,
    diags: &mut Diagnostics,
) {
    unknown_fields(diags, at, f, &sm.extra, &["exact", "prefix", "regex"]);
    let set = [&sm.exact, &sm.prefix, &sm.regex]
        .iter()
        .filter(|x| x.is_some())
        .count();
    if set > 1 {
        diags.error(
            at,
            f,
            "more than one of exact, prefix and regex",
            "exactly one of exact, prefix or regex",
        );
    }
    if sm.prefix.as_deref() == Some("") && !empty_prefix_ok {
        diags.error(
            at,
            &format!("{f}.prefix"),
            "empty prefix",
            "a non-empty prefix",
        );
    }
    if let Some(re) = &sm.regex {
        regex(at, &format!("{f}.regex"), re, diags);
    }
}

/// Istio's rules for a match regex: non-empty, at most 1024 characters,
/// RE2 syntax; it must match the whole value.
fn regex(at: &Origin, f: &str, re: &str, diags: &mut Diagnostics) {
    const VALID: &str = "an RE2 regular expression, matched against the whole value";
    if re.is_empty() {
        diags.error(at, f, "empty regex", VALID);
    } else if re.len() > 1024 {
        diags.error(
            at,
            f,
            format!("regex is {} characters long", re.len()),
            "at most 1024 characters",
        );
    } else if let Err(e) = regex::Regex::new(re) {
        // The regex crate's message spans several lines (with a caret
        // diagram); its last line says what is wrong.
        let text = e.to_string();
        let reason = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("invalid")
            .trim()
            .trim_start_matches("error: ")
            .to_string();
        diags.error(
            at,
            f,
            format!("regex {re:?} does not compile: {reason}"),
            VALID,
        );
    }
}

fn header_name(at: &Origin, f: &str, name: &str, pseudo_ok: bool, diags: &mut Diagnostics) {
    let body = if pseudo_ok {
        name.strip_prefix(':').unwrap_or(name)
    } else {
        name
    };
    if name.starts_with('@') {
        diags.error(
            at,
            f,
            format!("{name:?}: JWT claim matching is not supported by canary"),
            "an HTTP header name",
        );
    } else if body.is_empty()
        || !body
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        diags.error(
            at,
            f,
            format!("{name:?} is not a valid header name"),
            "letters, digits, '-' and '_'",
        );
    }
}

pub(super) fn headers(at: &Origin, f: &str, h: &Headers, diags: &mut Diagnostics) {
    for (side, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(HeaderOperations { set, add, remove }) = ops else {
            continue;
        };
        for name in set.keys() {
            header_name(at, &format!("{f}.{side}.set.{name}"), name, true, diags);
        }
        for name in add.keys() {
            header_name(at, &format!("{f}.{side}.add.{name}"), name, true, diags);
        }
        for (i, name) in remove.iter().enumerate() {
            header_name(at, &format!("{f}.{side}.remove[{i}]"), name, true, diags);
        }
    }
}

pub(super) fn percentage(at: &Origin, f: &str, p: &Option<Percent>, diags: &mut Diagnostics) {
    if let Some(v) = p.as_ref().and_then(|p| p.value)
        && !(v.is_finite() && (0.0..=100.0).contains(&v))
    {
        diags.error(
            at,
            &format!("{f}.value"),
            format!("{v} is out of range"),
            "a percentage from 0 to 100",
        );
    }
}

/// A duration in whole milliseconds, at least 1ms (or 0 where `zero_ok`).
pub(super) fn duration_field(
    at: &Origin,
    f: &str,
    s: &str,
    zero_ok: bool,
    diags: &mut Diagnostics,
) {
    match duration::parse(s) {
        None => diags.error(
            at,
            f,
            format!("{s:?} is not a duration"),
            "a duration such as 2s, 1.5s or 500ms",
        ),
        Some(d) if d.is_zero() && !zero_ok => diags.error(at, f, "zero duration", "at least 1ms"),
        Some(d) if d.subsec_nanos() % 1_000_000 != 0 => diags.error(
            at,
            f,
            format!("{s} is not a whole number of milliseconds"),
            "a duration in whole milliseconds, at least 1ms",
        ),
        Some(_) => {}
    }
}

pub(super) fn retry(at: &Origin, f: &str, r: &HttpRetry, diags: &mut Diagnostics) {
    if let Some(n) = r.attempts
        && n < 0
    {
        diags.error(
            at,
            &format!("{f}.attempts"),
            format!("{n} is negative"),
            "an integer >= 0 (0 disables retries)",
        );
    }
    if let Some(t) = &r.per_try_timeout {
        duration_field(at, &format!("{f}.perTryTimeout"), t, false, diags);
    }
    if let Some(t) = &r.backoff {
        duration_field(at, &format!("{f}.backoff"), t, false, diags);
    }
    if let Some(on) = &r.retry_on {
        // Istio splits on ',' without trimming: "5xx, reset" is rejected.
        for token in on.split(',') {
            let status_ok = token
                .parse::<u16>()
                .is_ok_and(|c| KNOWN_STATUS.contains(&c));
            if !status_ok && !RETRY_ON.contains(&token) {
                diags.error(
                    at,
                    &format!("{f}.retryOn"),
                    format!("{token:?} is not a retry condition"),
                    format!(
                        "a comma-separated list without spaces of {} or HTTP status codes",
                        RETRY_ON.join(", ")
                    ),
                );
            }
        }
    }
    if r.attempts == Some(0)
        && (r.per_try_timeout.is_some()
            || r.retry_on.is_some()
            || r.retry_remote_localities.is_some())
    {
        diags.error(
            at,
            &format!("{f}.attempts"),
            "attempts is 0 (no retries) but perTryTimeout, retryOn or retryRemoteLocalities is set",
            "attempts > 0, or no other retry fields",
        );
    }
}

pub(super) fn fault_injection(
    at: &Origin,
    f: &str,
    fault: &HttpFaultInjection,
    diags: &mut Diagnostics,
) {
    if fault.delay.is_none() && fault.abort.is_none() {
        diags.error(
            at,
            f,
            "neither delay nor abort",
            "a delay, an abort, or both",
        );
    }
    if let Some(delay) = &fault.delay {
        let df = format!("{f}.delay");
        if delay.exponential_delay.is_some() {
            diags.error(
                at,
                &format!("{df}.exponentialDelay"),
                "exponentialDelay is not supported (Istio rejects it too)",
                "fixedDelay",
            );
        }
        match &delay.fixed_delay {
            Some(d) => duration_field(at, &format!("{df}.fixedDelay"), d, false, diags),
            None if delay.exponential_delay.is_none() => diags.error(
                at,
                &format!("{df}.fixedDelay"),
                "missing",
                "a duration such as 5s",
            ),
            None => {}
        }
        percentage(at, &format!("{df}.percentage"), &delay.percentage, diags);
        if let Some(p) = delay.percent
            && !(0..=100).contains(&p)
        {
            diags.error(
                at,
                &format!("{df}.percent"),
                format!("{p} is out of range"),
                "a percentage from 0 to 100",
            );
        }
    }
    if let Some(abort) = &fault.abort {
        let af = format!("{f}.abort");
        if abort.http2_error.is_some() {
            diags.error(
                at,
                &format!("{af}.http2Error"),
                "http2Error is not supported (Istio rejects it too)",
                "httpStatus or grpcStatus",
            );
        }
        match (abort.http_status, &abort.grpc_status) {
            (None, None) if abort.http2_error.is_none() => diags.error(
                at,
                &af,
                "neither httpStatus nor grpcStatus",
                "httpStatus (200-599) or grpcStatus",
            ),
            (Some(_), Some(_)) => diags.error(
                at,
                &af,
                "httpStatus and grpcStatus are both set",
                "one of httpStatus or grpcStatus",
            ),
            (Some(s), None) if !(200..=599).contains(&s) => diags.error(
                at,
                &format!("{af}.httpStatus"),
                format!("{s} is not an HTTP status"),
                "a status code from 200 to 599",
            ),
            (None, Some(g)) if !GRPC_STATUS.contains(&g.as_str()) => diags.error(
                at,
                &format!("{af}.grpcStatus"),
                format!("{g:?} is not a gRPC status"),
                GRPC_STATUS.join(", "),
            ),
            _ => {}
        }
        percentage(at, &format!("{af}.percentage"), &abort.percentage, diags);
    }
}

pub(super) fn http_redirect(at: &Origin, f: &str, r: &HttpRedirect, diags: &mut Diagnostics) {
    if let Some(code) = r.redirect_code
        && ![301, 302, 303, 307, 308].contains(&code)
    {
        diags.error(
            at,
            &format!("{f}.redirectCode"),
            format!("{code} is not a redirect code"),
            "301, 302, 303, 307 or 308",
        );
    }
    if let Some(s) = &r.scheme
        && s != "http"
        && s != "https"
    {
        diags.error(
            at,
            &format!("{f}.scheme"),
            format!("unknown scheme {s:?}"),
            "http or https",
        );
    }
    if r.port.is_some() {
        port_number(r.port, &format!("{f}.port"), at, diags);
        if r.derive_port.is_some() {
            diags.error(
                at,
                f,
                "port and derivePort are both set",
                "one of port or derivePort",
            );
        }
    }
    if let Some(d) = &r.derive_port
        && d != "FROM_PROTOCOL_DEFAULT"
        && d != "FROM_REQUEST_PORT"
    {
        diags.error(
            at,
            &format!("{f}.derivePort"),
            format!("unknown value {d:?}"),
            "FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT",
        );
    }
}

pub(super) fn direct_response(
    at: &Origin,
    f: &str,
    r: &HttpDirectResponse,
    diags: &mut Diagnostics,
) {
    match r.status {
        None => diags.error(
            at,
            &format!("{f}.status"),
            "missing",
            "a status code from 200 to 599",
        ),
        Some(s) if !(200..=599).contains(&s) => diags.error(
            at,
            &format!("{f}.status"),
            format!("{s} is not an HTTP status"),
            "a status code from 200 to 599",
        ),
        Some(_) => {}
    }
    if let Some(body) = &r.body {
        if body.string.is_some() && body.bytes.is_some() {
            diags.error(
                at,
                &format!("{f}.body"),
                "string and bytes are both set",
                "one of string or bytes",
            );
        }
        let len = body
            .string
            .as_ref()
            .or(body.bytes.as_ref())
            .map_or(0, String::len);
        if len > 1024 * 1024 {
            diags.error(
                at,
                &format!("{f}.body"),
                format!("body is {len} bytes"),
                "at most 1 MiB",
            );
        } else if len > 100 * 1024 {
            diags.warn(
                at,
                &format!("{f}.body"),
                format!("body is {len} bytes (over 100 KiB)"),
            );
        }
    }
}

pub(super) fn rewrite(at: &Origin, f: &str, r: &HttpRewrite, diags: &mut Diagnostics) {
    if r.uri.is_some() && r.uri_regex_rewrite.is_some() {
        diags.error(
            at,
            f,
            "uri and uriRegexRewrite are both set",
            "one of uri or uriRegexRewrite",
        );
    }
    if let Some(rr) = &r.uri_regex_rewrite {
        match &rr.match_ {
            Some(re) => regex(at, &format!("{f}.uriRegexRewrite.match"), re, diags),
            None => diags.error(
                at,
                &format!("{f}.uriRegexRewrite.match"),
                "missing",
                "an RE2 regular expression",
            ),
        }
        if rr.rewrite.is_none() {
            diags.error(
                at,
                &format!("{f}.uriRegexRewrite.rewrite"),
                "missing",
                "a replacement such as /v2/\\1",
            );
        }
    }
}
