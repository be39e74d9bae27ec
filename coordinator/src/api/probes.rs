//! The operational endpoints, open without a key for probes and scrapers: `/health` (liveness: fails only
//! when no replica can ever be started again), `/ready` (readiness: a replica is serving) and `/metrics`
//! (Prometheus).

use std::sync::Arc;

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

use super::state::AppState;
use crate::metrics;

/// Liveness: the process answers and can still serve, now or once a replica is (re)started. When replicas
/// can no longer be started, restarting the process is the only way back: 503, so an orchestrator does.
pub(super) async fn health(State(s): State<Arc<AppState>>) -> Response {
    match s.engine.gave_up() {
        None => axum::Json(serde_json::json!({ "status": "ok" })).into_response(),
        Some(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "status": "failed", "reason": reason })))
                .into_response()
        }
    }
}

/// Readiness: a replica is loaded and serving.
pub(super) async fn ready(State(s): State<Arc<AppState>>) -> Response {
    if s.engine.is_ready() {
        axum::Json(serde_json::json!({ "status": "ready" })).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "status": "unavailable" }))).into_response()
    }
}

pub(super) async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], s.engine.metrics.render()).into_response()
}
