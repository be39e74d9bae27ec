//! The completion endpoints: validate, tokenize, submit to the engine loop, assemble the answer.

use std::{convert::Infallible, sync::Arc};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::StatusCode,
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, Sse},
    },
};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::{
    AppState,
    auth::{self, Caller},
    chat_template::ChatMessage,
    error::ApiError,
    output::{ChoiceText, chat_logprobs, completion_logprobs},
    request::{self, ChatRequest, CompletionRequest, Content, MAX_TOP_LOGPROBS, Options, Prompt},
    unix_now,
};
use crate::engine::contract::{Event, FinishReason, GenRequest, MAX_CHOICES};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

fn body(b: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    b.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(None, r.body_text())
        }
    })
}

fn check_model(s: &AppState, model: &str) -> Result<(), ApiError> {
    if model != s.model_name { Err(ApiError::model_not_found(model)) } else { Ok(()) }
}

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

pub async fn completions(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared =
        tracing::info_span!(target: "tessera::http", "validate").in_scope(|| prepare_completion(&s, &caller, b));
    match prepared {
        Ok((prompts, max_tokens, opts)) => run(s, &caller, Kind::Completion, prompts, max_tokens, opts).await,
        Err(e) => e.into_response(),
    }
}

fn prepare_completion(
    s: &AppState,
    caller: &Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<(Vec<Vec<u32>>, usize, Options), ApiError> {
    let mut r: CompletionRequest = request::parse(&body(b, s.max_body_bytes)?)?;
    check_model(s, &r.model)?;
    auth::check_model(caller, &r.model)?;
    if r.echo == Some(true) {
        return Err(ApiError::param("echo", "echo is not supported by this server."));
    }
    if r.suffix.is_some() {
        return Err(ApiError::param("suffix", "suffix is not supported by this server."));
    }
    if r.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::param("best_of", "best_of other than 1 is not supported by this server."));
    }
    let logprobs = match r.logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::param(
                "logprobs",
                format!("{k} is not a valid value for 'logprobs': expected 0 to {MAX_TOP_LOGPROBS}."),
            ));
        }
    };
    // A list of prompts is a batch: each prompt gets its `n` completions, numbered on through the list.
    let prompts: Vec<Vec<u32>> = match std::mem::replace(&mut r.prompt, Prompt::Tokens(vec![])) {
        Prompt::Text(t) => vec![encode(s, &t)?],
        Prompt::Tokens(ids) => vec![token_ids(s, ids)?],
        Prompt::Texts(v) => v.iter().map(|t| encode(s, t)).collect::<Result<_, _>>()?,
        Prompt::TokenLists(v) => v.into_iter().map(|ids| token_ids(s, ids)).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::param("prompt", "The prompt must not be empty."));
    }
    let max_tokens = request::max_tokens("max_tokens", r.max_tokens)?.unwrap_or(16);
    let opts = request::options(r.common(), logprobs)?;
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
    Ok((prompts, max_tokens, opts))
}

pub async fn chat(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = tracing::info_span!(target: "tessera::http", "validate").in_scope(|| prepare_chat(&s, &caller, b));
    match prepared {
        Ok((prompt, max_tokens, opts)) => run(s, &caller, Kind::Chat, vec![prompt], max_tokens, opts).await,
        Err(e) => e.into_response(),
    }
}

