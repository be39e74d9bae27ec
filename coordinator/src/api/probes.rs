//! The operational endpoints, open without a key for probes and scrapers: `/health` (liveness), `/ready`
//! (readiness) and `/metrics` (Prometheus).

use std::sync::Arc;

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

use super::state::AppState;
use crate::metrics;

/// Liveness: the process answers.
pub(super) async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
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
