//! One request, from match to response, with Istio's semantics:
//! first-match routes (no match: 404 `NR`), redirect / direct response,
//! fault injection (`DI`, `FI`), the weighted or hashed subset, header
//! edits and rewrites, mirrors, then attempts with retries, per-try and
//! route timeouts (`UT`), connect failures (`UF`), exhausted retries
//! (`URX`) and empty subsets (503 `UH`).
//!
//! Where this differs from Envoy on purpose: the route `timeout` covers
//! the time to the response headers (a body that stalls afterwards is not
//! cut), and starts when the request headers arrive.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use tokio::time::Instant as TokioInstant;

use super::balance::{Outcome, pick_weighted, point_of};
use super::body::{Finish, ReqBody, RespBody, TeeBody, header_bytes};
use super::matcher::RequestView;
use super::policy::{Abort, UriRewrite, on};
use super::table::{Action, Dest, Forward, Route, ServiceRoutes};
use super::upstream::{Key, SendError};
use super::{ConnCtx, Shim};
use crate::observe::{RequestRecord, ShimEvent, Workload};

// === Response flags ===

#[derive(Clone, Copy, Default)]
pub(crate) struct Flags(u16);

impl Flags {
    pub const DI: Flags = Flags(1);
    pub const FI: Flags = Flags(1 << 1);
    pub const NR: Flags = Flags(1 << 2);
    pub const UH: Flags = Flags(1 << 3);
    pub const UF: Flags = Flags(1 << 4);
    pub const UT: Flags = Flags(1 << 5);
    pub const URX: Flags = Flags(1 << 6);
    pub const UC: Flags = Flags(1 << 7);
    pub const UR: Flags = Flags(1 << 8);
    const NAMES: [&'static str; 9] = ["DI", "FI", "NR", "UH", "UF", "UT", "URX", "UC", "UR"];

    pub fn set(&mut self, f: Flags) {
        self.0 |= f.0;
    }

    /// `-`, or the flags joined by `,` (allocated only for several).
    pub fn render(self) -> Cow<'static, str> {
        let mut set = Self::NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n);
        match (set.next(), set.clone().next()) {
            (None, _) => Cow::Borrowed("-"),
            (Some(one), None) => Cow::Borrowed(one),
            (Some(first), Some(_)) => Cow::Owned(
                std::iter::once(first)
                    .chain(set)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        }
    }
}

