//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes, for clients that count or inspect tokens
//! before they send a request (evaluators, context-window packing). `/tokenize` takes either a `prompt`
//! (tokenized as `/v1/completions` would, special tokens added unless `add_special_tokens` is false) or
//! `messages` (with `tools`, rendered through the chat template as `/v1/chat/completions` would, then
//! tokenized without special tokens); `/detokenize` turns ids back into text, special tokens included.

use std::sync::Arc;

use axum::{
    Extension,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};

use super::{
    admission::{body, check_model},
    auth::{self, Caller},
    chat,
    error::ApiError,
    offload,
    request::{self, Message},
    state::AppState,
    tools,
};

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    /// With `messages`: the tools the chat template shows, as a chat request sends them.
    tools: Option<serde_json::Value>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    return_token_strs: Option<bool>,
}

#[derive(Serialize, Debug)]
struct Tokenized {
    count: usize,
    max_model_len: usize,
    tokens: Vec<u32>,
    token_strs: Option<Vec<String>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<i64>,
}

/// The model a request names, if it names one: the served model, and one its key may use.
fn check(s: &AppState, caller: &Caller, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) => {
            auth::check_model(caller, m)?;
            check_model(s, m).map(drop)
        }
        None => auth::check_model(caller, &s.model_name),
    }
}

pub(super) async fn tokenize(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let state = s.clone();
    let work = move || prepare_tokenize(&state, &caller, b);
    match offload::run(&offload::PROMPTS, "tokenizing", "prompt", work).await {
        Ok(t) => axum::Json(t).into_response(),
        Err(e) => e.into_response(),
    }
}

fn prepare_tokenize(s: &AppState, caller: &Caller, b: Result<Bytes, BytesRejection>) -> Result<Tokenized, ApiError> {
    let r: TokenizeRequest = request::parse(&body(b, s.max_body_bytes)?)?;
    check(s, caller, r.model.as_deref())?;
    let tokens = match (&r.prompt, &r.messages) {
        (Some(text), None) => {
            if r.add_generation_prompt.is_some() {
                return Err(ApiError::param("add_generation_prompt", "add_generation_prompt goes with messages."));
            }
            if r.tools.is_some() {
                return Err(ApiError::param("tools", "tools go with messages."));
            }
            let tokens = if r.add_special_tokens.unwrap_or(true) {
                s.tokenizer.encode_prompt(text)
            } else {
                s.tokenizer.encode(text, false)
            };
            tokens.map_err(|e| ApiError::param("prompt", e.to_string()))?
        }
        (None, Some(messages)) => {
            if r.add_generation_prompt == Some(false) {
                return Err(ApiError::param(
                    "add_generation_prompt",
                    "Only add_generation_prompt true is supported: chat requests always open the assistant's turn.",
                ));
            }
            let template = s.chat_template.as_ref().ok_or_else(|| {
                ApiError::param("messages", format!("The model `{}` has no chat template.", s.model_name))
            })?;
            // Checked as a chat request's are; "none" because no output is parsed here.
            let none = serde_json::Value::from("none");
            let tools = tools::read(r.tools.as_ref(), r.tools.as_ref().map(|_| &none), None, None, false)?;
            let text = template.render_with_tools(&chat::messages(messages)?, tools.as_ref().map(|t| &t.tools))?;
            // The template writes the special tokens itself, as for chat requests.
            s.tokenizer
                .encode(&text, r.add_special_tokens.unwrap_or(false))
                .map_err(|e| ApiError::param("messages", e.to_string()))?
        }
        _ => return Err(ApiError::invalid(None, "Give exactly one of `prompt` and `messages`.")),
    };
    let token_strs = r
        .return_token_strs
        .unwrap_or(false)
        .then(|| tokens.iter().map(|&t| s.tokenizer.id_to_token(t).unwrap_or_default()).collect());
    Ok(Tokenized { count: tokens.len(), max_model_len: s.engine.info().max_position_embeddings, tokens, token_strs })
}

pub(super) async fn detokenize(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let state = s.clone();
    let work = move || {
        let r: DetokenizeRequest = request::parse(&body(b, state.max_body_bytes)?)?;
        check(&state, &caller, r.model.as_deref())?;
        let vocab = state.engine.info().vocab_size as i64;
        let ids = r
            .tokens
            .iter()
            .map(|&t| {
                u32::try_from(t).ok().filter(|_| t < vocab).ok_or_else(|| {
                    ApiError::param("tokens", format!("Token id {t} is outside the vocabulary (0 to {}).", vocab - 1))
                })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let prompt = state.tokenizer.decode_with(&ids, false).map_err(|e| ApiError::param("tokens", e.to_string()))?;
        Ok(serde_json::json!({ "prompt": prompt }))
    };
    match offload::run(&offload::PROMPTS, "detokenizing", "tokens", work).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
