//! `GET /v1/models` and `GET /v1/models/{model}`: the one model this server serves, as OpenAI describes a
//! model.

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

pub(super) async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(serde_json::json!({ "object": "list", "data": [model_card(&s)] })).into_response()
}

pub(super) async fn model(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    if name != s.model_name {
        return ApiError::model_not_found(&name).into_response();
    }
    axum::Json(model_card(&s)).into_response()
}
