//! The HTTP endpoint: `/metrics` (the registry of [`Metrics`]), `/healthz` (500 with the
//! reasons when a health check fails) and `/readyz` (503 with the reasons when not ready).

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use stowage_api::metrics::Metrics;
use tokio::net::TcpListener;

/// A check endpoint's reply: 200 "ok", or `failing` with the reasons, one a line.
fn answer(checked: Result<(), String>, failing: StatusCode) -> (StatusCode, String) {
    match checked {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(reasons) => (failing, format!("{reasons}\n")),
    }
}

/// Serve `/metrics`, `/healthz` (500 with the reasons when a health check fails) and
/// `/readyz` (503 with the reasons when not ready) on a
/// bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let readiness = Arc::clone(&metrics);
    let liveness = Arc::clone(&metrics);
    let app = Router::new()
        .route(
            "/healthz",
            get(move || {
                let metrics = Arc::clone(&liveness);
                async move { answer(metrics.healthy().await, StatusCode::INTERNAL_SERVER_ERROR) }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let metrics = Arc::clone(&readiness);
                async move { answer(metrics.ready().await, StatusCode::SERVICE_UNAVAILABLE) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                        .into_response()
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
