//! Mirroring (`mirror`/`mirrorPercentage`, `mirrors[]`): a fire-and-forget
//! copy of the request (method, path, headers, body) to another
//! destination, its Host/`:authority` suffixed (`-shadow` by default), its
//! response discarded. The copy runs in its own task: it never delays or
//! fails the primary. At most `max_mirrors_in_flight` copies run at once;
//! beyond that (or when the body was too large to keep) the copy is
//! dropped and reported.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Version};
use http_body_util::BodyExt;

use super::body::{Replay, header_bytes};
use super::policy::split_host_port;
use super::proxy::{Flags, is_grpc, upstream_uri};
use super::table::Mirror;
use super::upstream::Key;
use super::{ConnCtx, Shim};
use crate::observe::{RequestRecord, ShimEvent, Workload};

/// Gives a mirror's slot back when its task ends, however it ends.
struct Slot(Arc<Shim>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.mirrors_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `host-shadow[:port]`.
pub(crate) fn shadow_authority(authority: &str, suffix: &str) -> String {
    match split_host_port(authority) {
        (host, Some(port)) => format!("{host}{suffix}:{port}"),
        (host, None) => format!("{host}{suffix}"),
    }
}

impl Shim {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn spawn_mirror(
        self: &Arc<Self>,
        m: &Mirror,
        parts: &Parts,
        authority: &str,
        replay: Option<Arc<Replay>>,
        conn: &ConnCtx,
        hash: Option<u32>,
        timeout: Option<Duration>,
    ) {
        let dropped = || {
            self.observer.on_event(&ShimEvent::MirrorDropped {
                destination_service: m.cluster.host.to_string(),
            });
        };
        let in_flight = self.mirrors_in_flight.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(self.clone());
        if in_flight >= self.options.max_mirrors_in_flight {
            drop(slot);
            dropped();
            return;
        }
        let Some(replay) = replay else {
            drop(slot);
            dropped();
            return;
        };
        let h2 = parts.version == Version::HTTP_2;
        let authority = match &self.options.mirror_host_suffix {
            Some(suffix) => shadow_authority(authority, suffix),
            None => authority.to_string(),
        };
        let mut headers = parts.headers.clone();
        if let Ok(v) = HeaderValue::from_str(&authority) {
            headers.insert(header::HOST, v);
        }
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = upstream_uri(h2, &authority, pq) else {
            drop(slot);
            dropped();
            return;
        };
        let method = parts.method.clone();
        let version = parts.version;
        let cluster = m.cluster.clone();
        let netns = conn.info.netns;
        let source = conn.source.clone();
        let grpc = is_grpc(&headers);
        let limit = timeout.unwrap_or(self.options.mirror_timeout);
        let shim = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let start = Instant::now();
            let work = async {
                // Waits for the client's body (kept by the primary's tee);
                // a body over the limit is not mirrored.
                let Some(body) = replay.wait().await else {
                    shim.observer.on_event(&ShimEvent::MirrorDropped {
                        destination_service: cluster.host.to_string(),
                    });
                    return None;
                };
                let ep = cluster.pick(hash, &[], shim.now_ms());
                let Some(ep) = ep else {
                    return Some((503, Flags::UH, Workload::unknown(), 0, 0));
                };
                let mut req = Request::new(body);
                *req.method_mut() = method;
                *req.uri_mut() = uri;
                *req.version_mut() = version;
                let req_bytes = header_bytes(&headers);
                *req.headers_mut() = headers;
                let key = Key {
                    netns,
                    addr: ep.addr,
                    h2,
                };
                let workload = ep.workload.clone();
                match shim
                    .pool
                    .send(
                        &*shim.connector,
                        key,
                        cluster.limits,
                        &mut Some(req),
                        &mut None,
                    )
                    .await
                {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        // Drained, so the connection can be reused.
                        let n = match resp.into_body().collect().await {
                            Ok(b) => b.to_bytes().len() as u64,
                            Err(_) => 0,
                        };
                        Some((status, Flags::default(), workload, req_bytes, n))
                    }
                    Err(super::upstream::SendError::Connect(_)) => {
                        Some((503, Flags::UF, workload, req_bytes, 0))
                    }
                    Err(_) => Some((503, Flags::UC, workload, req_bytes, 0)),
                }
            };
            let outcome = match tokio::time::timeout(limit, work).await {
                Ok(Some(o)) => o,
                Ok(None) => return,
                Err(_) => (504, Flags::UT, Workload::unknown(), 0, 0),
            };
            let (code, flags, destination, request_bytes, response_bytes) = outcome;
            shim.observer.on_request(&RequestRecord {
                source,
                destination,
                destination_service: cluster.host.clone(),
                destination_service_name: cluster.service_name.clone(),
                destination_service_namespace: cluster.service_namespace.clone(),
                subset: cluster.subset.clone(),
                protocol: if grpc { "grpc" } else { "http" },
                response_code: code,
                grpc_status: None,
                response_flags: flags.render(),
                duration: start.elapsed(),
                request_bytes,
                response_bytes,
                mirrored: true,
                attempts: 1,
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::shadow_authority;

    #[test]
    fn shadow_host_keeps_the_port() {
        assert_eq!(
            shadow_authority("checkout-service:8080", "-shadow"),
            "checkout-service-shadow:8080"
        );
        assert_eq!(shadow_authority("checkout", "-shadow"), "checkout-shadow");
        assert_eq!(
            shadow_authority("[fd00::1]:80", "-shadow"),
            "[fd00::1]-shadow:80"
        );
    }
}
