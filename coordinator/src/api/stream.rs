//! The answer to a request that streams: server-sent events, one chunk per piece of text (or finish) of a
//! choice, shaped as OpenAI's `text_completion` or `chat.completion.chunk`, then the usage chunk if asked
//! for, then `[DONE]`. A failure after the stream began can only be told in the stream: an error event,
//! then `[DONE]`.
//!
//! A client that stops reading stops its request: while the socket's buffers are full the body is not polled
//! and the engine's events wait in the request's channel; a watch stops the request once more than
//! [`MAX_PENDING_EVENTS`] wait, so that neither the events nor the generation go on without bound.

use std::{
    convert::Infallible,
    sync::{Arc, Weak},
    time::Duration,
};

use axum::response::{
    IntoResponse, Response,
    sse::{Event as SseEvent, Sse},
};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};

use super::{
    error::ApiError,
    output::{LogprobsJson, PromptLogprobsJson, TokenLp},
    reply::{Backlog, Inbox, Kind, Reply, backend_error},
    tools,
};
use crate::{engine::contract::Event, tool_calls::Delta};

type Events = Vec<Result<SseEvent, Infallible>>;

/// Events a stream may have waiting for its client before its request is stopped. A client that reads keeps
/// the backlog near one step's events of its choices (at most 128); more wait only while it does not read
/// and the socket's buffers are full. An event takes at most about 250 bytes (a token with 20 alternatives),
/// so this bounds a stalled stream's backlog to about 4 MB, and still lets a client pause reading for over
/// two seconds with 128 choices of a fast model (50 steps a second), minutes with one choice.
pub(super) const MAX_PENDING_EVENTS: usize = 16_384;

/// How often a stream's backlog is checked. The engine can add this long's events past the bound (one
/// 128-choice stream of a fast model: some 600); a check is a lock and a load, once per stream per period.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Waits for the request's first event before the stream begins: a request that no replica could serve
/// (they all failed before its first token) gets a plain 503, not a stream that carries an error.
pub(super) async fn first_event_then_stream(mut r: Reply) -> Response {
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
    tokio::spawn(watch(Arc::downgrade(&r.rx), r.name.clone()));
    let events = stream::unfold(r, next_events).flatten();
    Sse::new(events).into_response()
}

/// The events that come next in the stream; `None` once `[DONE]` has gone out.
async fn next_events(mut r: Reply) -> Option<(stream::Iter<std::vec::IntoIter<Result<SseEvent, Infallible>>>, Reply)> {
    if r.done {
        return None;
    }
    let out = if r.kind == Kind::Chat && r.sent_role.iter().any(|s| !s) {
        opening_chunks(&mut r)
    } else if r.all_finished() {
        closing_events(&mut r).await
    } else {
        let next = match r.pending.take() {
            Some(ev) => Some(ev),
            None => r.rx.recv().await,
        };
        event_chunks(&mut r, next)
    };
    Some((stream::iter(out), r))
}

/// Watches a stream's backlog until the stream ends or the engine is done with it, and stops the request
/// when its client has stopped reading.
async fn watch(inbox: Weak<Inbox>, name: String) {
    let mut every = tokio::time::interval(WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(inbox) = inbox.upgrade() else { return };
        match inbox.check(MAX_PENDING_EVENTS) {
            Backlog::Open => {}
            Backlog::Closed => return,
            Backlog::Stalled { pending } => {
                tracing::warn!(target: "tessera::http", request = %name, pending, "the client stopped reading its stream: request stopped");
                return;
            }
        }
    }
}

/// Chat's first chunk of each choice, which opens the assistant's message before any text.
fn opening_chunks(r: &mut Reply) -> Events {
    let mut out = Vec::new();
    for i in 0..r.choices.len() {
        if let Some(c) = chunk(r, i, String::new(), false) {
            out.push(sse(&c));
        }
    }
    out
}

/// Billing comes before the last events, so that a client that saw `[DONE]` finds the request on the ledger.
async fn closing_events(r: &mut Reply) -> Events {
    let mut out = Vec::new();
    r.bill_completed().await;
    if r.opts.include_usage {
        let mut u = json!({
            "id": r.name,
            "object": if r.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": r.created,
            "model": r.model,
            "choices": [],
            "usage": r.usage(),
        });
        if r.kind == Kind::Chat {
            u["system_fingerprint"] = Value::Null;
        }
        out.push(sse(&u));
    }
    out.push(done());
    r.done = true;
    out
}

/// The chunks for one engine event, or for the engine having gone (`None`).
fn event_chunks(r: &mut Reply, next: Option<Event>) -> Events {
    let i = match next.map(|ev| r.apply(ev)) {
        None if r.rx.stalled() => {
            return failed(
                r,
                ApiError::invalid(
                    None,
                    format!(
                        "The client stopped reading the stream: more than {MAX_PENDING_EVENTS} events waited for it, \
                         and the request was stopped."
                    ),
                )
                .with_code("stream_not_read"),
            );
        }
        None => return failed(r, ApiError::internal("The engine stopped before the request finished.")),
        Some(Err(m)) => return failed(r, backend_error(&m)),
        Some(Ok(i)) => i,
    };
    let mut out = Vec::new();
    let stops = r.opts.stop.clone();
    let finished = r.choices[i].finish.is_some();
    let delta = r.choices[i].take_delta(&stops);
    if finished && r.kind == Kind::Chat && !delta.is_empty() {
        // Chat sends the last text and the finish reason in separate chunks, like OpenAI.
        if let Some(c) = chunk(r, i, delta, false) {
            out.push(sse(&c));
        }
        if let Some(c) = chunk(r, i, String::new(), true) {
            out.push(sse(&c));
        }
    } else if let Some(c) = chunk(r, i, delta, finished) {
        out.push(sse(&c));
    }
    out
}