/// The response with the first frame of a small body taken (see
/// `RespBody::prefetch`), within the route's timeout as the wait for the
/// head was; past it, the body streams as it comes.
async fn prefetched(
    mut resp: Response<RespBody>,
    deadline: Option<TokioInstant>,
) -> Response<RespBody> {
    let prefetch = resp.body_mut().prefetch();
    match deadline {
        Some(at) => {
            let _ = tokio::time::timeout_at(at, prefetch).await;
        }
        None => prefetch.await,
    }
    resp
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), never forwarded.
/// Typed names: removing by `&str` re-parses the name on every call, and
/// this runs twice per request.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names present
    // rules that out, where a lookup per name would hash each one.
    if !h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        // Headers the Connection header names are hop-by-hop too. The
        // usual `keep-alive` and `close` name nothing more to remove (the
        // Keep-Alive header goes below), so they allocate nothing.
        let named: Vec<String> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| {
                !n.is_empty()
                    && !["close", "keep-alive", "te"]
                        .iter()
                        .any(|k| n.eq_ignore_ascii_case(k))
            })
            .map(str::to_string)
            .collect();
        for n in named {
            h.remove(n.as_str());
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

pub(crate) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn grpc_status_of(h: &HeaderMap) -> Option<u32> {
    h.get(&GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// Envoy's HTTP → gRPC status mapping for local replies.
fn grpc_for_http(s: StatusCode) -> u32 {
    match s.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// What a record says about where the request went.
struct Target<'a> {
    service: &'a ServiceRoutes,
    dest: Option<&'a Dest>,
    endpoint: Option<&'a Workload>,
}

/// The state of one request that the record needs at the end.
struct Req<'a> {
    conn: &'a ConnCtx,
    start: Instant,
    grpc: bool,
    request_bytes: u64,
    flags: Flags,
    attempts: u32,
}

/// A request matched to a forwarding route: everything `forward` needs.
pub(crate) struct Routed<'a> {
    r: Req<'a>,
    svc: &'a ServiceRoutes,
    route: &'a Route,
    f: &'a Forward,
    parts: Parts,
    authority: String,
}

/// What routing made of a request.
pub(crate) enum Decision<'a> {
    /// Answered by the shim itself (no route, redirect, direct response).
    Answered(Response<RespBody>),
    /// To be sent upstream by `Shim::forward`.
    Forward(Routed<'a>),
}

impl Shim {
    /// Answers one request; `body` is `None` for a request without one.
    /// hyper's server comes through here; the HTTP/1.1 loop calls `route`
    /// and `forward` itself (one future fewer to move per request).
    pub(crate) async fn handle(
        self: &Arc<Self>,
        parts: Parts,
        body: Option<Incoming>,
        conn: &ConnCtx,
    ) -> Response<RespBody> {
        // One atomic load; this request keeps these routes to its end.
        let table = self.routes();
        match self.route(&table, parts, conn) {
            Decision::Answered(resp) => resp,
            Decision::Forward(job) => self.forward(job, body).await,
        }
    }

    /// The route table requests are matched against now.
    pub(crate) fn routes(&self) -> Arc<super::table::Table> {
        self.table.load_full()
    }

    /// Matches a request against `table`'s routes (first match wins) and
    /// answers it if the shim itself must; this is where requests are
    /// counted (the idle checks read the counts).
    pub(crate) fn route<'a>(
        &self,
        table: &'a super::table::Table,
        parts: Parts,
        conn: &'a ConnCtx,
    ) -> Decision<'a> {
        let start = Instant::now();
        self.requests.fetch_add(1, Ordering::Relaxed);
        conn.requests.fetch_add(1, Ordering::Relaxed);
        let grpc = is_grpc(&parts.headers);
        let mut r = Req {
            conn,
            start,
            grpc,
            request_bytes: header_bytes(&parts.headers)
                + parts.uri.path_and_query().map_or(1, |p| p.as_str().len()) as u64
                + parts.method.as_str().len() as u64
                + 12,
            flags: Flags::default(),
            attempts: 0,
        };
        let Some(svc) = table.services.get(&conn.info.orig_dst) else {
            // Not a service of the current config (it just went away).
            r.flags.set(Flags::NR);
            return Decision::Answered(self.local_unrouted(&r, StatusCode::NOT_FOUND));
        };
        let authority = authority_of(&parts);
        let view = RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            authority: &authority,
            headers: &parts.headers,
            source: conn.info.source_pod.as_ref(),
        };
        let route = svc
            .routes
            .iter()
            .find(|rt| rt.matches.is_empty() || rt.matches.iter().any(|m| m.matches(&view)));
        let t = Target {
            service: svc,
            dest: None,
            endpoint: None,
        };
        let Some(route) = route else {
            r.flags.set(Flags::NR);
            return Decision::Answered(self.local(
                &r,
                &t,
                StatusCode::NOT_FOUND,
                None,
                Bytes::new(),
            ));
        };
        match &route.action {
            Action::Redirect(rd) => {
                let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let location = rd.location(&authority, pq);
                let loc = HeaderValue::from_str(&location).ok();
                Decision::Answered(self.local(
                    &r,
                    &t,
                    rd.code,
                    loc.map(|l| (header::LOCATION, l)),
                    Bytes::new(),
                ))
            }
            Action::Direct(d) => {
                Decision::Answered(self.local(&r, &t, d.status, None, d.body.clone()))
            }
            Action::Forward(f) => Decision::Forward(Routed {
                r,
                svc,
                route,
                f,
                parts,
                authority,
            }),
        }
    }

    /// Sends a routed request upstream (with its mirrors, retries and
    /// timeouts) and returns the response to give the client.
    pub(crate) async fn forward(
        self: &Arc<Self>,
        job: Routed<'_>,
        body: Option<Incoming>,
    ) -> Response<RespBody> {
        let Routed {
            mut r,
            svc,
            route,
            f,
            mut parts,
            mut authority,
        } = job;
        let conn = r.conn;
        let client_ip = conn.info.client_ip.unwrap_or(conn.info.peer.ip());
        let (hash, new_cookie) = match &f.hash {
            Some(p) => match p.hash(&parts.headers, parts.uri.query(), client_ip) {
                Some((h, c)) => (Some(h), c),
                None => (None, None),
            },
            None => (None, None),
        };
        let point = hash.filter(|_| self.options.sticky_subsets).map(point_of);
        let Some(i) = pick_weighted(&f.weights, &f.bands, point) else {
            r.flags.set(Flags::UH);
            let t = Target {
                service: svc,
                dest: None,
                endpoint: None,
            };
            return self.local(&r, &t, StatusCode::SERVICE_UNAVAILABLE, None, Bytes::new());
        };
        let dest = &f.dests[i];
        let cluster = &dest.cluster;
        tracing::trace!(route = ?route.name, host = %cluster.host, subset = ?cluster.subset, port = cluster.port, "routing");
        let t = Target {
            service: svc,
            dest: Some(dest),
            endpoint: None,
        };

        if let Some(fault) = &route.fault {
            if let Some((delay, p)) = fault.delay
                && p.sample()
            {
                r.flags.set(Flags::DI);
                tokio::time::sleep(delay).await;
            }
            if let Some((abort, p)) = fault.abort
                && p.sample()
            {
                r.flags.set(Flags::FI);
                return match abort {
                    Abort::Http(s) => self.local(&r, &t, s, None, Bytes::new()),
                    Abort::Grpc(code) => self.grpc_local(&r, &t, code),
                };
            }
        }

        // The upstream request head: header edits (destination, then
        // route), rewrites, then what the hop needs.
        let h2 = parts.version == Version::HTTP_2;
        dest.headers.request.apply(&mut parts.headers);
        route.headers.request.apply(&mut parts.headers);
        let new_authority = route
            .rewrite
            .as_ref()
            .and_then(|rw| rw.authority.clone())
            .or_else(|| route.headers.request.authority.clone())
            .or_else(|| dest.headers.request.authority.clone());
        if let Some(a) = new_authority
            && let Ok(s) = a.to_str()
        {
            authority = s.to_string();
        }
        let rewritten = route
            .rewrite
            .as_ref()
            .and_then(|rw| rw.uri.as_ref())
            .map(|u| rewrite_path(u, route, &parts));
        strip_hop_by_hop(&mut parts.headers);
        if !h2 {
            // HTTP/1 only carries `te` between the two ends of a hop.
            parts.headers.remove(header::TE);
        }
        let pq = rewritten
            .as_deref()
            .or_else(|| parts.uri.path_and_query().map(|p| p.as_str()))
            .unwrap_or("/");
        match upstream_uri(h2, &authority, pq) {
            Ok(u) => parts.uri = u,
            Err(_) => {
                let t = Target {
                    service: svc,
                    dest: Some(dest),
                    endpoint: None,
                };
                return self.local(&r, &t, StatusCode::BAD_REQUEST, None, Bytes::new());
            }
        }
        if (!h2 || parts.headers.contains_key(header::HOST))
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            parts.headers.insert(header::HOST, v);
        }

        let timeout = dest.timeout.unwrap_or(route.timeout);
        let retry = dest.retry.as_ref().unwrap_or(&route.retry);
        let deadline = timeout.map(|t| TokioInstant::from_std(r.start) + t);

        // Which mirrors this request feeds (sampled on their own, like
        // Envoy's per-policy runtime fraction).
        let mirrors: Vec<&super::table::Mirror> = route
            .mirrors
            .iter()
            .filter(|m| m.fraction.sample())
            .collect();
        let body = body.filter(|b| !b.is_end_stream());
        let body_empty = body.is_none();
        let keep_head = retry.may_retry_after_send(r.grpc, h2);
        let replay = (keep_head || !mirrors.is_empty()).then(|| {
            if body_empty {
                super::body::Replay::empty()
            } else {
                super::body::Replay::new(self.options.max_retry_body_bytes)
            }
        });
        let first_body = match (&replay, body) {
            (_, None) => ReqBody::Empty,
            (Some(rp), Some(body)) => ReqBody::Tee(TeeBody::new(body, rp.clone())),
            (None, Some(body)) => ReqBody::Stream(body),
        };
        for m in mirrors {
            self.spawn_mirror(m, &parts, &authority, replay.clone(), conn, hash, timeout);
        }
        // A retry sends the same head again. hyper's HTTP/2 client keeps
        // the request it sends, so that head is copied here; the shim's
        // own HTTP/1.1 client hands back the head it wrote (into `head`),
        // which saves a copy of every request's headers under Istio's
        // default retry policy.
        let mut head = (keep_head && h2).then(|| copy_head(&parts));
        let mut pending = Some(Request::from_parts(parts, first_body));

        let netns = conn.info.netns;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_fail: Option<(StatusCode, Flags)>;
        loop {
            r.attempts += 1;
            let Some(ep) = cluster.pick(hash, &tried, self.now_ms()) else {
                if r.attempts == 1 {
                    r.flags.set(Flags::UH);
                    return self.local(&r, &t, StatusCode::SERVICE_UNAVAILABLE, None, Bytes::new());
                }
                last_fail = Some((StatusCode::SERVICE_UNAVAILABLE, Flags::UH));
                break;
            };
            if pending.is_none() {
                match rebuild(&mut head, h2, &replay, body_empty) {
                    Some(req) => pending = Some(req),
                    // The body cannot be sent again: no retry.
                    None => {
                        last_fail = None;
                        break;
                    }
                }
            }
            let key = Key {
                netns,
                addr: ep.addr,
                h2,
            };
            let try_deadline = match (deadline, retry.per_try_timeout) {
                (Some(d), Some(p)) => Some((d.min(TokioInstant::now() + p), false)),
                (Some(d), None) => Some((d, true)),
                (None, Some(p)) => Some((TokioInstant::now() + p, false)),
                (None, None) => None,
            };
            ep.health.start();
            // `pending` keeps the request until a connection takes it,
            // and gets it back if it was not sent.
            let send = self.pool.send(
                &*self.connector,
                key,
                cluster.limits,
                &mut pending,
                &mut head,
            );
            let result = match try_deadline {
                Some((at, _)) => tokio::time::timeout_at(at, send).await.ok(),
                None => Some(send.await),
            };
            ep.health.end();
            if !keep_head {
                // The policy never sends this request twice: a handed-back
                // head must not make a retry possible.
                head = None;
            }
            let now_ms = self.now_ms();
            let et = Target {
                service: svc,
                dest: Some(dest),
                endpoint: Some(&ep.workload),
            };
            // (retriable, final status and flags when not retried)
            let (retriable, fail) = match result {
                Some(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let grpc_status = grpc_status_of(resp.headers());
                    let outcome = if status >= 500 {
                        Outcome::Error {
                            gateway: matches!(status, 502..=504),
                        }
                    } else {
                        Outcome::Success
                    };
                    self.report(cluster, ep, outcome, now_ms);
                    let again = retry.retries_response(status, grpc_status);
                    // The next attempt's request, when this one is retried
                    // and can be sent again.
                    pending = (again && r.attempts <= retry.retries)
                        .then(|| rebuild(&mut head, h2, &replay, body_empty))
                        .flatten();
                    if pending.is_none() {
                        if again && r.attempts > retry.retries {
                            r.flags.set(Flags::URX);
                        }
                        let resp = self.respond(&r, &et, route, dest, resp, new_cookie, replay);
                        return prefetched(resp, deadline).await;
                    }
                    (true, None)
                }
                Some(Err(SendError::Connect(e))) => {
                    tracing::debug!(endpoint = %ep.addr, error = %e, "upstream connect failed");
                    self.report(cluster, ep, Outcome::Error { gateway: true }, now_ms);
                    let cond = on::CONNECT_FAILURE | on::NO_RESPONSE | on::RESET_BEFORE_REQUEST;
                    (
                        retry.on & cond != 0,
                        Some((StatusCode::SERVICE_UNAVAILABLE, Flags::UF)),
                    )
                }
                Some(Err(SendError::Reset { refused, error })) => {
                    tracing::debug!(endpoint = %ep.addr, error = %error, "upstream reset");
                    self.report(cluster, ep, Outcome::Error { gateway: true }, now_ms);
                    let before = pending.is_some();
                    let mut cond = on::NO_RESPONSE;
                    if refused {
                        cond |= on::REFUSED_STREAM;
                    }
                    if before {
                        cond |= on::RESET_BEFORE_REQUEST;
                    }
                    let flag = if h2 { Flags::UR } else { Flags::UC };
                    (
                        retry.on & cond != 0,
                        Some((StatusCode::SERVICE_UNAVAILABLE, flag)),
                    )
                }
                None => {
                    // Timed out: the route's timeout ends the request; a
                    // per-try timeout may be retried.
                    self.report(cluster, ep, Outcome::Error { gateway: true }, now_ms);
                    let global = try_deadline.is_some_and(|(at, g)| g || Some(at) == deadline);
                    let fail = Some((StatusCode::GATEWAY_TIMEOUT, Flags::UT));
                    if global {
                        last_fail = fail;
                        break;
                    }
                    (retry.on & on::NO_RESPONSE != 0, fail)
                }
            };
            last_fail = fail;
            if !retriable {
                break;
            }
            if r.attempts > retry.retries {
                r.flags.set(Flags::URX);
                break;
            }
            if retry.other_host {
                tried.push(ep.addr);
            }
            // Back off (jittered), within the route's timeout.
            let wake = TokioInstant::now() + retry.backoff(r.attempts);
            match deadline {
                Some(d) if d <= wake => {
                    tokio::time::sleep_until(d).await;
                    last_fail = Some((StatusCode::GATEWAY_TIMEOUT, Flags::UT));
                    break;
                }
                _ => tokio::time::sleep_until(wake).await,
            }
        }
        let (status, flag) = last_fail.unwrap_or((StatusCode::SERVICE_UNAVAILABLE, Flags::UC));
        r.flags.set(flag);
        self.local(&r, &t, status, None, Bytes::new())
    }

    fn report(
        &self,
        cluster: &super::balance::Cluster,
        ep: &super::balance::Endpoint,
        outcome: Outcome,
        now_ms: u64,
    ) {
        if cluster.report(ep, outcome, now_ms) {
            tracing::info!(
                host = %cluster.host,
                subset = ?cluster.subset,
                endpoint = %ep.addr,
                "outlier detection ejected an endpoint"
            );
            self.observer.on_event(&ShimEvent::EndpointEjected {
                destination_service: cluster.host.to_string(),
                subset: cluster.subset.as_deref().map(str::to_string),
                endpoint: ep.addr,
            });
        }
    }

    /// The upstream response, with the response header edits, streamed
    /// back; its record is emitted when the body ends.
    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        r: &Req<'_>,
        t: &Target<'_>,
        route: &Route,
        dest: &Dest,
        resp: Response<super::upstream::UpstreamBody>,
        new_cookie: Option<super::balance::NewCookie>,
        replay: Option<Arc<super::body::Replay>>,
    ) -> Response<RespBody> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        dest.headers.response.apply(&mut parts.headers);
        route.headers.response.apply(&mut parts.headers);
        if let Some(c) = new_cookie
            && let Ok(v) = HeaderValue::from_str(&c.0)
        {
            parts.headers.append(header::SET_COOKIE, v);
        }
        let mut record = self.record(r, t, parts.status);
        record.grpc_status = parts
            .headers
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        record.response_bytes = header_bytes(&parts.headers) + 17;
        let finish = Finish {
            record,
            start: r.start,
            observer: self.observer.clone(),
            replay,
        };
        Response::from_parts(parts, RespBody::stream(body, finish))
    }

    fn record(&self, r: &Req<'_>, t: &Target<'_>, status: StatusCode) -> RequestRecord {
        let (dest_ws, subset, service, name, ns) = match t.dest {
            Some(d) => {
                let c = &d.cluster;
                (
                    t.endpoint.cloned().unwrap_or_else(|| Workload {
                        namespace: c.service_namespace.clone(),
                        version: c.subset.clone().unwrap_or_else(|| "unknown".into()),
                        ..Workload::unknown()
                    }),
                    c.subset.clone(),
                    c.host.clone(),
                    c.service_name.clone(),
                    c.service_namespace.clone(),
                )
            }
            None => (
                Workload::unknown(),
                None,
                t.service.host.clone(),
                t.service.name.clone(),
                t.service.namespace.clone(),
            ),
        };
        RequestRecord {
            source: r.conn.source.clone(),
            destination: dest_ws,
            destination_service: service,
            destination_service_name: name,
            destination_service_namespace: ns,
            subset,
            protocol: if r.grpc { "grpc" } else { "http" },
            response_code: status.as_u16(),
            grpc_status: None,
            response_flags: r.flags.render(),
            // Set when the response ends (`local`, or the body's `Finish`):
            // a clock read here would be overwritten.
            duration: Duration::ZERO,
            request_bytes: r.request_bytes,
            response_bytes: 0,
            mirrored: false,
            attempts: r.attempts,
        }
    }

    /// A reply made by the shim itself (no route, no endpoint, fault,
    /// redirect, direct response), recorded at once. gRPC clients get a
    /// trailers-only gRPC error instead, as Envoy sends them.
    fn local(
        &self,
        r: &Req<'_>,
        t: &Target<'_>,
        status: StatusCode,
        extra: Option<(header::HeaderName, HeaderValue)>,
        body: Bytes,
    ) -> Response<RespBody> {
        if r.grpc && (status.is_client_error() || status.is_server_error()) {
            return self.grpc_local(r, t, grpc_for_http(status));
        }
        let mut record = self.record(r, t, status);
        record.duration = r.start.elapsed();
        let mut resp = Response::new(RespBody::full(body.clone()));
        *resp.status_mut() = status;
        if let Some((k, v)) = extra {
            resp.headers_mut().insert(k, v);
        }
        if !body.is_empty() {
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        record.response_bytes = header_bytes(resp.headers()) + 17 + body.len() as u64;
        self.observer.on_request(&record);
        resp
    }

    fn grpc_local(&self, r: &Req<'_>, t: &Target<'_>, code: u32) -> Response<RespBody> {
        let mut record = self.record(r, t, StatusCode::OK);
        record.duration = r.start.elapsed();
        record.grpc_status = Some(code.to_string());
        let mut resp = Response::new(RespBody::empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        record.response_bytes = header_bytes(resp.headers()) + 17;
        self.observer.on_request(&record);
        resp
    }

    fn local_unrouted(&self, r: &Req<'_>, status: StatusCode) -> Response<RespBody> {
        let mut record = RequestRecord {
            source: r.conn.source.clone(),
            destination: Workload::unknown(),
            destination_service: r.conn.info.orig_dst.to_string().into(),
            destination_service_name: "unknown".into(),
            destination_service_namespace: "unknown".into(),
            subset: None,
            protocol: if r.grpc { "grpc" } else { "http" },
            response_code: status.as_u16(),
            grpc_status: None,
            response_flags: r.flags.render(),
            duration: r.start.elapsed(),
            request_bytes: r.request_bytes,
            response_bytes: 0,
            mirrored: false,
            attempts: 0,
        };
        let mut resp = Response::new(RespBody::empty());
        *resp.status_mut() = status;
        record.response_bytes = 17;
        self.observer.on_request(&record);
        resp
    }
}

/// The request's authority: `:authority` (h2, absolute URIs) or `Host`.
pub(crate) fn authority_of(parts: &Parts) -> String {
    if let Some(a) = parts.uri.authority() {
        return a.as_str().to_string();
    }
    parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The path and query after `rewrite.uri` / `uriRegexRewrite`.
fn rewrite_path(u: &UriRewrite, route: &Route, parts: &Parts) -> String {
    let path = parts.uri.path();
    let query = parts.uri.query();
    let new_path = match u {
        UriRewrite::Prefix(to) => {
            // The matched prefix (the whole path for an exact or regex
            // match); a route without a uri match matched Envoy's
            // catch-all `prefix: /`.
            let cut = route
                .matches
                .iter()
                .find_map(|m| m.uri_match(path))
                .map_or(usize::from(path.starts_with('/')), |u| {
                    u.rewritten_len(path)
                });
            format!("{to}{}", &path[cut.min(path.len())..])
        }
        UriRewrite::Regex(re, with) => re.replace_all(path, with.as_str()).into_owned(),
    };
    match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    }
}

/// The request target upstream: origin-form for HTTP/1.1, and for h2 the
/// scheme and authority too (h2 carries them as pseudo-headers).
pub(crate) fn upstream_uri(h2: bool, authority: &str, path_and_query: &str) -> http::Result<Uri> {
    if h2 {
        Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
    } else {
        Uri::builder().path_and_query(path_and_query).build()
    }
}

/// A retry's request: the kept head (moved for HTTP/1.1, whose client
/// hands it back after each send; copied for HTTP/2) and a replay of the
/// body.
fn rebuild(
    head: &mut Option<Parts>,
    h2: bool,
    replay: &Option<Arc<super::body::Replay>>,
    body_empty: bool,
) -> Option<Request<ReqBody>> {
    let body = if body_empty {
        ReqBody::Empty
    } else {
        replay.as_ref()?.body()?
    };
    let parts = if h2 {
        copy_head(head.as_ref()?)
    } else {
        head.take()?
    };
    Some(Request::from_parts(parts, body))
}

/// Method, target, version and headers of a request head (extensions are
/// the server's and stay behind).
fn copy_head(p: &Parts) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = p.method.clone();
    copy.uri = p.uri.clone();
    copy.version = p.version;
    copy.headers = p.headers.clone();
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, X-Trace, close"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "x-kept"]);
    }

    #[test]
    fn flags_render_as_envoy_writes_them() {
        let mut f = Flags::default();
        assert_eq!(f.render(), "-");
        f.set(Flags::UH);
        assert!(matches!(f.render(), Cow::Borrowed("UH")));
        f.set(Flags::URX);
        assert_eq!(f.render(), "UH,URX");
    }
}
