//! canary extensions carried in annotations, so that the YAML stays valid
//! for Istio (which ignores annotations it does not know).
//!
//! `canary.io/destination-policy` on a VirtualService sets `timeout` and
//! `retries` per weighted destination, which Istio cannot express
//! (istio/istio#6681: both live on the route, not on the destination):
//!
//! ```yaml
//! metadata:
//!   annotations:
//!     canary.io/destination-policy: |
//!       - route: public-traffic-split   # http route name; absent: every route
//!         subset: v2                    # and/or host:
//!         timeout: 2s
//!         retries: {attempts: 1, perTryTimeout: 1s, retryOn: 5xx}
//!       - route: public-traffic-split
//!         subset: v1
//!         timeout: 10s
//!         retries: {attempts: 3, perTryTimeout: 3s, retryOn: 5xx}
//! ```
//!
//! When the shim picks a destination that an entry names, the entry's
//! `timeout` replaces the route's, and its `retries` replace the route's
//! (each field on its own: an entry without `retries` keeps the route's).
//! Retries stay inside the chosen destination, as Istio's do.

use serde::{Deserialize, Serialize};

use super::istio::HttpRetry;

/// The annotation key.
pub const DESTINATION_POLICY: &str = "canary.io/destination-policy";

/// `canary.io/split` on a VirtualService: `per-connection` (the default: an
/// http route that only splits by weight is served in the kernel, once per
/// connection) or `per-request` (send it through the shim for Istio's
/// per-request split).
pub const SPLIT: &str = "canary.io/split";

/// One entry of the `canary.io/destination-policy` list.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct DestinationPolicy {
    /// The `name` of the http route it applies to; `None`: every route.
    pub route: Option<String>,
    /// The destination host (resolved to an FQDN by validation); `None`:
    /// any host.
    pub host: Option<String>,
    /// The destination subset; `None`: any subset of `host`.
    pub subset: Option<String>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
}

impl DestinationPolicy {
    /// Whether the entry applies to destination (`host`, `subset`) of the
    /// route named `route`.
    pub fn applies(&self, route: Option<&str>, host: &str, subset: Option<&str>) -> bool {
        self.route.as_deref().is_none_or(|r| Some(r) == route)
            && self.host.as_deref().is_none_or(|h| h == host)
            && self.subset.as_deref().is_none_or(|s| Some(s) == subset)
    }
}
