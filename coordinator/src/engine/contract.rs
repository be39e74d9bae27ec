//! The engine contract: everything the HTTP side and an engine loop exchange, in one place (as vLLM keeps
//! its `EngineCoreRequest` and outputs in `v1/engine/__init__.py`).
//!
//! A handler builds a [`GenRequest`] (one sequence per choice, ids from [`seq_id`]) with the sending half
//! of a channel, submits it through `Replicas`, and reads [`Event`]s until each of its choices has
//! `Finished` or failed with an `Error`. Dropping the receiver aborts the request. A new request parameter
//! that the engine must see goes into [`GenRequest`] (or its `SamplingParams`, when workers must see it).

use serde::Serialize;
use tessera_proto::step::{Sampled, SamplingParams};
use tokio::sync::mpsc::UnboundedSender;

use crate::constrain::Constraint;

/// Why a choice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End of sequence, or a stop string.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
}

impl FinishReason {
    /// As OpenAI's `finish_reason` (and the metrics' `finished_reason` label) spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Choices per request are encoded in the low bits of sequence ids.
pub const MAX_CHOICES: usize = 128;

/// What a handler hears about one of its choices.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Prompt tokens scored (the request asked for prompt logprobs): `tokens[i]` is the prompt's token at
    /// position `first_position + i`, with its rank. Sent before the choice's first token; a prefill
    /// recomputed after a preemption or a failover may send positions again.
    Prompt {
        choice: usize,
        first_position: usize,
        tokens: Vec<Sampled>,
        ranks: Vec<u32>,
    },
    Token {
        choice: usize,
        token: u32,
        logprob: Option<f32>,
        top_logprobs: Vec<(u32, f32)>,
    },
    Finished {
        choice: usize,
        reason: FinishReason,
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    Error {
        choice: usize,
        message: String,
    },
}

pub struct GenRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    /// Structured outputs: what every choice's text must match, with the mask for its first token; each
    /// choice follows its own copy.
    pub constraint: Option<Constraint>,
    /// The LoRA adapter to run with, by its workers' id ([`crate::lora`]); 0: the base model.
    pub adapter: u32,
    pub n: usize,
    /// The index its first choice has in the response: a completion of several prompts is a request per
    /// prompt, and their choices are numbered on through the prompts, as OpenAI numbers them.
    pub first_choice: usize,
    /// Fair-share flow (API key id) and weight.
    pub flow: Option<String>,
    pub weight: f64,
    pub events: UnboundedSender<Event>,
    /// The request's span: steps it takes part in are its children or linked to it.
    pub span: tracing::Span,
}

impl GenRequest {
    /// A request of one choice on the base model: no constraint, no flow (weight 1), stopping at an end
    /// of sequence, in the current span. Callers change what differs with struct update syntax.
    pub fn one(
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        max_tokens: usize,
        events: UnboundedSender<Event>,
    ) -> Self {
        GenRequest {
            id,
            prompt,
            params,
            max_tokens,
            ignore_eos: false,
            constraint: None,
            adapter: 0,
            n: 1,
            first_choice: 0,
            flow: None,
            weight: 1.0,
            events,
            span: tracing::Span::current(),
        }
    }
}

/// The id of a request's choice: choices are the low bits of sequence ids.
pub fn seq_id(request: u64, choice: usize) -> u64 {
    request * MAX_CHOICES as u64 + choice as u64
}
