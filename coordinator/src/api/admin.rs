//! The endpoints for admin keys (for anyone when the server runs without keys, as every endpoint then is):
//! `GET /v1/usage`, the ledger's totals, and `GET /v1/cluster`, the replicas and the cluster behind them.

use std::sync::Arc;

use axum::{
    Extension,
    extract::{Query, State, rejection::QueryRejection},
    response::{IntoResponse, Response},
};

use super::{auth, error::ApiError, state::AppState};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageQuery {
    since: Option<String>,
    by: Option<crate::usage::By>,
}

/// `GET /v1/usage?since=24h&by=tenant`: the ledger's totals, for admin keys (anyone when the server runs
/// without keys, as every endpoint then is).
pub(super) async fn usage(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<auth::Caller>,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Response {
    if s.keys.is_some() && !caller.key.as_ref().is_some_and(|k| k.admin) {
        return ApiError::permission("Reading usage needs an admin key.").into_response();
    }
    let Some(ledger) = &s.ledger else {
        return ApiError::not_found_message("This server keeps no usage ledger (start it with --usage-db).")
            .into_response();
    };
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return ApiError::param(
                "by",
                format!("Invalid query: {}. Use since=TIME and by=key|tenant|model|day.", e.body_text()),
            )
            .into_response();
        }
    };
    let since = match q.since.as_deref().map(|t| crate::usage::parse_since(t, crate::usage::unix_seconds())) {
        None => 0.0,
        Some(Ok(t)) => t,
        Some(Err(m)) => return ApiError::param("since", m).into_response(),
    };
    let by = q.by.unwrap_or(crate::usage::By::Key);
    let path = ledger.path.clone();
    let rows = tokio::task::spawn_blocking(move || {
        crate::usage::open_read(&path).and_then(|c| crate::usage::summarize(&c, since, by))
    })
    .await;
    match rows {
        Ok(Ok(data)) => {
            axum::Json(serde_json::json!({ "object": "list", "by": by, "since": since, "data": data })).into_response()
        }
        Ok(Err(e)) => ApiError::internal(format!("Reading the usage ledger failed: {e}")).into_response(),
        Err(_) => ApiError::internal("Reading the usage ledger failed.").into_response(),
    }
}

/// `GET /v1/cluster`: replicas with their load, and in cluster mode the registered workers and groups. For
/// admin keys (anyone when the server runs without keys).
pub(super) async fn cluster(State(s): State<Arc<AppState>>, Extension(caller): Extension<auth::Caller>) -> Response {
    if s.keys.is_some() && !caller.key.as_ref().is_some_and(|k| k.admin) {
        return ApiError::permission("Reading the cluster state needs an admin key.").into_response();
    }
    let mut body = serde_json::json!({
        "object": "cluster",
        "mode": if s.cluster.is_some() { "etcd" } else { "single" },
        "ready": s.engine.is_ready(),
        "replicas": s.engine.view(),
    });
    if let Some(c) = &s.cluster {
        body.as_object_mut().expect("an object").extend(c.status().as_object().cloned().unwrap_or_default());
    }
    axum::Json(body).into_response()
}
