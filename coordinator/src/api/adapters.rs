//! `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` (vLLM's endpoints and answers): LoRA
//! adapters loaded and unloaded while serving, for admin keys (anyone when the server runs without keys).
//!
//! A load returns once every replica has the adapter, and requests may name it from then on; a replica
//! loads it between two steps, so streams in flight miss at most one step. An unload takes the adapter out
//! of `/v1/models` and of routing at once; sequences already running with it finish first.

use std::sync::Arc;

use axum::{
    Extension,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use super::{admission::body, auth, error::ApiError, request, state::AppState};
use crate::lora::LoraError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
    /// vLLM's in-place replacement of a loaded adapter: refused (unload, then load).
    #[serde(default)]
    load_inplace: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadRequest {
    lora_name: String,
    /// vLLM accepts an id beside the name; the name alone identifies an adapter here.
    #[serde(default)]
    #[allow(dead_code)]
    lora_int_id: Option<i64>,
}

fn admin_only(s: &AppState, caller: &auth::Caller) -> Result<(), ApiError> {
    if s.keys.is_some() && !caller.key.as_ref().is_some_and(|k| k.admin) {
        return Err(ApiError::permission("Loading and unloading LoRA adapters needs an admin key."));
    }
    Ok(())
}

fn refused(e: LoraError) -> ApiError {
    match e {
        LoraError::NotFound(_) => ApiError::not_found_message(e.to_string()),
        LoraError::Load(..) => ApiError::param("lora_path", e.to_string()),
        _ => ApiError::param("lora_name", e.to_string()),
    }
}

fn text(message: String) -> Response {
    (StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
}

pub(super) async fn load(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<auth::Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        admin_only(&s, &caller)?;
        let r: LoadRequest = request::parse(&body(b, s.max_body_bytes)?)?;
        if r.load_inplace {
            return Err(ApiError::param(
                "load_inplace",
                "Replacing a loaded adapter in place is not supported: unload it, then load it.",
            ));
        }
        if r.lora_path.is_empty() {
            return Err(ApiError::param("lora_path", "lora_path must name the adapter's directory."));
        }
        // On a task of its own: a client that hangs up must not stop a load halfway (its name registered,
        // some replicas loaded and never cleaned up).
        let (engine, base) = (s.engine.clone(), s.model_name.clone());
        let load = tokio::spawn(async move { engine.load_adapter(&r.lora_name, &r.lora_path, &base).await });
        let spec =
            load.await.map_err(|e| ApiError::internal(format!("loading the adapter failed: {e}")))?.map_err(refused)?;
        tracing::info!(adapter = %spec.name, id = spec.id, path = %spec.path, "LoRA adapter serving");
        Ok(text(format!("Success: LoRA adapter '{}' added successfully.", spec.name)))
    };
    run.await.unwrap_or_else(ApiError::into_response)
}

pub(super) async fn unload(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<auth::Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Response, ApiError> {
        admin_only(&s, &caller)?;
        let r: UnloadRequest = request::parse(&body(b, s.max_body_bytes)?)?;
        let spec = s.engine.unload_adapter(&r.lora_name).map_err(refused)?;
        tracing::info!(adapter = %spec.name, id = spec.id, "LoRA adapter unloading");
        Ok(text(format!("Success: LoRA adapter '{}' removed successfully.", spec.name)))
    };
    run().unwrap_or_else(ApiError::into_response)
}