fn prepare_chat(
    s: &AppState,
    caller: &Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<(Vec<u32>, usize, Options), ApiError> {
    let mut r: ChatRequest = request::parse(&body(b, s.max_body_bytes)?)?;
    check_model(s, &r.model)?;
    auth::check_model(caller, &r.model)?;
    let template = s.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            None,
            format!("The model `{}` has no chat template; use /v1/completions instead.", s.model_name),
        )
    })?;
    if r.tools.as_ref().is_some_and(|t| !t.is_null()) || r.tool_choice.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::param("tools", "Tool calling is not supported by this server."));
    }
    if let Some(f) = &r.response_format
        && f.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::param(
            "response_format",
            "Only response_format {\"type\": \"text\"} is supported by this server.",
        ));
    }
    if r.messages.is_empty() {
        return Err(ApiError::param("messages", "messages must contain at least one message."));
    }
    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(ApiError::param(&format!("messages.[{i}].role"), format!("Invalid role {:?}.", m.role)));
        }
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::param(
                                &format!("messages.[{i}].content"),
                                format!("Content parts of type {kind:?} are not supported; only text."),
                            ));
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage { role: m.role.clone(), content });
    }
    let text = template.render(&messages)?;
    // The template writes the special tokens itself (e.g. "<s>"); like transformers, add none.
    let prompt = s.tokenizer.encode(&text, false).map_err(|e| ApiError::param("messages", e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::param("messages", "The rendered conversation is empty."));
    }
    let logprobs = match (r.logprobs.unwrap_or(false), r.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::param("top_logprobs", "top_logprobs requires logprobs to be true."));
        }
        (false, _) => None,
        (true, None) => Some(0),
        (true, Some(k)) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Some(k as usize),
        (true, Some(k)) => {
            return Err(ApiError::param(
                "top_logprobs",
                format!("{k} is not a valid value for 'top_logprobs': expected 0 to {MAX_TOP_LOGPROBS}."),
            ));
        }
    };
    let max = match (
        request::max_tokens("max_completion_tokens", r.max_completion_tokens)?,
        request::max_tokens("max_tokens", r.max_tokens)?,
    ) {
        (Some(m), _) | (None, Some(m)) => m,
        // Without a limit, a chat answer may run to the end of the context.
        (None, None) => s.engine.info().max_position_embeddings.saturating_sub(prompt.len()).max(1),
    };
    let opts = request::options(r.common(), logprobs)?;
    Ok((prompt, max, opts))
}

