//! Host names as Istio resolves them, and the Kubernetes name rules that
//! validation needs.

use std::fmt;

/// The cluster DNS domain. Istio's default; canary has no other.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// `name.namespace.svc.cluster.local`.
pub fn fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostError {
    Empty,
    Wildcard(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Empty => f.write_str("host is empty"),
            HostError::Wildcard(h) => {
                write!(f, "wildcard host {h:?} is not supported by canary")
            }
        }
    }
}

/// Resolves a VirtualService or DestinationRule host to a service FQDN.
///
/// Short names resolve in the namespace of the object that names them, not
/// of the service (istio-semantics §1.1): `foo` → `foo.<ns>.svc.cluster.local`,
/// `foo.bar` → `foo.bar.svc.cluster.local`, `foo.bar.svc` →
/// `foo.bar.svc.cluster.local`; anything longer is taken as an FQDN.
pub fn resolve(host: &str, namespace: &str) -> Result<String, HostError> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if host.contains('*') {
        return Err(HostError::Wildcard(host));
    }
    let labels: Vec<&str> = host.split('.').collect();
    Ok(match labels.as_slice() {
        [name] => fqdn(name, namespace),
        [name, ns] => fqdn(name, ns),
        [name, ns, "svc"] => fqdn(name, ns),
        _ => host,
    })
}

/// The service name of an in-cluster FQDN (`checkout.prod.svc.cluster.local`
/// → `checkout`); other hosts are returned whole.
pub fn short_name(host: &str) -> &str {
    if host.ends_with(&format!(".svc.{CLUSTER_DOMAIN}")) {
        host.split('.').next().unwrap_or(host)
    } else {
        host
    }
}

/// RFC 1123 label: lower-case alphanumerics and '-', starting and ending
/// with an alphanumeric, at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Kubernetes IANA_SVC_NAME (named ports): at most 15 characters, lower-case
/// alphanumerics and '-', at least one letter, no leading, trailing or
/// double '-'.
pub fn is_iana_svc_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_the_objects_namespace() {
        let r = |h| resolve(h, "prod").expect("resolves");
        assert_eq!(r("checkout"), "checkout.prod.svc.cluster.local");
        assert_eq!(r("checkout.staging"), "checkout.staging.svc.cluster.local");
        assert_eq!(
            r("checkout.staging.svc"),
            "checkout.staging.svc.cluster.local"
        );
        assert_eq!(
            r("checkout.staging.svc.cluster.local"),
            "checkout.staging.svc.cluster.local"
        );
        assert_eq!(
            r("Checkout.Prod.svc.cluster.local."),
            "checkout.prod.svc.cluster.local"
        );
        assert_eq!(r("api.example.com"), "api.example.com");
        assert_eq!(
            resolve("*.prod.svc.cluster.local", "prod"),
            Err(HostError::Wildcard("*.prod.svc.cluster.local".into()))
        );
        assert_eq!(resolve(" ", "prod"), Err(HostError::Empty));
        assert_eq!(short_name("checkout.prod.svc.cluster.local"), "checkout");
        assert_eq!(short_name("api.example.com"), "api.example.com");
    }

    #[test]
    fn name_rules() {
        assert!(is_dns1123_label("v1"));
        assert!(is_dns1123_label("canary-2"));
        assert!(!is_dns1123_label("V1"));
        assert!(!is_dns1123_label("v1_a"));
        assert!(!is_dns1123_label("-v1"));
        assert!(!is_dns1123_label(""));
        assert!(is_iana_svc_name("http"));
        assert!(is_iana_svc_name("http-alt"));
        assert!(!is_iana_svc_name("8080"));
        assert!(!is_iana_svc_name("http--alt"));
        assert!(!is_iana_svc_name("a-very-long-port-name"));
    }
}
