//! What a completion request must pass before it reaches the engine, on either endpoint: a body that could
//! be read, the model this server serves, a size the model, the KV cache and the waiting queue can take,
//! and room in the key's limits. The checks run in this order, which decides the error a client sees when
//! several would fail.

use axum::{body::Bytes, extract::rejection::BytesRejection, http::StatusCode};

use super::{
    auth::Caller,
    error::ApiError,
    limits::{Refusal, Slot, Snapshot},
    reply::Kind,
    request::Options,
    state::AppState,
};

pub(super) fn body(b: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    b.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(None, r.body_text())
        }
    })
}

/// The LoRA adapter a request's `model` names: 0 for the base model, else the adapter's id; 404 for a
/// name this server does not serve.
pub(super) fn check_model(s: &AppState, model: &str) -> Result<u32, ApiError> {
    if model == s.model_name {
        return Ok(0);
    }
    s.engine.adapters.resolve(model).ok_or_else(|| ApiError::model_not_found(model))
}

/// Checks the request against the model and the pool.
pub(super) fn check_fits(
    s: &AppState,
    kind: Kind,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    opts: &Options,
) -> Result<(), ApiError> {
    let info = s.engine.info();
    let ctx = info.max_position_embeddings;
    let what = if kind == Kind::Chat { "messages" } else { "prompt" };
    if let Some((t, _)) = opts.params.logit_bias.iter().find(|(t, _)| *t as usize >= info.vocab_size) {
        let last = info.vocab_size.saturating_sub(1);
        return Err(ApiError::param(
            "logit_bias",
            format!("Token id {t} in 'logit_bias' is outside the vocabulary (0 to {last})."),
        ));
    }
    // Every prompt of a batch must fit; the longest is the one to name.
    let prompt = prompts.iter().max_by_key(|p| p.len()).expect("at least one prompt");
    if prompt.len() + max_tokens > ctx {
        return Err(ApiError::param(
            what,
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the {what}, {max_tokens} in the completion). Please reduce the length of the {what} or completion.",
                prompt.len() + max_tokens,
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    if !s.engine.is_ready() {
        return Err(ApiError::unavailable("No model replica is ready to serve."));
    }
    let blocks = (prompt.len() + max_tokens).div_ceil(info.block_size);
    if blocks > info.num_blocks {
        return Err(ApiError::param(
            what,
            format!(
                "This request needs {blocks} KV cache blocks but the server has {}; request fewer tokens.",
                info.num_blocks
            ),
        ));
    }
    let waiting = s.engine.queued();
    if waiting >= s.max_waiting {
        return Err(ApiError::overloaded(waiting));
    }
    Ok(())
}

/// Takes the caller's slot and reserves the request's tokens against its key's limits. A refusal carries
/// the limits' state, for the rate-limit headers of the answer.
pub(super) fn reserve(
    s: &AppState,
    caller: &Caller,
    prompt_tokens: usize,
    completion_tokens: usize,
) -> Result<(Option<Slot>, Option<Snapshot>), Refusal> {
    let mut slot = caller.take_slot();
    let mut snapshot = None;
    if let (Some(sl), Some(l)) = (slot.as_mut(), caller.key.as_ref().and_then(|k| k.limits)) {
        match sl.reserve(&l, prompt_tokens, completion_tokens) {
            Ok(snap) => snapshot = Some(snap),
            Err(refused) => {
                if let Some(k) = &caller.key {
                    s.engine.metrics.key_limited(&k.id);
                }
                return Err(refused);
            }
        }
    }
    Ok((slot, snapshot))
}
