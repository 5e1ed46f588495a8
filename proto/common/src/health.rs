//! The HTTP routes every qslice daemon serves: Prometheus `/metrics`, `/healthz` and
//! `/readyz`. A daemon adds its own routes beside them (the coordinator's dashboard).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// Answers `/readyz`: `Ok(text)` is 200 with that text, `Err(text)` is 503 with it.
pub type Readiness = Arc<dyn Fn() -> Result<&'static str, &'static str> + Send + Sync>;

/// `/metrics` (404 when the process has no recorder), `/healthz` and `/readyz`.
pub fn routes(metrics: Option<PrometheusHandle>, ready: Readiness) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let rendered = metrics.as_ref().map(PrometheusHandle::render);
                async move {
                    match rendered {
                        Some(text) => text.into_response(),
                        None => (StatusCode::NOT_FOUND, "no metrics recorder in this process\n").into_response(),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let answer: Response = match ready() {
                    Ok(text) => (StatusCode::OK, text).into_response(),
                    Err(text) => (StatusCode::SERVICE_UNAVAILABLE, text).into_response(),
                };
                async move { answer }
            }),
        )
}

/// Serves `router` on `addr` until `shutdown`; `what` names the routes in the log line.
pub async fn serve(addr: SocketAddr, router: Router, what: &str, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving {what}");
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}