/// Checks the request against the model and the pool, then runs it.
async fn run(
    s: Arc<AppState>,
    caller: &Caller,
    kind: Kind,
    prompts: Vec<Vec<u32>>,
    max_tokens: usize,
    opts: Options,
) -> Response {
    let info = s.engine.info();
    let ctx = info.max_position_embeddings;
    let what = if kind == Kind::Chat { "messages" } else { "prompt" };
    if let Some((t, _)) = opts.params.logit_bias.iter().find(|(t, _)| *t as usize >= info.vocab_size) {
        let last = info.vocab_size.saturating_sub(1);
        return ApiError::param(
            "logit_bias",
            format!("Token id {t} in 'logit_bias' is outside the vocabulary (0 to {last})."),
        )
        .into_response();
    }
    // Every prompt of a batch must fit; the longest is the one to name.
    let prompt = prompts.iter().max_by_key(|p| p.len()).expect("at least one prompt");
    if prompt.len() + max_tokens > ctx {
        return ApiError::param(
            what,
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the {what}, {max_tokens} in the completion). Please reduce the length of the {what} or completion.",
                prompt.len() + max_tokens,
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded")
        .into_response();
    }
    if !s.engine.is_ready() {
        return ApiError::unavailable("No model replica is ready to serve.").into_response();
    }
    let blocks = (prompt.len() + max_tokens).div_ceil(info.block_size);
    if blocks > info.num_blocks {
        return ApiError::param(
            what,
            format!(
                "This request needs {blocks} KV cache blocks but the server has {}; request fewer tokens.",
                info.num_blocks
            ),
        )
        .into_response();
    }
    let waiting = s.engine.queued();
    if waiting >= s.max_waiting {
        return ApiError::overloaded(waiting).into_response();
    }
    // Tokens count against the key as OpenAI counts them at admission: prompt + max_tokens per choice.
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let mut slot = caller.take_slot();
    let mut snapshot = None;
    if let (Some(sl), Some(l)) = (slot.as_mut(), caller.key.as_ref().and_then(|k| k.limits)) {
        match sl.reserve(&l, prompt_tokens, max_tokens * opts.n * prompts.len()) {
            Ok(snap) => snapshot = Some(snap),
            Err(refused) => {
                if let Some(k) = &caller.key {
                    s.engine.metrics.key_limited(&k.id);
                }
                let (e, snap) = *refused;
                let mut r = e.into_response();
                r.extensions_mut().insert(snap);
                return r;
            }
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // One engine request per prompt, all answering on one channel.
    let ids: Vec<u64> = prompts.iter().map(|_| s.engine.next_request_id()).collect();
    let span = tracing::info_span!(
        target: "tessera::http",
        "generate",
        // Signed: OpenTelemetry exports unsigned integers as strings.
        request_id = ids[0] as i64,
        model = %s.model_name,
        prompt_tokens = prompt_tokens as i64,
        completion_tokens = tracing::field::Empty,
        cached_tokens = tracing::field::Empty,
        finish_reason = tracing::field::Empty,
    );
    let queue = tracing::info_span!(target: "tessera::http", parent: &span, "queue");
    for (p, (&id, prompt)) in ids.iter().zip(&prompts).enumerate() {
        let req = GenRequest {
            id,
            prompt: prompt.clone(),
            params: opts.params.clone(),
            max_tokens,
            ignore_eos: opts.ignore_eos,
            n: opts.n,
            first_choice: p * opts.n,
            flow: caller.key.as_ref().map(|k| k.id.clone()),
            weight: caller.key.as_ref().and_then(|k| k.weight).unwrap_or(1.0),
            events: tx.clone(),
            span: span.clone(),
        };
        if !s.engine.submit(req) {
            // Nothing of a batch runs unless all of it does.
            for &earlier in &ids[..p] {
                (0..opts.n).for_each(|c| s.engine.abort(earlier, c, None));
            }
            return ApiError::unavailable("The engine has stopped.").into_response();
        }
    }
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
    let mut r = if reply.opts.stream { first_event_then_stream(reply).await } else { whole_reply(reply).await };
    if let Some(snap) = snapshot {
        r.extensions_mut().insert(snap);
    }
    r
}

/// A request in flight and everything needed to answer it.
struct Reply {
    s: Arc<AppState>,
    kind: Kind,
    /// The engine request of each prompt (one, except for a batch of completions); choice `i` is choice
    /// `i % n` of request `i / n`.
    ids: Vec<u64>,
    name: String,
    created: u64,
    /// Of all its prompts.
    prompt_tokens: usize,
    choices: Vec<ChoiceText>,
    /// Per prompt.
    cached_tokens: Vec<usize>,
    opts: Options,
    rx: UnboundedReceiver<Event>,
    sent_role: Vec<bool>,
    done: bool,
    /// An event received before the stream began, to be sent first.
    pending: Option<Event>,
    /// The request's span; its token counts and finish reason are recorded when it ends.
    span: tracing::Span,
    /// Open from submission to the first token.
    queue: Option<tracing::Span>,
    /// The key's hold on its limits: unused reserved tokens go back, and the concurrency slot frees, when
    /// the reply ends.
    slot: Option<crate::api::limits::Slot>,
    /// Who is billed (`None` without keys).
    key: Option<Arc<crate::api::auth::KeyEntry>>,
    /// Unix seconds at admission.
    started_at: f64,
    /// The request's usage has been counted (ledger row and per-key metrics): it happens once, when the
    /// reply completes, or else when it is dropped.
    billed: bool,
}

impl Reply {
    /// Stops choice `i` in the engine.
    fn abort(&self, i: usize, reason: Option<FinishReason>) {
        self.s.engine.abort(self.ids[i / self.opts.n], i % self.opts.n, reason);
    }

    fn cached_tokens(&self) -> usize {
        self.cached_tokens.iter().sum()
    }

    fn finish_reasons(&self) -> Vec<&'static str> {
        self.choices
            .iter()
            .map(|c| match c.finish {
                Some(FinishReason::Stop) => "stop",
                Some(FinishReason::Length) => "length",
                None => "abort",
            })
            .collect()
    }

    /// The request's usage as billed: what was produced, whatever the outcome. Counted in the per-key
    /// metrics here; the ledger row is returned for the caller to write.
    fn bill(&mut self, status: &'static str) -> Option<crate::usage::UsageRecord> {
        if std::mem::replace(&mut self.billed, true) {
            return None;
        }
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        if let Some(k) = &self.key {
            let m = &self.s.engine.metrics;
            m.key_requests.get_or_create(&vec![("key_id", k.id.clone()), ("status", status.to_string())]).inc();
            for (kind, n) in
                [("prompt", self.prompt_tokens), ("cached", self.cached_tokens()), ("completion", completion)]
            {
                m.key_tokens
                    .get_or_create(&vec![("key_id", k.id.clone()), ("kind", kind.to_string())])
                    .inc_by(n as u64);
            }
        }
        self.s.ledger.as_ref()?;
        Some(crate::usage::UsageRecord {
            request_id: self.name.clone(),
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            tenant: self.key.as_ref().map(|k| k.tenant.clone()),
            model: self.s.model_name.clone(),
            prompt_tokens: self.prompt_tokens as u64,
            cached_tokens: self.cached_tokens() as u64,
            completion_tokens: completion as u64,
            status,
            finish_reason: self.finish_reasons().join(","),
            started_at: self.started_at,
            ended_at: crate::usage::unix_seconds(),
        })
    }

    /// Bills a completed request and waits for its ledger row to be committed, so that a response the
    /// client receives in full is always on the ledger. A ledger that cannot be written is logged; the
    /// response still goes out.
    async fn bill_completed(&mut self) {
        if let (Some(row), Some(ledger)) = (self.bill("completed"), self.s.ledger.clone())
            && let Err(e) = ledger.record_durably(row).await
        {
            tracing::error!(error = %e, request = %self.name, "usage row not written");
        }
    }

    fn all_finished(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    /// Applies one engine event; returns the choice it concerned, or an error that ends the request.
    fn apply(&mut self, ev: Event) -> Result<usize, String> {
        let stops = self.opts.stop.clone();
        if matches!(ev, Event::Token { .. }) {
            self.queue.take();
        }
        match ev {
            Event::Token { choice, token, logprob, top_logprobs } => {
                let lp = self.opts.logprobs.map(|_| (logprob.unwrap_or(0.0), top_logprobs.as_slice()));
                if self.choices[choice].push(&self.s.tokenizer, token, lp, &stops) {
                    // Stop string: the engine may keep going a step; tell it to stop now.
                    self.abort(choice, Some(FinishReason::Stop));
                }
                Ok(choice)
            }
            Event::Finished { choice, reason, cached_tokens, .. } => {
                // The choices of one prompt share its cached prefix.
                let p = choice / self.opts.n;
                self.cached_tokens[p] = self.cached_tokens[p].max(cached_tokens);
                self.choices[choice].end(&self.s.tokenizer, reason, &stops);
                Ok(choice)
            }
            Event::Error { message, .. } => Err(message),
        }
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens() },
        })
    }

    fn finish_str(c: &ChoiceText) -> Value {
        match c.finish {
            Some(FinishReason::Stop) => json!("stop"),
            Some(FinishReason::Length) => json!("length"),
            None => Value::Null,
        }
    }

    /// A streaming chunk for choice `i` with `delta` text (and whatever logprobs are pending).
    fn chunk(&mut self, i: usize, delta: String, with_finish: bool) -> Option<Value> {
        let lp_entries = self.choices[i].take_logprobs().to_vec();
        let finish = if with_finish { Self::finish_str(&self.choices[i]) } else { Value::Null };
        if delta.is_empty() && lp_entries.is_empty() && finish.is_null() && self.kind == Kind::Completion {
            return None;
        }
        let logprobs = match (self.opts.logprobs, self.kind) {
            (None, _) => Value::Null,
            (Some(_), Kind::Completion) => completion_logprobs(&lp_entries),
            (Some(_), Kind::Chat) => chat_logprobs(&lp_entries),
        };
        let choice = match self.kind {
            Kind::Completion => json!({ "index": i, "text": delta, "logprobs": logprobs, "finish_reason": finish }),
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if !self.sent_role[i] {
                    // The first chunk of a choice only opens the assistant's message, as OpenAI's does.
                    self.sent_role[i] = true;
                    d.insert("role".into(), json!("assistant"));
                    d.insert("content".into(), json!(""));
                } else if !delta.is_empty() {
                    d.insert("content".into(), json!(delta));
                } else if finish.is_null() && lp_entries.is_empty() {
                    return None;
                }
                json!({ "index": i, "delta": d, "logprobs": logprobs, "finish_reason": finish })
            }
        };
        let mut c = json!({
            "id": self.name,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.s.model_name,
            "choices": [choice],
        });
        if self.kind == Kind::Chat {
            c["system_fingerprint"] = Value::Null;
        }
        if self.opts.include_usage {
            c["usage"] = Value::Null;
        }
        Some(c)
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        let reasons = self.finish_reasons();
        // Not billed yet: the client went away, or the replica failed. Bill what was produced.
        let status = if self.all_finished() { "error" } else { "cancelled" };
        if let (Some(row), Some(ledger)) = (self.bill(status), self.s.ledger.as_ref()) {
            ledger.record(row);
        }
        if let Some(slot) = self.slot.as_mut() {
            slot.settle(self.prompt_tokens + completion);
        }
        self.span.record("completion_tokens", completion as i64);
        self.span.record("cached_tokens", self.cached_tokens() as i64);
        self.span.record("finish_reason", reasons.join(","));
        tracing::info_span!(target: "tessera::http", parent: &self.span, "finish", finish_reason = %reasons.join(","))
            .in_scope(|| {});
        // The client went away (or the reply is complete): stop whatever is still running.
        for (i, c) in self.choices.iter().enumerate() {
            if c.finish.is_none() {
                self.abort(i, None);
            }
        }
    }
}

