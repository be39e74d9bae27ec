//! A sequence as the scheduler sees it: its tokens, how far its keys and values are computed, its blocks,
//! its fair-share flow and its place in virtual time.

use std::time::Instant;

use tessera_proto::step::SamplingParams;

use crate::{constrain::Constraint, engine::contract::FinishReason};

/// A sequence as the scheduler sees it.
pub struct Sequence {
    pub id: u64,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub params: SamplingParams,
    /// New tokens allowed.
    pub max_tokens: usize,
    pub ignore_eos: bool,
    /// What its output must match (structured outputs): the mask for its next token, after the tokens so far.
    pub constraint: Option<Constraint>,
    /// The LoRA adapter it runs with (its workers' id for it; 0: the base model). Its prefix-cache chain
    /// is the adapter's own.
    pub adapter: u32,
    pub arrival: Instant,
    /// When it was first scheduled (end of queueing).
    pub first_scheduled: Option<Instant>,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: usize,
    pub(super) blocks: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    pub(super) num_computed: usize,
    /// Full blocks registered in the prefix cache, and the chained hash after the last of them.
    pub(super) num_hashed: usize,
    pub(super) last_hash: u64,
    /// Admitted (or re-admitted) and not yet stepped: the next step begins it on the workers.
    pub(super) fresh: bool,
    /// Its last token is a placeholder for the one the step in flight samples (`in_flight`).
    pub(super) pending: bool,
    /// In the step in flight as it was sent (not preempted since).
    pub(super) launched: bool,
    /// Fair-share flow (the API key id; `None`: the flow of requests without a key) and its weight.
    pub flow: Option<String>,
    pub weight: f64,
    /// Virtual start and finish tags of the current wait in the queue.
    pub(super) start_tag: f64,
    pub(super) finish_tag: f64,
}

impl Sequence {
    pub fn new(id: u64, prompt: Vec<u32>, params: SamplingParams, max_tokens: usize, ignore_eos: bool) -> Self {
        Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            params,
            max_tokens,
            ignore_eos,
            constraint: None,
            adapter: 0,
            arrival: Instant::now(),
            first_scheduled: None,
            cached_tokens: 0,
            blocks: Vec::new(),
            num_computed: 0,
            num_hashed: 0,
            last_hash: 0,
            fresh: true,
            pending: false,
            launched: false,
            flow: None,
            weight: 1.0,
            start_tag: 0.0,
            finish_tag: 0.0,
        }
    }

    /// Puts the sequence in fair-share flow `flow` with `weight` (> 0; larger gets more).
    pub fn in_flow(mut self, flow: Option<String>, weight: f64) -> Self {
        self.flow = flow;
        self.weight = if weight.is_finite() && weight > 0.0 { weight } else { 1.0 };
        self
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens not yet in the cache.
    pub(super) fn remaining(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Its last token was just sampled: advances its constraint, and says whether it finished (`eos` are the
    /// end-of-sequence ids; no sequence grows past `max_model_len`).
    pub(super) fn took_token(&mut self, eos: &[u32], max_model_len: usize) -> Option<FinishReason> {
        let token = *self.tokens.last().expect("a token was just sampled");
        // A constraint that is complete ends the choice as an end-of-sequence would; one the token broke
        // (it was sampled without the mask, which cannot happen) ends it too rather than go on unchecked.
        let id = self.id;
        let complete = self.constraint.as_mut().is_some_and(|c| {
            c.advance(token).unwrap_or_else(|e| {
                tracing::error!(sequence = id, "{e}");
                true
            })
        });
        if (!self.ignore_eos && eos.contains(&token)) || complete {
            Some(FinishReason::Stop)
        } else if self.generated().len() >= self.max_tokens || self.tokens.len() >= max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// Back to nothing computed and no blocks (preempted, to be recomputed).
    pub(super) fn reset(&mut self) {
        self.blocks.clear();
        self.num_computed = 0;
        self.num_hashed = 0;
        self.last_hash = 0;
        self.fresh = true;
        self.launched = false;
    }

    /// Its tokens but a placeholder (`in_flight`).
    pub(super) fn known_tokens(&self) -> &[u32] {
        &self.tokens[..self.tokens.len() - self.pending as usize]
    }

    /// It holds a placeholder for its last allowed token: whatever is sampled, it then finishes.
    pub(super) fn ends_with_pending(&self, max_model_len: usize) -> bool {
        self.pending && (self.generated().len() >= self.max_tokens || self.tokens.len() >= max_model_len)
    }
}
