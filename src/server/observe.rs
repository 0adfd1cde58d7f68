//! The observability listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//!
//! `/healthz` answers 200 while the process serves at all (a liveness probe). `/readyz` answers
//! 200 only while new sessions would be served: not draining, and the engine says it is ready
//! (upstream reachable, model loaded); otherwise 503 with the reason in the body.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use super::Shared;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide Prometheus recorder once and return its handle.
pub fn install_recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in pipeline::metrics::buckets() {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.to_string()), &buckets)
                    .expect("bucket lists are not empty");
            }
            let handle = builder
                .install_recorder()
                .expect("no other metrics recorder is installed");
            pipeline::metrics::describe();
            pipeline::metrics::zero_fault_counters();
            pipeline::metrics::process::started(env!("CARGO_PKG_VERSION"));
            handle
        })
        .clone()
}

pub(super) async fn serve(listener: TcpListener, handle: PrometheusHandle, shared: Arc<Shared>) {
    // Histograms keep raw samples until drained; upkeep bounds that memory between scrapes.
    // Every frame records a few samples: with a 5 s upkeep they held ~20 KiB per stream
    // (heaptrack, 200 streams); upkeep every second holds a fifth of that for the same work.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(request.uri().path(), &handle, &shared);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The exporter's families, then the per-item ones kept per thread.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut body = handle.render();
    pipeline::metrics::render_sharded(&mut body);
    body
}

fn respond(path: &str, handle: &PrometheusHandle, shared: &Shared) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", render(handle)),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match not_ready(shared) {
            None => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                why.to_string(),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Why new sessions should not come here now, if they should not.
fn not_ready(shared: &Shared) -> Option<&'static str> {
    if !shared.ready.load(Ordering::Relaxed) || shared.draining.is_cancelled() {
        Some("draining\n")
    } else if !shared.engine.ready() {
        Some("engine not ready\n")
    } else {
        None
    }
}
