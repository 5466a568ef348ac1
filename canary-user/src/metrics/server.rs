//! The HTTP endpoint on `--metrics-addr` (default `127.0.0.1:15020`, the
//! port of Istio's merged metrics): `GET /metrics`, `/healthz` (200 while
//! the process lives) and `/readyz` (200 when ready, else 503 with the
//! reason). HTTP/1.1 only: that is what Prometheus and kubelet probes
//! speak.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::{CONTENT_TYPE, Metrics};

/// Says whether the agent is ready (programs attached, config loaded), or
/// why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A client that sends no complete request head within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` and serves until the task is dropped; only a bind failure
/// returns.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, ready: Readiness) -> io::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("binding metrics address {addr}: {e}")))?;
    serve_listener(listener, metrics, ready).await
}

/// Serves on a bound listener (tests bind port 0 and read the address).
pub async fn serve_listener(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Readiness,
) -> io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off, go on.
                tracing::warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        let service = service_fn(move |req| {
            let (metrics, ready) = (metrics.clone(), ready.clone());
            async move { Ok::<_, Infallible>(respond(req, metrics, ready).await) }
        });
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
    ready: Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        res.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    match req.uri().path() {
        "/metrics" => {
            // Rendering runs the scrape hook, which reads kernel maps.
            match tokio::task::spawn_blocking(move || metrics.render()).await {
                Ok(body) => {
                    let mut res = Response::new(Full::new(Bytes::from(body)));
                    res.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(CONTENT_TYPE),
                    );
                    res
                }
                Err(e) => {
                    tracing::error!("rendering metrics: {e}");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "rendering metrics failed\n",
                    )
                }
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz or /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body.into())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}
