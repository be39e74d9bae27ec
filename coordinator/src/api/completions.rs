//! `POST /v1/completions`: the request's own checks (unsupported options, `logprobs`, a prompt or a batch of
//! prompts as text or token ids), then the shared run.

use std::sync::Arc;

use axum::{
    Extension,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    response::{IntoResponse, Response},
};

use super::{
    admission::{body, check_model},
    auth::{self, Caller},
    error::ApiError,
    generate::{Job, run},
    offload,
    reply::Kind,
    request::{self, CompletionRequest, MAX_TOP_LOGPROBS, Prompt},
    state::AppState,
    structured,
};
use crate::engine::contract::MAX_CHOICES;

fn token_ids(s: &AppState, ids: Vec<i64>) -> Result<Vec<u32>, ApiError> {
    let vocab = s.engine.info().vocab_size as i64;
    ids.into_iter()
        .map(|t| {
            if (0..vocab).contains(&t) {
                Ok(t as u32)
            } else {
                Err(ApiError::param("prompt", format!("Token id {t} is outside the vocabulary (0 to {}).", vocab - 1)))
            }
        })
        .collect()
}

fn encode(s: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    s.tokenizer.encode_prompt(text).map_err(|e| ApiError::param("prompt", e.to_string()))
}

pub(super) async fn completions(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!(target: "tessera::http", "validate");
    let (state, who) = (s.clone(), caller.clone());
    let prepare = move || span.in_scope(|| prepare_completion(&state, &who, b));
    match offload::run(&offload::PROMPTS, "tokenizing the prompt", "prompt", prepare).await {
        Ok(job) => run(s, &caller, job).await,
        Err(e) => e.into_response(),
    }
}

fn prepare_completion(s: &AppState, caller: &Caller, b: Result<Bytes, BytesRejection>) -> Result<Job, ApiError> {
    let mut r: CompletionRequest = request::parse(&body(b, s.max_body_bytes)?)?;
    // The key's own list first: a name outside it is 403 whether or not this server serves it, so a
    // key learns nothing of other tenants' adapters.
    auth::check_model(caller, &r.model)?;
    let adapter = check_model(s, &r.model)?;
    if r.suffix.is_some() {
        return Err(ApiError::param("suffix", "suffix is not supported by this server."));
    }
    if r.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::param("best_of", "best_of other than 1 is not supported by this server."));
    }
    let logprobs = alternatives("logprobs", r.logprobs)?;
    let prompt_logprobs = alternatives("prompt_logprobs", r.prompt_logprobs)?;
    let echo = r.echo.unwrap_or(false);
    // A list of prompts is a batch: each prompt gets its `n` completions, numbered on through the list.
    // The prompts' own text, for echo: as sent, or (token prompts) as decoded.
    let (prompts, texts): (Vec<Vec<u32>>, Vec<Option<String>>) =
        match std::mem::replace(&mut r.prompt, Prompt::Tokens(vec![])) {
            Prompt::Text(t) => (vec![encode(s, &t)?], vec![Some(t)]),
            Prompt::Tokens(ids) => (vec![token_ids(s, ids)?], vec![None]),
            Prompt::Texts(v) => {
                (v.iter().map(|t| encode(s, t)).collect::<Result<_, _>>()?, v.into_iter().map(Some).collect())
            }
            Prompt::TokenLists(v) => {
                let n = v.len();
                (v.into_iter().map(|ids| token_ids(s, ids)).collect::<Result<_, _>>()?, vec![None; n])
            }
        };
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::param("prompt", "The prompt must not be empty."));
    }
    let max_tokens = request::max_tokens("max_tokens", r.max_tokens)?.unwrap_or(16);
    let mut opts = request::options(r.common(), logprobs)?;
    opts.echo = echo;
    opts.prompt_logprobs = prompt_logprobs;
    // The workers score the prompt when echo shows its logprobs, or when they are asked for on their own.
    let scored = match (echo, logprobs, prompt_logprobs) {
        (true, Some(k), p) => Some(k.max(p.unwrap_or(0))),
        (_, _, p) => p,
    };
    opts.params.prompt_logprobs = scored;
    if prompts.len() * opts.n > MAX_CHOICES {
        return Err(ApiError::param(
            "prompt",
            format!(
                "{} prompts with n = {} make {} completions; a request may ask for at most {MAX_CHOICES}.",
                prompts.len(),
                opts.n,
                prompts.len() * opts.n
            ),
        ));
    }
    let echo = echo.then_some(texts);
    let constraint = structured::constraint(s, r.response_format.as_ref(), r.structured_outputs.as_ref())?;
    let model = std::mem::take(&mut r.model);
    Ok(Job { kind: Kind::Completion, model, adapter, prompts, max_tokens, opts, echo, constraint })
}

/// A count of alternatives per token (`logprobs`, `prompt_logprobs`): 0 to OpenAI's limit.
fn alternatives(param: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
        Some(k) => Err(ApiError::param(
            param,
            format!("{k} is not a valid value for '{param}': expected 0 to {MAX_TOP_LOGPROBS}."),
        )),
    }
}
