//! A request in flight, from submission to its last event: its choices as the engine's events build them,
//! its usage, and its billing (per-key metrics, the ledger row, the key's reserved tokens), which happens
//! once whether the reply completes, fails or is dropped by a client that went away.

use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicBool, Ordering},
};

use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::{
    auth::KeyEntry, error::ApiError, limits::Slot, output::ChoiceText, request::Options, state::AppState,
    tools::ToolStream,
};
use crate::engine::contract::{Event, FinishReason};

/// Which endpoint a request came in on, and so the shape of its answer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Completion,
    Chat,
}

/// A request in flight and everything needed to answer it.
pub(super) struct Reply {
    pub(super) s: Arc<AppState>,
    pub(super) kind: Kind,
    /// The model as the request named it (the base model, or a LoRA adapter): what the response, the
    /// ledger and the per-key metrics say.
    pub(super) model: String,
    /// The engine request of each prompt (one, except for a batch of completions); choice `i` is choice
    /// `i % n` of request `i / n`.
    pub(super) ids: Vec<u64>,
    pub(super) name: String,
    pub(super) created: u64,
    /// Of all its prompts.
    pub(super) prompt_tokens: usize,
    pub(super) choices: Vec<ChoiceText>,
    /// Per prompt.
    pub(super) cached_tokens: Vec<usize>,
    pub(super) opts: Options,
    pub(super) rx: Arc<Inbox>,
    pub(super) sent_role: Vec<bool>,
    /// A streamed chat with tools: each choice's tool-call state (empty otherwise).
    pub(super) tool_streams: Vec<ToolStream>,
    pub(super) done: bool,
    /// An event received before the stream began, to be sent first.
    pub(super) pending: Option<Event>,
    /// The request's span; its token counts and finish reason are recorded when it ends.
    pub(super) span: tracing::Span,
    /// Open from submission to the first token.
    pub(super) queue: Option<tracing::Span>,
    /// The key's hold on its limits: unused reserved tokens go back, and the concurrency slot frees, when
    /// the reply ends.
    pub(super) slot: Option<Slot>,
    /// Who is billed (`None` without keys).
    pub(super) key: Option<Arc<KeyEntry>>,
    /// Unix seconds at admission.
    pub(super) started_at: f64,
    /// The request's usage has been counted (ledger row and per-key metrics): it happens once, when the
    /// reply completes, or else when it is dropped.
    pub(super) billed: bool,
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
            m.key_requests
                .get_or_create(&vec![
                    ("key_id", k.id.clone()),
                    ("status", status.to_string()),
                    ("adapter", self.adapter()),
                ])
                .inc();
            for (kind, n) in
                [("prompt", self.prompt_tokens), ("cached", self.cached_tokens()), ("completion", completion)]
            {
                m.key_tokens
                    .get_or_create(&vec![
                        ("key_id", k.id.clone()),
                        ("kind", kind.to_string()),
                        ("adapter", self.adapter()),
                    ])
                    .inc_by(n as u64);
            }
        }
        self.s.ledger.as_ref()?;
        Some(crate::usage::UsageRecord {
            request_id: self.name.clone(),
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            tenant: self.key.as_ref().map(|k| k.tenant.clone()),
            model: self.model.clone(),
            prompt_tokens: self.prompt_tokens as u64,
            cached_tokens: self.cached_tokens() as u64,
            completion_tokens: completion as u64,
            status,
            finish_reason: self.finish_reasons().join(","),
            started_at: self.started_at,
            ended_at: crate::usage::unix_seconds(),
        })
    }

    /// The per-key metrics' `adapter` label: the LoRA adapter's name, empty for the base model (whose
    /// name every series carries already).
    fn adapter(&self) -> String {
        if self.model == self.s.model_name { String::new() } else { self.model.clone() }
    }

    /// Bills a completed request and waits for its ledger row to be committed, so that a response the
    /// client receives in full is always on the ledger. A ledger that cannot be written is logged; the
    /// response still goes out.
    pub(super) async fn bill_completed(&mut self) {
        if let (Some(row), Some(ledger)) = (self.bill("completed"), self.s.ledger.clone())
            && let Err(e) = ledger.record_durably(row).await
        {
            tracing::error!(error = %e, request = %self.name, "usage row not written");
        }
    }

    pub(super) fn all_finished(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    /// Applies one engine event; returns the choice it concerned, or an error that ends the request.
    pub(super) fn apply(&mut self, ev: Event) -> Result<usize, String> {
        let stops = self.opts.stop.clone();
        if matches!(ev, Event::Token { .. }) {
            self.queue.take();
        }
        match ev {
            Event::Token { choice, token, logprob, top_logprobs } => {
                let lp = self.opts.logprobs.map(|_| (logprob.unwrap_or(0.0), top_logprobs));
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
            Event::Prompt { choice, first_position, tokens, ranks } => {
                if let Some(p) = self.choices[choice].prompt.as_mut() {
                    p.record(first_position, &tokens, &ranks);
                }
                Ok(choice)
            }
            Event::Error { message, .. } => Err(message),
        }
    }

    pub(super) fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens() },
        })
    }

    pub(super) fn finish_str(c: &ChoiceText) -> Value {
        match c.finish {
            Some(FinishReason::Stop) => json!("stop"),
            Some(FinishReason::Length) => json!("length"),
            None => Value::Null,
        }
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

/// The request's event channel, which a stream's watch (`stream::watch`) also looks at: the events the engine
/// sent that the reply has not taken yet.
pub(super) struct Inbox {
    rx: Mutex<UnboundedReceiver<Event>>,
    /// Closed by the watch because the client stopped reading.
    stalled: AtomicBool,
}

/// What the watch found.
pub(super) enum Backlog {
    /// The engine may still send: look again later.
    Open,
    /// The engine has sent its last event for this request.
    Closed,
    /// More than the limit were waiting: the channel was closed (the engine drops the request's sequences
    /// before its next step, as for a client that disconnected) and the waiting events dropped.
    Stalled { pending: usize },
}

impl Inbox {
    pub(super) fn new(rx: UnboundedReceiver<Event>) -> Arc<Self> {
        Arc::new(Inbox { rx: Mutex::new(rx), stalled: AtomicBool::new(false) })
    }

    fn rx(&self) -> std::sync::MutexGuard<'_, UnboundedReceiver<Event>> {
        self.rx.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next event; `None` once the engine holds no sender (or the channel was closed for a stall).
    pub(super) async fn recv(&self) -> Option<Event> {
        std::future::poll_fn(|cx| self.rx().poll_recv(cx)).await
    }

    /// Whether the watch closed the channel because the client stopped reading.
    pub(super) fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    /// Closes the channel if more than `limit` events are waiting.
    pub(super) fn check(&self, limit: usize) -> Backlog {
        let mut rx = self.rx();
        let pending = rx.len();
        if pending > limit {
            self.stalled.store(true, Ordering::Release);
            rx.close();
            while rx.try_recv().is_ok() {}
            Backlog::Stalled { pending }
        } else if rx.is_closed() {
            Backlog::Closed
        } else {
            Backlog::Open
        }
    }
}

pub(super) fn backend_error(message: &str) -> ApiError {
    ApiError::unavailable(format!("The model replica failed while serving this request: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Event {
        Event::Token { choice: 0, token: 1, logprob: None, top_logprobs: vec![] }
    }

    #[tokio::test]
    async fn an_inbox_with_too_many_events_waiting_is_closed_and_emptied() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let inbox = Inbox::new(rx);
        (0..3).for_each(|_| tx.send(token()).unwrap());
        assert!(matches!(inbox.check(3), Backlog::Open));
        assert_eq!(inbox.recv().await, Some(token()));
        (0..2).for_each(|_| tx.send(token()).unwrap());
        assert!(matches!(inbox.check(3), Backlog::Stalled { pending: 4 }));
        // The engine sees the channel closed, as for a client that went away, and the reply sees no more.
        assert!(tx.is_closed() && tx.send(token()).is_err());
        assert!(inbox.stalled());
        assert_eq!(inbox.recv().await, None);
    }

    #[tokio::test]
    async fn an_inbox_the_engine_is_done_with_needs_no_more_watching() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let inbox = Inbox::new(rx);
        tx.send(token()).unwrap();
        drop(tx);
        assert!(matches!(inbox.check(3), Backlog::Closed));
        assert!(!inbox.stalled());
        assert_eq!(inbox.recv().await, Some(token()));
    }
}
