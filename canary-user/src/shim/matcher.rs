//! Istio `HTTPMatchRequest`s, compiled once per config and evaluated per
//! request without allocating (istio-semantics §1.3): AND inside a block,
//! OR across blocks; regexes are RE2-style full matches.

use http::header::HeaderName;
use http::{HeaderMap, Method};
use regex::Regex;

use super::SourcePod;
use crate::config::istio::{HttpMatchRequest, StringMatch};

#[derive(Clone, Debug)]
pub(crate) enum StrMatch {
    Exact(String),
    Prefix(String),
    /// Anchored (`^(?:re)$`): Envoy's `safe_regex` matches the whole value.
    Regex(Regex),
    /// `{}`: the header or parameter is present.
    Present,
}

impl StrMatch {
    pub fn from_istio(m: &StringMatch) -> Option<StrMatch> {
        Some(match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), _, _) => StrMatch::Exact(e.clone()),
            (None, Some(p), _) => StrMatch::Prefix(p.clone()),
            // Istio turns `regex: "*"` into a presence check.
            (None, None, Some(r)) if r == "*" => StrMatch::Present,
            (None, None, Some(r)) => StrMatch::Regex(Regex::new(&format!("^(?:{r})$")).ok()?),
            (None, None, None) => StrMatch::Present,
        })
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
            StrMatch::Present => true,
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => v
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            other => other.matches(v),
        }
    }

    /// The length of the prefix a `rewrite.uri` replaces: the matched
    /// prefix, or the whole path for exact and regex matches.
    pub fn rewritten_len(&self, path: &str) -> usize {
        match self {
            StrMatch::Prefix(p) => p.len().min(path.len()),
            StrMatch::Present => 0,
            _ => path.len(),
        }
    }
}

/// What a match block looks at in one request.
pub(crate) struct RequestView<'a> {
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    pub source: Option<&'a SourcePod>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Match {
    pub uri: Option<StrMatch>,
    pub ignore_uri_case: bool,
    scheme: Option<StrMatch>,
    method: Option<StrMatch>,
    authority: Option<StrMatch>,
    headers: Vec<(HeaderName, StrMatch)>,
    without_headers: Vec<(HeaderName, StrMatch)>,
    query: Vec<(String, StrMatch)>,
    source_labels: Vec<(String, String)>,
    source_namespace: Option<String>,
}

impl Match {
    /// `None` when a part cannot be compiled (validation rejects that).
    pub fn from_istio(m: &HttpMatchRequest) -> Option<Match> {
        let sm = |x: &Option<StringMatch>| match x {
            Some(s) => StrMatch::from_istio(s).map(Some),
            None => Some(None),
        };
        let headers = |map: &std::collections::BTreeMap<String, StringMatch>| {
            map.iter()
                // Istio ignores these keys in `headers` (API L786-L807).
                .filter(|(k, _)| !matches!(k.as_str(), "uri" | "scheme" | "method" | "authority"))
                .map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        StrMatch::from_istio(v)?,
                    ))
                })
                .collect::<Option<Vec<_>>>()
        };
        Some(Match {
            uri: sm(&m.uri)?,
            ignore_uri_case: m.ignore_uri_case == Some(true),
            scheme: sm(&m.scheme)?,
            method: sm(&m.method)?,
            authority: sm(&m.authority)?,
            headers: headers(&m.headers)?,
            without_headers: headers(&m.without_headers)?,
            query: m
                .query_params
                .iter()
                .map(|(k, v)| Some((k.clone(), StrMatch::from_istio(v)?)))
                .collect::<Option<Vec<_>>>()?,
            source_labels: m
                .source_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            source_namespace: m.source_namespace.clone(),
        })
    }

    /// This block's uri match, if it has one and it matches `path`.
    pub fn uri_match(&self, path: &str) -> Option<&StrMatch> {
        let u = self.uri.as_ref()?;
        let ok = if self.ignore_uri_case {
            u.matches_ignore_case(path)
        } else {
            u.matches(path)
        };
        ok.then_some(u)
    }

    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                u.matches_ignore_case(r.path)
            } else {
                u.matches(r.path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(s) = &self.scheme
            && !s.matches("http")
        {
            return false;
        }
        if let Some(m) = &self.method
            && !m.matches(r.method.as_str())
        {
            return false;
        }
        if let Some(a) = &self.authority
            && !a.matches(r.authority)
        {
            return false;
        }
        for (name, m) in &self.headers {
            match header_value(r.headers, name) {
                Some(v) if m.matches(v.as_ref()) => {}
                _ => return false,
            }
        }
        // Envoy: `invert_match`, and a missing header counts as empty for
        // value matchers (`treat_missing_header_as_empty`), so a request
        // without the header matches `withoutHeaders: {x: {exact: a}}`.
        for (name, m) in &self.without_headers {
            let hit = match (header_value(r.headers, name), m) {
                (None, StrMatch::Present) => false,
                (None, m) => m.matches(""),
                (Some(v), m) => m.matches(v.as_ref()),
            };
            if hit {
                return false;
            }
        }
        for (key, m) in &self.query {
            match query_param(r.query, key) {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        if !self.source_labels.is_empty() || self.source_namespace.is_some() {
            let Some(pod) = r.source else {
                return false;
            };
            if self
                .source_labels
                .iter()
                .any(|(k, v)| pod.labels.get(k) != Some(v))
            {
                return false;
            }
            if let Some(ns) = &self.source_namespace
                && *ns != pod.namespace
            {
                return false;
            }
        }
        true
    }
}

/// A header's value for matching; several values are joined with `,` as
/// Envoy does (allocating only in that rare case).
pub(crate) fn header_value<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Option<std::borrow::Cow<'a, str>> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?.to_str().ok()?;
    match all.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first},{}", second.to_str().ok()?);
            for v in all {
                joined.push(',');
                joined.push_str(v.to_str().ok()?);
            }
            Some(std::borrow::Cow::Owned(joined))
        }
    }
}