fn backend_error(message: &str) -> ApiError {
    ApiError::unavailable(format!("The model replica failed while serving this request: {message}"))
}

async fn whole_reply(mut r: Reply) -> Response {
    while !r.all_finished() {
        let Some(ev) = r.rx.recv().await else {
            return ApiError::internal("The engine stopped before the request finished.").into_response();
        };
        if let Err(m) = r.apply(ev) {
            return backend_error(&m).into_response();
        }
    }
    r.bill_completed().await;
    let choices: Vec<Value> = r
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let logprobs = match (r.opts.logprobs, r.kind) {
                (None, _) => Value::Null,
                (Some(_), Kind::Completion) => completion_logprobs(&c.logprobs),
                (Some(_), Kind::Chat) => chat_logprobs(&c.logprobs),
            };
            match r.kind {
                Kind::Completion => {
                    json!({ "index": i, "text": c.text, "logprobs": logprobs, "finish_reason": Reply::finish_str(c) })
                }
                Kind::Chat => json!({
                    "index": i,
                    "message": { "role": "assistant", "content": c.text, "refusal": null },
                    "logprobs": logprobs,
                    "finish_reason": Reply::finish_str(c),
                }),
            }
        })
        .collect();
    let mut body = json!({
        "id": r.name,
        "object": if r.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": r.created,
        "model": r.s.model_name,
        "choices": choices,
        "usage": r.usage(),
    });
    if r.kind == Kind::Chat {
        body["system_fingerprint"] = Value::Null;
    }
    Json(body).into_response()
}

