//! `GET /v1/models` and `GET /v1/models/{model}`: the model this server serves and the LoRA adapters over
//! it, as OpenAI describes a model (adapters with `parent` set to the base, as vLLM lists them).

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    response::{IntoResponse, Response},
};

use super::{error::ApiError, state::AppState};

fn model_card(s: &AppState) -> serde_json::Value {
    serde_json::json!({
        "id": s.model_name,
        "object": "model",
        "created": s.started,
        "owned_by": "tessera",
        "max_model_len": s.engine.info().max_position_embeddings,
    })
}

fn adapter_card(s: &AppState, a: &crate::lora::Entry) -> serde_json::Value {
    serde_json::json!({
        "id": a.spec.name,
        "object": "model",
        "created": a.created,
        "owned_by": "tessera",
        "root": a.spec.path,
        "parent": s.model_name,
        "max_model_len": s.engine.info().max_position_embeddings,
    })
}

pub(super) async fn models(State(s): State<Arc<AppState>>) -> Response {
    let mut data = vec![model_card(&s)];
    data.extend(s.engine.adapters.list().iter().map(|a| adapter_card(&s, a)));
    axum::Json(serde_json::json!({ "object": "list", "data": data })).into_response()
}

pub(super) async fn model(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    if name == s.model_name {
        return axum::Json(model_card(&s)).into_response();
    }
    match s.engine.adapters.list().iter().find(|a| a.spec.name == name) {
        Some(a) => axum::Json(adapter_card(&s, a)).into_response(),
        None => ApiError::model_not_found(&name).into_response(),
    }
}
