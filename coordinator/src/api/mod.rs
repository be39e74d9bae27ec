//! The OpenAI-compatible HTTP API (axum): `/v1/completions`, `/v1/chat/completions` (streaming and not),
//! `/v1/models`, and the operational endpoints `/health`, `/ready`, `/metrics`.
//!
//! Handlers validate and tokenize, then hand the request to the engine loop and assemble its tokens into
//! OpenAI's response or event stream. Every error is OpenAI-shaped with the right status.

mod access_log;
pub mod auth;
pub mod chat_template;
pub mod error;
mod handlers;
pub mod limits;
pub mod output;
pub mod request;

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, State},
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};

use crate::{metrics, replicas::Replicas, tokenizer::Tokenizer};
use chat_template::ChatTemplate;
use error::ApiError;

pub struct AppState {
    /// The model replicas requests are routed over.
    pub engine: Arc<Replicas>,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// The name clients use in `model`.
    pub model_name: String,
    /// Requests allowed to wait before new ones get 429.
    pub max_waiting: usize,
    pub max_body_bytes: usize,
    /// Unix time the server started (`created` of the model).
    pub started: u64,
    /// Nanoseconds since the epoch at start: makes response ids (the ledger's keys) unique across restarts.
    pub instance: u64,
    /// API keys; `None` serves everyone.
    pub keys: Option<Arc<auth::KeyStore>>,
    /// Per-key limit state.
    pub limiter: Arc<limits::Limiter>,
    /// Where usage rows go (`--usage-db`).
    pub ledger: Option<crate::usage::Ledger>,
    /// Cluster mode: the membership and groups behind the replicas (`GET /v1/cluster`).
    pub cluster: Option<Arc<dyn ClusterStatus>>,
}

/// What `GET /v1/cluster` shows beyond the replicas: workers and groups, as the cluster manager sees them.
pub trait ClusterStatus: Send + Sync {
    fn status(&self) -> serde_json::Value;
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    // Keys guard the API; health, readiness and metrics stay open for probes and scrapers.
    let api = Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/usage", get(usage))
        .route("/v1/cluster", get(cluster))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.keys.clone(), state.limiter.clone(), state.engine.metrics.clone()),
            auth::require_key,
        ));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(limit, refuse_oversized))
        .layer(axum::middleware::from_fn(access_log::log_requests))
        .with_state(state)
}

fn model_card(s: &AppState) -> serde_json::Value {
    serde_json::json!({
        "id": s.model_name,
        "object": "model",
        "created": s.started,
        "owned_by": "tessera",
        "max_model_len": s.engine.info().max_position_embeddings,
    })
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(serde_json::json!({ "object": "list", "data": [model_card(&s)] })).into_response()
}

async fn model(State(s): State<Arc<AppState>>, axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    if name != s.model_name {
        return ApiError::model_not_found(&name).into_response();
    }
    axum::Json(model_card(&s)).into_response()
}

/// Liveness: the process answers.
async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Readiness: a replica is loaded and serving.
async fn ready(State(s): State<Arc<AppState>>) -> Response {
    if s.engine.is_ready() {
        axum::Json(serde_json::json!({ "status": "ready" })).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "status": "unavailable" }))).into_response()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    since: Option<String>,
    by: Option<crate::usage::By>,
}

/// `GET /v1/usage?since=24h&by=tenant`: the ledger's totals, for admin keys (anyone when the server runs
/// without keys, as every endpoint then is).
async fn usage(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    query: Result<axum::extract::Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if s.keys.is_some() && !caller.key.as_ref().is_some_and(|k| k.admin) {
        return ApiError::permission("Reading usage needs an admin key.").into_response();
    }
    let Some(ledger) = &s.ledger else {
        return ApiError::not_found_message("This server keeps no usage ledger (start it with --usage-db).")
            .into_response();
    };
    let q = match query {
        Ok(axum::extract::Query(q)) => q,
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
async fn cluster(State(s): State<Arc<AppState>>, axum::Extension(caller): axum::Extension<auth::Caller>) -> Response {
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

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], s.engine.metrics.render()).into_response()
}

/// Bodies declared larger than this are refused without being read: past it, reading to be polite costs
/// more than a client that cannot take an early answer deserves.
const DRAIN_AT_MOST: u64 = 64 << 20;

/// A body declared larger than the limit gets its 413 at once, but only after what the client is sending
/// has been read and discarded (up to 64 MiB, 10 s), as a web server's lingering close does: a response
/// written while the client is still sending, followed by closing the connection, resets it, and the
/// client sees a broken pipe instead of the 413.
async fn refuse_oversized(
    State(limit): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => {
            if n <= DRAIN_AT_MOST {
                let mut body = req.into_body().into_data_stream();
                let drain = async { while let Some(Ok(_)) = futures_util::StreamExt::next(&mut body).await {} };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
            }
            ApiError::too_large(limit).into_response()
        }
        _ => next.run(req).await,
    }
}

async fn fallback(uri: Uri) -> Response {
    ApiError::not_found(uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}
