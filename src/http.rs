//! The HTTP endpoint: `/metrics` (the registry of [`Metrics`]), `/healthz` (500 with the
//! reasons when a health check fails), `/readyz` (503 with the reasons when not ready;
//! either way followed by what this replica is: leader or standby, each backend's last
//! check) and `/debug/attempts` (JSON: the loops' work in flight and each object's last
//! failure, `?object=namespace/name` for one object; read by `stowage explain`).

use std::sync::Arc;

use axum::extract::Query;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use stowage_api::metrics::Metrics;
use stowage_loops::Activity;
use tokio::net::TcpListener;

/// A check endpoint's reply: 200 "ok", or `failing` with the reasons, one a line;
/// then the notes, one a line.
fn answer(
    checked: Result<(), String>,
    failing: StatusCode,
    notes: &[String],
) -> (StatusCode, String) {
    let (status, mut body) = match checked {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(reasons) => (failing, format!("{reasons}\n")),
    };
    for note in notes {
        body.push_str(note);
        body.push('\n');
    }
    (status, body)
}

/// The query of `/debug/attempts`.
#[derive(serde::Deserialize)]
struct AttemptsQuery {
    object: Option<String>,
}

/// Serve `/metrics`, `/healthz` (500 with the reasons when a health check fails) and
/// `/readyz` (503 with the reasons when not ready) on a
/// bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    (metrics, activity): (Arc<Metrics>, Activity),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let readiness = Arc::clone(&metrics);
    let liveness = Arc::clone(&metrics);
    let app = Router::new()
        .route(
            "/debug/attempts",
            get(move |Query(query): Query<AttemptsQuery>| {
                let activity = activity.clone();
                async move { Json(activity.report(query.object.as_deref())) }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let metrics = Arc::clone(&liveness);
                async move {
                    answer(
                        metrics.healthy().await,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &[],
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let metrics = Arc::clone(&readiness);
                async move {
                    let checked = metrics.ready().await;
                    answer(
                        checked,
                        StatusCode::SERVICE_UNAVAILABLE,
                        &metrics.ready_notes(),
                    )
                }
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
