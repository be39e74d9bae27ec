//! `GET /v1/models` and `GET /v1/models/{model}`: the model this server serves and the LoRA adapters over
//! it, as OpenAI describes a model (adapters with `parent` set to the base, as vLLM lists them).

use std::sync::Arc;

use axum::{
    Extension,
    extract::{Path, State},
    response::{IntoResponse, Response},
};

use super::{auth::Caller, error::ApiError, state::AppState};

fn model_card(s: &AppState) -> serde_json::Value {
    serde_json::json!({
        "id": s.model_name,
        "object": "model",
        "created": s.started,
        "owned_by": "tessera",
        "max_model_len": s.engine.info().max_position_embeddings,
    })
}

/// An adapter as vLLM lists it; `root` (its directory on the server) only for those who may manage
/// adapters: admin keys, or anyone on a server without keys.
fn adapter_card(s: &AppState, a: &crate::lora::Entry, caller: &Caller) -> serde_json::Value {
    let mut card = serde_json::json!({
        "id": a.spec.name,
        "object": "model",
        "created": a.created,
        "owned_by": "tessera",
        "parent": s.model_name,
        "max_model_len": s.engine.info().max_position_embeddings,
    });
    if s.keys.is_none() || caller.key.as_ref().is_some_and(|k| k.admin) {
        card["root"] = a.spec.path.clone().into();
    }
    card
}

/// Whether the caller's key may use `model` (every key may list every model it may use, and no other).
fn visible(caller: &Caller, model: &str) -> bool {
    caller.key.as_ref().is_none_or(|k| k.allows(model))
}

pub(super) async fn models(State(s): State<Arc<AppState>>, Extension(caller): Extension<Caller>) -> Response {
    let mut data = Vec::new();
    if visible(&caller, &s.model_name) {
        data.push(model_card(&s));
    }
    let adapters = s.engine.adapters.list();
    data.extend(adapters.iter().filter(|a| visible(&caller, &a.spec.name)).map(|a| adapter_card(&s, a, &caller)));
    axum::Json(serde_json::json!({ "object": "list", "data": data })).into_response()
}

pub(super) async fn model(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    if !visible(&caller, &name) {
        return ApiError::model_not_found(&name).into_response();
    }
    if name == s.model_name {
        return axum::Json(model_card(&s)).into_response();
    }
    match s.engine.adapters.list().iter().find(|a| a.spec.name == name) {
        Some(a) => axum::Json(adapter_card(&s, a, &caller)).into_response(),
        None => ApiError::model_not_found(&name).into_response(),
    }
}
