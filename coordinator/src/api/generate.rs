//! Running a validated request, whichever endpoint it came in on: admission, one engine request per prompt
//! all answering on one event channel, under a span that records the outcome, then the answer, whole or
//! streamed.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::UnboundedSender;

use super::{
    admission,
    auth::Caller,
    error::ApiError,
    output::ChoiceText,
    reply::{Kind, Reply},
    request::Options,
    state::{AppState, unix_now},
    stream, whole,
};
use crate::engine::contract::{Event, GenRequest};

/// A request as its endpoint validated it, ready to run.
pub(super) struct Job {
    pub(super) kind: Kind,
    /// One, except for a batch of completions.
    pub(super) prompts: Vec<Vec<u32>>,
    /// The most tokens each choice may produce.
    pub(super) max_tokens: usize,
    pub(super) opts: Options,
}

/// Checks the request against the model and the pool, then runs it.
pub(super) async fn run(s: Arc<AppState>, caller: &Caller, job: Job) -> Response {
    if let Err(e) = admission::check_fits(&s, job.kind, &job.prompts, job.max_tokens, &job.opts) {
        return e.into_response();
    }
    // Tokens count against the key as OpenAI counts them at admission: prompt + max_tokens per choice.
    let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
    let completion_tokens = job.max_tokens * job.opts.n * job.prompts.len();
    let (slot, snapshot) = match admission::reserve(&s, caller, prompt_tokens, completion_tokens) {
        Ok(held) => held,
        Err(refused) => {
            let (e, snap) = *refused;
            let mut r = e.into_response();
            r.extensions_mut().insert(snap);
            return r;
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let ids: Vec<u64> = job.prompts.iter().map(|_| s.engine.next_request_id()).collect();
    let span = request_span(&s, ids[0], prompt_tokens);
    let queue = tracing::info_span!(target: "tessera::http", parent: &span, "queue");
    if let Err(e) = submit(&s, caller, &job, &ids, &tx, &span) {
        return e.into_response();
    }
    let Job { kind, prompts, opts, .. } = job;
    let reply = Reply {
        s: s.clone(),
        kind,
        name: format!("{}-{:x}{:06x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, s.instance, ids[0]),
        ids,
        created: unix_now(),
        prompt_tokens,
        choices: prompts.iter().flat_map(|p| (0..opts.n).map(|_| ChoiceText::new(p))).collect(),
        cached_tokens: vec![0; prompts.len()],
        opts,
        rx,
        sent_role: vec![false; 0],
        done: false,
        pending: None,
        span,
        queue: Some(queue),
        slot,
        key: caller.key.clone(),
        started_at: crate::usage::unix_seconds(),
        billed: false,
    };
    let mut r =
        if reply.opts.stream { stream::first_event_then_stream(reply).await } else { whole::whole_reply(reply).await };
    if let Some(snap) = snapshot {
        r.extensions_mut().insert(snap);
    }
    r
}

/// The request's span; `Reply` records the outcome in its empty fields when the request ends.
fn request_span(s: &AppState, first_id: u64, prompt_tokens: usize) -> tracing::Span {
    tracing::info_span!(
        target: "tessera::http",
        "generate",
        // Signed: OpenTelemetry exports unsigned integers as strings.
        request_id = first_id as i64,
        model = %s.model_name,
        prompt_tokens = prompt_tokens as i64,
        completion_tokens = tracing::field::Empty,
        cached_tokens = tracing::field::Empty,
        finish_reason = tracing::field::Empty,
    )
}

/// Submits one engine request per prompt, all answering on `events`.
fn submit(
    s: &AppState,
    caller: &Caller,
    job: &Job,
    ids: &[u64],
    events: &UnboundedSender<Event>,
    span: &tracing::Span,
) -> Result<(), ApiError> {
    let opts = &job.opts;
    for (p, (&id, prompt)) in ids.iter().zip(&job.prompts).enumerate() {
        let req = GenRequest {
            id,
            prompt: prompt.clone(),
            params: opts.params.clone(),
            max_tokens: job.max_tokens,
            ignore_eos: opts.ignore_eos,
            n: opts.n,
            first_choice: p * opts.n,
            flow: caller.key.as_ref().map(|k| k.id.clone()),
            weight: caller.key.as_ref().and_then(|k| k.weight).unwrap_or(1.0),
            events: events.clone(),
            span: span.clone(),
        };
        if !s.engine.submit(req) {
            // Nothing of a batch runs unless all of it does.
            for &earlier in &ids[..p] {
                (0..opts.n).for_each(|c| s.engine.abort(earlier, c, None));
            }
            return Err(ApiError::unavailable("The engine has stopped."));
        }
    }
    Ok(())
}