/// Ends a stream that has already begun: its status line is sent, so the error goes in an event.
fn failed(r: &mut Reply, e: ApiError) -> Events {
    r.done = true;
    vec![sse(&e.body_json()), done()]
}

/// A streaming chunk for choice `i` with `delta` text (and whatever logprobs are pending).
fn chunk(r: &mut Reply, i: usize, mut delta: String, with_finish: bool) -> Option<Value> {
    let mut lp_entries = r.choices[i].take_logprobs();
    let mut finish = if with_finish { Reply::finish_str(&r.choices[i]) } else { Value::Null };
    if delta.is_empty() && lp_entries.is_empty() && finish.is_null() && r.kind == Kind::Completion {
        return None;
    }
    let prompt_logprobs = with_prompt(r, i, &mut delta, &mut lp_entries);
    let logprobs = match r.opts.logprobs {
        None => Value::Null,
        Some(_) => {
            let lp = LogprobsJson { chat: r.kind == Kind::Chat, tok: &r.s.tokenizer, entries: &lp_entries };
            serde_json::to_value(lp).unwrap_or(Value::Null)
        }
    };
    let choice = match r.kind {
        Kind::Completion => {
            let mut c = json!({ "index": i, "text": delta, "logprobs": logprobs, "finish_reason": finish });
            if let Some(p) = prompt_logprobs {
                c["prompt_logprobs"] = p;
            }
            c
        }
        Kind::Chat => {
            let mut d = serde_json::Map::new();
            if !r.sent_role[i] {
                // The first chunk of a choice only opens the assistant's message, as OpenAI's does.
                r.sent_role[i] = true;
                d.insert("role".into(), json!("assistant"));
                d.insert("content".into(), json!(""));
            } else if let Some(ts) = r.tool_streams.get_mut(i) {
                let (content, calls) = tool_deltas(ts.push(&delta, with_finish), &r.name, i);
                if !content.is_empty() {
                    d.insert("content".into(), json!(content));
                }
                if !calls.is_empty() {
                    d.insert("tool_calls".into(), Value::Array(calls));
                }
                // OpenAI ends a choice that called tools with `tool_calls`.
                if finish == "stop" && ts.ends_with_calls() {
                    finish = json!("tool_calls");
                }
                if d.is_empty() && finish.is_null() && lp_entries.is_empty() {
                    return None;
                }
            } else if !delta.is_empty() {
                d.insert("content".into(), json!(delta));
            } else if finish.is_null() && lp_entries.is_empty() {
                return None;
            }
            json!({ "index": i, "delta": d, "logprobs": logprobs, "finish_reason": finish })
        }
    };
    let mut c = json!({
        "id": r.name,
        "object": if r.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": r.created,
        "model": r.model,
        "choices": [choice],
    });
    if r.kind == Kind::Chat {
        c["system_fingerprint"] = Value::Null;
    }
    if r.opts.include_usage {
        c["usage"] = Value::Null;
    }
    Some(c)
}

/// A completion choice's prompt, in its first chunk: with `echo` its text and logprob entries go before
/// the completion's (whose offsets then count from after the prompt's text); with `prompt_logprobs`,
/// returned, those.
fn with_prompt(r: &mut Reply, i: usize, delta: &mut String, lp_entries: &mut Vec<TokenLp>) -> Option<Value> {
    if r.kind != Kind::Completion {
        return None;
    }
    let p = r.choices[i].prompt.as_mut()?;
    if r.opts.echo {
        for e in lp_entries.iter_mut() {
            e.offset += p.text.len();
        }
    }
    if std::mem::replace(&mut p.sent, true) {
        return None;
    }
    if r.opts.echo {
        delta.insert_str(0, &p.text);
        if let Some(k) = r.opts.logprobs {
            lp_entries.splice(0..0, p.entries(k));
        }
    }
    let k = r.opts.prompt_logprobs?;
    serde_json::to_value(PromptLogprobsJson { tok: &r.s.tokenizer, prompt: p, k }).ok()
}

/// A streamed choice's text and call deltas (choice `choice` of response `response`), as a chat chunk's
/// `content` and `tool_calls`: a call's first delta has its index, id, type and name; the rest add to its
/// arguments.
fn tool_deltas(deltas: Vec<Delta>, response: &str, choice: usize) -> (String, Vec<Value>) {
    let (mut content, mut calls) = (String::new(), Vec::new());
    for d in deltas {
        match d {
            Delta::Content(t) => content.push_str(&t),
            Delta::CallStart { index, name } => calls.push(json!({
                "index": index, "id": tools::call_id(response, choice, index), "type": "function",
                "function": {"name": name, "arguments": ""},
            })),
            Delta::Arguments { index, fragment } => {
                calls.push(json!({"index": index, "function": {"arguments": fragment}}));
            }
        }
    }
    (content, calls)
}

fn sse(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

fn done() -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data("[DONE]"))
}