fn sse(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// Waits for the request's first event before the stream begins: a request that no replica could serve
/// (they all failed before its first token) gets a plain 503, not a stream that carries an error.
async fn first_event_then_stream(mut r: Reply) -> Response {
    match r.rx.recv().await {
        None => ApiError::internal("The engine stopped before the request finished.").into_response(),
        Some(Event::Error { message, .. }) => backend_error(&message).into_response(),
        Some(ev) => {
            r.pending = Some(ev);
            stream_reply(r)
        }
    }
}

fn stream_reply(mut r: Reply) -> Response {
    r.sent_role = vec![false; r.choices.len()];
    let events = stream::unfold(r, |mut r| async move {
        if r.done {
            return None;
        }
        let mut out = Vec::new();
        if r.kind == Kind::Chat && r.sent_role.iter().any(|s| !s) {
            for i in 0..r.choices.len() {
                if let Some(c) = r.chunk(i, String::new(), false) {
                    out.push(sse(&c));
                }
            }
            return Some((stream::iter(out), r));
        }
        if r.all_finished() {
            r.bill_completed().await;
            if r.opts.include_usage {
                let mut u = json!({
                    "id": r.name,
                    "object": if r.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                    "created": r.created,
                    "model": r.s.model_name,
                    "choices": [],
                    "usage": r.usage(),
                });
                if r.kind == Kind::Chat {
                    u["system_fingerprint"] = Value::Null;
                }
                out.push(sse(&u));
            }
            out.push(Ok(SseEvent::default().data("[DONE]")));
            r.done = true;
            return Some((stream::iter(out), r));
        }
        let next = match r.pending.take() {
            Some(ev) => Some(ev),
            None => r.rx.recv().await,
        };
        match next {
            None => {
                out.push(sse(&ApiError::internal("The engine stopped before the request finished.").body_json()));
                out.push(Ok(SseEvent::default().data("[DONE]")));
                r.done = true;
            }
            Some(ev) => match r.apply(ev) {
                Err(m) => {
                    out.push(sse(&backend_error(&m).body_json()));
                    out.push(Ok(SseEvent::default().data("[DONE]")));
                    r.done = true;
                }
                Ok(i) => {
                    let stops = r.opts.stop.clone();
                    let finished = r.choices[i].finish.is_some();
                    let delta = r.choices[i].take_delta(&stops);
                    if finished && r.kind == Kind::Chat && !delta.is_empty() {
                        // Chat sends the last text and the finish reason in separate chunks, like OpenAI.
                        if let Some(c) = r.chunk(i, delta, false) {
                            out.push(sse(&c));
                        }
                        if let Some(c) = r.chunk(i, String::new(), true) {
                            out.push(sse(&c));
                        }
                    } else if let Some(c) = r.chunk(i, delta, finished) {
                        out.push(sse(&c));
                    }
                }
            },
        }
        Some((stream::iter(out), r))
    })
    .flatten();
    Sse::new(events).into_response()
}