/// The first value of query parameter `key` (`?key` gives `""`).
pub(crate) fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn m(yaml: &str) -> Match {
        let req: HttpMatchRequest = serde_yaml::from_str(yaml).expect("yaml");
        Match::from_istio(&req).expect("compiles")
    }

    fn view<'a>(
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
        source: Option<&'a SourcePod>,
    ) -> RequestView<'a> {
        RequestView {
            method: &Method::GET,
            path,
            query,
            authority: "checkout-service:8080",
            headers,
            source,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn headers_exact_prefix_regex_presence() {
        let empty = HeaderMap::new();
        let canary = headers(&[("x-canary-user", "true")]);
        let exact = m("headers: {x-canary-user: {exact: \"true\"}}");
        assert!(exact.matches(&view("/", None, &canary, None)));
        assert!(!exact.matches(&view("/", None, &empty, None)));
        // Regex is a full match: "tru" does not match "true".
        let re = m("headers: {x-canary-user: {regex: tru}}");
        assert!(!re.matches(&view("/", None, &canary, None)));
        let re = m("headers: {x-canary-user: {regex: \"t.*\"}}");
        assert!(re.matches(&view("/", None, &canary, None)));
        let present = m("headers: {x-canary-user: {}}");
        assert!(present.matches(&view("/", None, &canary, None)));
        assert!(!present.matches(&view("/", None, &empty, None)));
        let prefix = m("headers: {x-canary-user: {prefix: tr}}");
        assert!(prefix.matches(&view("/", None, &canary, None)));
    }

    #[test]
    fn without_headers_treats_missing_as_empty() {
        let empty = HeaderMap::new();
        let canary = headers(&[("x-canary-user", "true")]);
        let not_true = m("withoutHeaders: {x-canary-user: {exact: \"true\"}}");
        assert!(!not_true.matches(&view("/", None, &canary, None)));
        assert!(not_true.matches(&view("/", None, &empty, None)));
        let absent = m("withoutHeaders: {x-canary-user: {}}");
        assert!(absent.matches(&view("/", None, &empty, None)));
        assert!(!absent.matches(&view("/", None, &canary, None)));
        // A regex that matches "" excludes requests without the header.
        let any = m("withoutHeaders: {x-canary-user: {regex: \".*\"}}");
        assert!(!any.matches(&view("/", None, &empty, None)));
    }

    #[test]
    fn uri_query_and_source() {
        let h = HeaderMap::new();
        let uri = m("uri: {prefix: /API}\nignoreUriCase: true");
        assert!(uri.matches(&view("/api/cart", None, &h, None)));
        let exact = m("uri: {exact: /cart}");
        assert!(!exact.matches(&view("/cart/1", None, &h, None)));
        let re = m("uri: {regex: \"/cart/[0-9]+\"}");
        assert!(re.matches(&view("/cart/12", None, &h, None)));
        assert!(!re.matches(&view("/cart/12/x", None, &h, None)));
        let q = m("queryParams: {beta: {exact: \"1\"}, flag: {exact: \"\"}}");
        assert!(q.matches(&view("/", Some("a=2&beta=1&flag"), &h, None)));
        assert!(!q.matches(&view("/", Some("beta=1"), &h, None)));
        let src = m("sourceLabels: {app: qa-tools}");
        let pod = SourcePod {
            name: "qa-1".into(),
            namespace: "prod".into(),
            labels: BTreeMap::from([("app".to_string(), "qa-tools".to_string())]),
        };
        assert!(src.matches(&view("/", None, &h, Some(&pod))));
        assert!(!src.matches(&view("/", None, &h, None)));
        let method = m("method: {exact: POST}");
        assert!(!method.matches(&view("/", None, &h, None)));
        let authority = m("authority: {prefix: checkout}");
        assert!(authority.matches(&view("/", None, &h, None)));
    }
}
