//! The OpenAI-compatible HTTP API (axum): `/v1/completions`, `/v1/chat/completions` (streaming and not),
//! `/v1/models`, and the operational endpoints `/health`, `/ready`, `/metrics`. Every error is OpenAI-shaped
//! with the right status. This module builds the router, and [`server`] serves it; its modules, roughly in the order a request
//! meets them:
//!
//! - `state`: [`AppState`], what every endpoint shares (re-exported here).
//! - `access_log`: one log line per request.
//! - `refusals`: bodies over the limit, unknown paths, wrong methods.
//! - [`auth`]: API keys and the middleware that checks them; [`limits`]: per-key rate and concurrency limits.
//! - `completions`, `chat`: the two generation endpoints, each validating and tokenizing its own request
//!   ([`request`] parses and checks what both share; [`chat_template`] renders a conversation), off the
//!   async runtime ([`offload`]); [`structured`] reads `response_format` and `structured_outputs`, [`tools`]
//!   reads `tools` and `tool_choice` and turns the model's output into `tool_calls`.
//! - `generate`: runs a validated request for either endpoint; `admission` has the checks it must pass first.
//! - `reply`: a request in flight, its choices, usage and billing; `whole` and `stream` assemble its answer
//!   as one JSON body or as server-sent events ([`output`] builds the text and logprobs of a choice).
//! - `adapters` (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`): LoRA adapters loaded while serving.
//! - `models`, `admin` (`/v1/usage`, `/v1/cluster`), `tokenize` (`/tokenize`, `/detokenize`), `probes`
//!   (`/health`, `/ready`, `/metrics`): the rest.
//! - [`error`]: the OpenAI-shaped error every module answers with.
//! - [`server`]: accepts the connections the router answers, with their bounds and timeouts.

mod access_log;
mod adapters;
mod admin;
mod admission;
pub mod auth;
mod chat;
pub mod chat_template;
mod completions;
pub mod error;
mod generate;
pub mod limits;
mod models;
pub mod offload;
pub mod output;
mod probes;
mod refusals;
mod reply;
pub mod request;
pub mod server;
mod state;
mod stream;
pub mod structured;
mod tokenize;
pub mod tools;
mod whole;

use std::sync::Arc;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{get, post},
};

pub use state::{AppState, ClusterStatus, unix_now};

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    // Keys guard the API; health, readiness and metrics stay open for probes and scrapers.
    let api = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat))
        .route("/v1/models", get(models::models))
        .route("/v1/models/{model}", get(models::model))
        .route("/v1/usage", get(admin::usage))
        .route("/v1/cluster", get(admin::cluster))
        .route("/v1/load_lora_adapter", post(adapters::load))
        .route("/v1/unload_lora_adapter", post(adapters::unload))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.keys.clone(), state.limiter.clone(), state.engine.metrics.clone()),
            auth::require_key,
        ));
    Router::new()
        .merge(api)
        .route("/health", get(probes::health))
        .route("/ready", get(probes::ready))
        .route("/metrics", get(probes::metrics))
        .fallback(refusals::fallback)
        .method_not_allowed_fallback(refusals::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state((limit, state.body_timeout), refusals::read_body))
        .layer(axum::middleware::from_fn(access_log::log_requests))
        .with_state(state)
}
