//! Continuous batching: which sequences run in the next step, how many of their tokens, in which KV blocks.
//!
//! The scheduler is plain state over two queues and the [`BlockManager`]; it runs no model, so its policy
//! is tested directly. Each step, within a token budget:
//! 1. every running sequence that only needs its next token (a decode) gets one;
//! 2. running sequences still prefilling get a chunk of their prompt (chunked prefill);
//! 3. waiting sequences are admitted while the budget, `max_num_seqs` and the pool allow, first mapping
//!    whatever prefix of them the prefix cache holds.
//!
//! Admission order is weighted fair queuing across flows (API keys; requests without a key share one
//! flow): start-time fair queuing, where a request's tag is where its flow's previous request ends in
//! virtual time, or the current virtual time if that is later, plus its cost (prompt + `max_tokens`)
//! divided by its flow's weight. The queue is kept in tag order, so a flow with one request waiting goes
//! ahead of another flow's backlog. When every slot is taken and the head of the queue belongs to a flow
//! with nothing running while another flow runs two or more, the newest sequence of the flow running the
//! most is preempted (recomputed later, behind its flow's share), so one tenant's flood cannot hold all
//! the slots against another's single request. With one flow this is plain arrival order.
//!
//! A newcomer (the head of the queue, from a flow with nothing running) can get a step of its own ahead of
//! the decodes, when the replica's [`StepCost`] says the decodes would delay its first token by more than
//! the extra step costs them (compute-bound backends); never twice in a row, so decodes advance at least
//! every other step. When the step in flight can pause (between half-layers, an in-process backend), a
//! newcomer arriving meanwhile gets its step in the middle of it ([`Scheduler::schedule_during`]): it then
//! waits for an attention or an MLP of the decodes, not for all of them.
//!
//! A decode that needs a new block when none is free preempts the most recently admitted sequence: its
//! blocks are released and it goes back to the front of the queue to be recomputed (prompt plus what it
//! generated so far) when there is room.
//!
//! - `sequence`: a sequence as the scheduler sees it;
//! - `in_flight`: planning the next step while one is in flight (placeholders for the tokens it samples);
//! - `queue`: the waiting queue in fair-queuing order, and the preemption victim for fairness;
//! - `running`: the running batch, kept between steps and updated as sequences come and go;
//! - `blocks`: the paged KV block manager, with the prefix cache;
//! - `step_cost`: what a step of each size costs on this replica, measured.

mod blocks;
mod in_flight;
mod queue;
mod running;
mod sequence;
mod step_cost;

use std::time::Instant;

use tessera_proto::step::{Sampled, ScorePrompt, SeqSampled, StepSeq};

use crate::constrain::{self, Constraint};
use crate::engine::contract::FinishReason;

use self::{
    blocks::BlockManager,
    queue::{FairQueue, fairness_victim},
    running::Running,
    step_cost::StepCost,
};
pub use self::{
    blocks::{block_hash, prefix_root},
    sequence::Sequence,
};

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (decodes count one each).
    pub max_batched_tokens: usize,
    /// The model's context: no sequence grows past it.
    pub max_model_len: usize,
    /// Plan the next step while one runs, where the backend runs steps off the engine loop's thread
    /// (`Backend::can_overlap`).
    pub overlap: bool,
}

/// One sequence's share of a planned step: compute tokens `start..end`, sample after them if `sample`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    pub id: u64,
    pub start: usize,
    pub end: usize,
    pub sample: bool,
}

/// What a step did to one sequence.
#[derive(Debug)]
pub struct Outcome {
    pub id: u64,
    pub sampled: Sampled,
    pub finished: Option<FinishReason>,
    /// Prompt tokens the prefix cache served at admission.
    pub cached_tokens: usize,
    /// The sequence's first generated token.
    pub first: bool,
}

/// Counters of what the scheduler did, and the pool's state, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub preemptions: u64,
    /// Steps planned for newcomers alone.
    pub newcomer_steps: u64,
    /// Of which run while another step was paused.
    pub steps_paused: u64,
    /// Prefix-cache lookups, and the blocks they found.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub blocks_used: usize,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    waiting: FairQueue,
    /// In admission order: preemption takes from the back.
    running: Running,
    preemptions: u64,
    newcomer_steps: u64,
    steps_paused: u64,
    /// What steps cost on this replica (fed by the engine loop).
    step_cost: StepCost,
    /// The last step planned was a newcomer's own.
    newcomer_step: bool,
}

impl Scheduler {
    /// A scheduler over a pool of `num_blocks` KV blocks of `block_size` tokens.
    pub fn new(cfg: SchedulerConfig, num_blocks: usize, block_size: usize) -> Self {
        Scheduler {
            cfg,
            blocks: BlockManager::new(num_blocks, block_size),
            waiting: FairQueue::default(),
            running: Running::default(),
            preemptions: 0,
            newcomer_steps: 0,
            steps_paused: 0,
            step_cost: StepCost::default(),
            newcomer_step: false,
        }
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            preemptions: self.preemptions,
            newcomer_steps: self.newcomer_steps,
            steps_paused: self.steps_paused,
            prefix_cache_queries: self.blocks.stats.queries,
            prefix_cache_hits: self.blocks.stats.hits,
            blocks_used: self.blocks.num_used(),
        }
    }

    /// A step of `tokens` tokens took `seconds` on the backend (what newcomer steps are judged by).
    pub fn observe_step(&mut self, tokens: usize, seconds: f64, now: Instant) {
        self.step_cost.observe(tokens, seconds, now);
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push(seq);
    }

    /// Makes room for the head of the queue when its flow has nothing running and another flow holds two
    /// or more slots: that flow's newest sequence is preempted and queued again as its flow's next request.
    fn preempt_for_fairness(&mut self) -> bool {
        if !self.waiting.head_is_newcomer(&self.running) {
            return false;
        }
        let Some(i) = fairness_victim(&self.running) else { return false };
        self.preempt_at(i);
        true
    }

    /// Preempts `running[i]` and queues it again as its flow's next request.
    fn preempt_at(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        self.blocks.release(&seq.blocks);
        seq.reset();
        self.preemptions += 1;
        self.add(seq);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Ids of every sequence, running or waiting.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.running.iter().chain(self.waiting.iter()).map(|s| s.id)
    }

    /// Whether any sequence, running or waiting, runs with LoRA adapter `id`.
    pub fn uses_adapter(&self, id: u32) -> bool {
        self.running.iter().chain(self.waiting.iter()).any(|s| s.adapter == id)
    }

    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.running.get(id).or_else(|| self.waiting.iter().find(|s| s.id == id))
    }

    /// Removes a sequence wherever it is and frees its blocks at once.
    pub fn abort(&mut self, id: u64) -> Option<Sequence> {
        let seq =
            if let Some(i) = self.running.position(id) { self.running.remove(i) } else { self.waiting.remove(id)? };
        self.blocks.release(&seq.blocks);
        Some(seq)
    }

    fn preempt_last(&mut self) -> Option<u64> {
        let mut seq = self.running.pop()?;
        self.blocks.release(&seq.blocks);
        seq.reset();
        self.preemptions += 1;
        let id = seq.id;
        self.waiting.push_front(seq);
        Some(id)
    }

    /// Grows `running[i]`'s block table to cover `end` tokens; false if the pool is dry.
    fn grow(&mut self, i: usize, end: usize) -> bool {
        let need = end.div_ceil(self.blocks.block_size());
        let have = self.running[i].blocks.len();
        if need <= have {
            return true;
        }
        match self.blocks.allocate_n(need - have) {
            Some(b) => {
                self.running[i].blocks.extend(b);
                true
            }
            None => false,
        }
    }

    /// Plans the next step. Sequences are in a consistent state whatever happens to the step: a failed
    /// step can be retried or its sequences aborted.
    pub fn schedule(&mut self) -> Vec<Planned> {
        let mut plan = Vec::new();
        let mut budget = self.cfg.max_batched_tokens;
        let now = Instant::now();
        // 0. A newcomer admitted in the middle of a step over full slots: the slot it took is given back now.
        while self.running.len() > self.cfg.max_num_seqs {
            let Some(i) = fairness_victim(&self.running) else { break };
            self.preempt_at(i);
        }
        // A flow with nothing running waits behind full slots only while no other flow holds several.
        if self.running.len() >= self.cfg.max_num_seqs {
            self.preempt_for_fairness();
        }
        if self.newcomer_step_pays(now) {
            self.newcomer_step = true;
            self.admit(&mut plan, budget, now, true, self.cfg.max_num_seqs);
            if !plan.is_empty() {
                self.newcomer_steps += 1;
                return plan;
            }
        }
        self.newcomer_step = false;

        // 1. Decodes, in admission order; preempt from the back when blocks run out.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            // A sequence that finishes whatever the step in flight samples needs no decode.
            if self.running[i].remaining() != 1 || self.running[i].ends_with_pending(self.cfg.max_model_len) {
                i += 1;
                continue;
            }
            let end = self.running[i].tokens.len();
            while !self.grow(i, end) {
                let victim = self.preempt_last();
                if victim.is_none() || i >= self.running.len() {
                    // This sequence was itself the last one: it waits, and so does everyone after it.
                    return plan;
                }
            }
            plan.push(Planned { id: self.running[i].id, start: end - 1, end, sample: true });
            budget -= 1;
            i += 1;
        }

        // 2. Chunks of running prefills (they are not preempted for: they wait for blocks instead).
        for i in 0..self.running.len() {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            // One remaining token is a decode: scheduled above, or left for the next step with the budget.
            if s.remaining() <= 1 {
                continue;
            }
            let start = s.num_computed;
            let end = start + s.remaining().min(budget);
            if !self.grow(i, end) {
                break;
            }
            plan.push(Planned { id: self.running[i].id, start, end, sample: end == self.running[i].tokens.len() });
            budget -= end - start;
        }

        // 3. Admit waiting sequences, in fair-queuing order.
        self.admit(&mut plan, budget, now, false, self.cfg.max_num_seqs);
        plan
    }

    /// Plans a step to run while the step in flight (planned by [`Scheduler::schedule`], not yet applied, of
    /// `in_flight_tokens` tokens) is paused: the newcomers at the head of the queue, when a step of their
    /// own pays as in `schedule` against the rest of that step.
    /// The sequences in flight are left alone (nothing is preempted now). When every slot is taken, the
    /// newcomer takes one over the limit where fairness would preempt for it, and the next `schedule`
    /// preempts that flow's newest, so no step runs more than `max_num_seqs` sequences.
    pub fn schedule_during(&mut self, in_flight_tokens: usize, now: Instant) -> Vec<Planned> {
        let mut plan = Vec::new();
        // The step in flight is itself a newcomer's: decodes come next.
        if self.newcomer_step || !self.newcomer_waiting(now, in_flight_tokens) {
            return plan;
        }
        let max_seqs = if self.running.len() < self.cfg.max_num_seqs {
            self.cfg.max_num_seqs
        } else if fairness_victim(&self.running).is_some() {
            self.running.len() + 1
        } else {
            return plan;
        };
        self.admit(&mut plan, self.cfg.max_batched_tokens, now, true, max_seqs);
        if !plan.is_empty() {
            self.newcomer_steps += 1;
            self.steps_paused += 1;
        }
        plan
    }

    /// Whether the head of the queue is a newcomer worth a step of its own: a slot is free for it, its flow
    /// has nothing running while others decode, the decodes would cost it more than the step costs them
    /// (or a step of its size needs measuring: see [`StepCost`]), and the last step was not already one.
    fn newcomer_step_pays(&self, now: Instant) -> bool {
        let decodes = self.running.iter().filter(|s| s.remaining() == 1).count();
        let joined = decodes + self.waiting.front().map_or(0, |h| h.tokens.len());
        !self.newcomer_step && self.running.len() < self.cfg.max_num_seqs && self.newcomer_waiting(now, joined)
    }

    /// The head of the queue is a newcomer (its flow has nothing running) while others decode, and a step
    /// of its own gets its first token out sooner than waiting for (or joining) a step of `wait_for`
    /// tokens, by more than it costs the decodes.
    fn newcomer_waiting(&self, now: Instant, wait_for: usize) -> bool {
        let Some(head) = self.waiting.front() else { return false };
        if !self.waiting.head_is_newcomer(&self.running) {
            return false;
        }
        let decodes = self.running.iter().any(|s| s.remaining() == 1);
        let prefill = head.tokens.len().min(self.cfg.max_batched_tokens);
        decodes && self.step_cost.separate_prefill_pays(prefill, wait_for.min(self.cfg.max_batched_tokens), now)
    }

    /// Admits waiting sequences in queue order while the budget, the pool and `max_seqs` running allow;
    /// with `newcomers_only`, only while the head's flow has nothing running.
    fn admit(
        &mut self,
        plan: &mut Vec<Planned>,
        mut budget: usize,
        now: Instant,
        newcomers_only: bool,
        max_seqs: usize,
    ) {
        while budget > 0 && self.running.len() < max_seqs {
            if newcomers_only && !self.waiting.head_is_newcomer(&self.running) {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else { break };
            let bs = self.blocks.block_size();
            if seq.blocks.is_empty() {
                // Leave at least one token to compute, in a block of its own: shared blocks are never written.
                // A sequence that scores its prompt computes all of it: cached positions have no logits.
                let max_hit = if seq.params.prompt_logprobs.is_some() { 0 } else { (seq.tokens.len() - 1) / bs };
                let (hit, last) = self.blocks.lookup_prefix(blocks::prefix_root(seq.adapter), &seq.tokens, max_hit);
                seq.num_computed = hit.len() * bs;
                seq.num_hashed = hit.len();
                seq.last_hash = last;
                if seq.first_scheduled.is_none() {
                    seq.cached_tokens = seq.num_computed.min(seq.prompt_len);
                }
                seq.blocks = hit;
            }
            let start = seq.num_computed;
            let end = start + seq.remaining().min(budget);
            let need = end.div_ceil(bs).saturating_sub(seq.blocks.len());
            match self.blocks.allocate_n(need) {
                Some(b) => seq.blocks.extend(b),
                None => {
                    // No room: give back the prefix hits and wait at the front of the queue.
                    self.blocks.release(&seq.blocks);
                    seq.reset();
                    self.waiting.push_front(seq);
                    break;
                }
            }
            seq.first_scheduled.get_or_insert(now);
            self.waiting.admitted(&seq);
            plan.push(Planned { id: seq.id, start, end, sample: end == seq.tokens.len() });
            budget -= end - start;
            self.running.push(seq);
        }
    }

    /// Computes the next allowed-token mask of every running constrained sequence that needs one (after a
    /// step advanced them), all at once and in parallel. Returns the sequences whose grammar cannot go on,
    /// with why; the caller ends them.
    pub fn prepare_masks(&mut self) -> Vec<(u64, String)> {
        let (ids, mut pending): (Vec<u64>, Vec<&mut Constraint>) = self
            .running
            .iter_mut()
            .filter_map(|s| Some(s.id).zip(s.constraint.as_mut().filter(|c| c.needs_mask())))
            .unzip();
        if pending.is_empty() {
            return Vec::new();
        }
        constrain::prepare_all(&mut pending).into_iter().map(|(i, e)| (ids[i], e)).collect()
    }

    /// Called when a step could not be planned although sequences are present. With several running,
    /// preempts the newest to free its blocks and returns `None`; with one running (or only waiting ones)
    /// that still cannot proceed, aborts it and returns its id: it can never fit the pool.
    pub fn unstick(&mut self) -> Option<u64> {
        if self.running.len() > 1 {
            self.preempt_last();
            return None;
        }
        let id = self.running.first().or(self.waiting.front()).map(|s| s.id)?;
        self.abort(id);
        Some(id)
    }

    /// The step inputs for `plan`, borrowing the sequences' tokens and block tables.
    pub fn inputs<'a>(&'a self, plan: &[Planned]) -> Vec<StepSeq<'a>> {
        plan.iter()
            .map(|p| {
                let s = self.running.get(p.id).expect("planned sequences are running");
                let first = s.fresh;
                // Prompt logprobs: every chunk that covers prompt positions scores them (again, after a
                // recompute: whoever reads them keeps the first score of each position).
                let score_prompt = s
                    .params
                    .prompt_logprobs
                    .filter(|_| p.start < s.prompt_len)
                    .map(|top| ScorePrompt { top, next_token: s.tokens[..s.prompt_len].get(p.end).copied() });
                StepSeq {
                    id: s.id,
                    tokens: &s.tokens[p.start..p.end],
                    start_pos: p.start,
                    block_table: &s.blocks,
                    sample: p.sample.then_some(&s.params),
                    penalty_context: if first { &s.tokens[..s.prompt_len] } else { &[] },
                    output_context: if first { &s.known_tokens()[s.prompt_len..] } else { &[] },
                    starts: first,
                    score_prompt,
                    allowed: s.constraint.as_ref().filter(|_| p.sample).and_then(Constraint::mask),
                    adapter: s.adapter,
                }
            })
            .collect()
    }

    /// Records a completed step: computed positions, prefix-cache registration, sampled tokens and
    /// finished sequences (whose blocks are released). `eos` are the end-of-sequence ids.
    pub fn apply(&mut self, plan: &[Planned], sampled: Vec<SeqSampled>, eos: &[u32]) -> Vec<Outcome> {
        let max_model_len = self.cfg.max_model_len;
        let mut out = Vec::with_capacity(sampled.len());
        let mut finished_ids = Vec::new();
        let mut take = |s: &mut Sequence, x: SeqSampled| {
            s.tokens.push(x.sampled.token);
            let finished = s.took_token(eos, max_model_len);
            if finished.is_some() {
                finished_ids.push(x.id);
            }
            let first = s.generated().len() == 1;
            out.push(Outcome { id: x.id, cached_tokens: s.cached_tokens, sampled: x.sampled, finished, first });
        };
        // The tokens come in the plan's order (the backend's contract): each sequence is found once.
        let mut sampled = sampled.into_iter().peekable();
        for p in plan {
            let Some(i) = self.running.position(p.id) else { continue };
            self.record_computed_at(i, p.end, true);
            if let Some(x) = sampled.next_if(|x| x.id == p.id) {
                take(&mut self.running[i], x);
            }
        }
        // Tokens out of that order, if a backend broke it.
        for x in sampled {
            if let Some(s) = self.running.get_mut(x.id) {
                take(s, x);
            }
        }
        // Together, in one pass over the batch: several sequences often finish in the same step.
        for s in self.running.remove_all(&finished_ids) {
            self.blocks.release(&s.blocks);
        }
        out
    }

    /// After a step ran: its running sequences are begun on the workers (their computed positions advance
    /// to the plan's, with `advance`), and the full blocks it computed join the prefix cache.
    fn record_computed(&mut self, plan: &[Planned], advance: bool) {
        for p in plan {
            if let Some(i) = self.running.position(p.id) {
                self.record_computed_at(i, p.end, advance);
            }
        }
    }

    /// [`Scheduler::record_computed`] for `running[i]`, planned up to `end`.
    fn record_computed_at(&mut self, i: usize, end: usize, advance: bool) {
        let bs = self.blocks.block_size();
        let s = &mut self.running[i];
        s.fresh = false;
        if advance {
            s.num_computed = s.num_computed.max(end);
        }
        while (s.num_hashed + 1) * bs <= s.num_computed {
            let b = s.num_hashed;
            s.last_hash = self.blocks.register(s.blocks[b], s.last_hash, &s.tokens[b * bs..(b + 1) * bs]);
            s.num_hashed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constrain::Spec;
    use tessera_proto::step::SamplingParams;

    fn sched(blocks: usize, bs: usize, budget: usize, max_seqs: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig { max_num_seqs: max_seqs, max_batched_tokens: budget, max_model_len: 1000, overlap: false },
            blocks,
            bs,
        )
    }

    fn seq(id: u64, len: usize, max_tokens: usize) -> Sequence {
        Sequence::new(
            id,
            (0..len as u32).map(|t| t + 100 * id as u32).collect(),
            SamplingParams::greedy(),
            max_tokens,
            false,
        )
    }

    /// Runs `plan` with a fake model that always samples token 7.
    fn step(s: &mut Scheduler, plan: &[Planned]) -> Vec<Outcome> {
        let sampled = plan
            .iter()
            .filter(|p| p.sample)
            .map(|p| SeqSampled { id: p.id, sampled: Sampled { token: 7, logprob: None, top_logprobs: vec![] } })
            .collect();
        s.apply(plan, sampled, &[2])
    }

    #[test]
    fn decodes_go_first_then_prefill_chunks_within_the_budget() {
        let mut s = sched(64, 4, 6, 8);
        s.add(seq(1, 10, 5));
        // Budget 6: seq 1's prompt is prefilled in chunks of 6 then 4 tokens.
        let p = s.schedule();
        assert_eq!(p, [Planned { id: 1, start: 0, end: 6, sample: false }]);
        step(&mut s, &p);
        s.add(seq(2, 9, 5));
        let p = s.schedule();
        assert_eq!(
            p,
            [Planned { id: 1, start: 6, end: 10, sample: true }, Planned { id: 2, start: 0, end: 2, sample: false }]
        );
        step(&mut s, &p);
        // Seq 1 now decodes (one token, first), seq 2 continues its prefill with the rest of the budget.
        let p = s.schedule();
        assert_eq!(
            p,
            [Planned { id: 1, start: 10, end: 11, sample: true }, Planned { id: 2, start: 2, end: 7, sample: false }]
        );
        let inputs = s.inputs(&p);
        assert_eq!(inputs[0].tokens, [7]);
        assert_eq!(inputs[1].block_table.len(), 2, "7 tokens in blocks of 4");
        assert!(inputs[1].penalty_context.is_empty(), "penalty context only with the first chunk");
    }

    #[test]
    fn finishing_releases_blocks_and_reports_the_reason() {
        let mut s = sched(16, 4, 100, 8);
        s.add(seq(1, 5, 3));
        let mut reasons = Vec::new();
        while !s.is_idle() {
            let p = s.schedule();
            for o in step(&mut s, &p) {
                reasons.push(o.finished);
            }
        }
        assert_eq!(reasons, [None, None, Some(FinishReason::Length)]);
        assert_eq!(s.blocks.num_used(), 0);
        // EOS (id 2) stops a sequence unless it ignores EOS.
        s.add(seq(3, 5, 10));
        let p = s.schedule();
        let out = s.apply(
            &p,
            vec![SeqSampled { id: 3, sampled: Sampled { token: 2, logprob: None, top_logprobs: vec![] } }],
            &[2],
        );
        assert_eq!(out[0].finished, Some(FinishReason::Stop));
        assert!(s.is_idle());
    }

    #[test]
    fn sequences_finishing_together_leave_the_others_running_in_order() {
        let mut s = sched(64, 4, 100, 8);
        for (id, max_tokens) in [(1, 2), (2, 5), (3, 2), (4, 5), (5, 2)] {
            s.add(seq(id, 3, max_tokens));
        }
        let p = s.schedule();
        step(&mut s, &p);
        let p = s.schedule();
        let finished: Vec<u64> = step(&mut s, &p).iter().filter(|o| o.finished.is_some()).map(|o| o.id).collect();
        assert_eq!(finished, [1, 3, 5]);
        assert_eq!(s.running.iter().map(|q| q.id).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(s.blocks.num_used(), 2, "one block each for the two left");
        // The next step finds each of them where it is.
        let p = s.schedule();
        assert_eq!(p.iter().map(|p| (p.id, p.start)).collect::<Vec<_>>(), [(2, 4), (4, 4)]);
        assert_eq!(s.inputs(&p).iter().map(|i| i.id).collect::<Vec<_>>(), [2, 4]);
        assert!(s.get(3).is_none());
    }

    #[test]
    fn a_sequence_scoring_its_prompt_computes_all_of_it_in_scored_chunks() {
        // Budget 5: the 12-token prompt goes in chunks of 5, 5 and 2.
        let mut s = sched(32, 4, 5, 8);
        let prompt: Vec<u32> = (10..22).collect();
        s.add(Sequence::new(1, prompt.clone(), SamplingParams::greedy(), 1, false));
        while !s.is_idle() {
            let p = s.schedule();
            step(&mut s, &p);
        }
        let scoring = SamplingParams { prompt_logprobs: Some(3), ..SamplingParams::greedy() };
        s.add(Sequence::new(2, prompt.clone(), scoring, 2, false));
        let mut chunks = Vec::new();
        while !s.is_idle() {
            let p = s.schedule();
            let i = &s.inputs(&p)[0];
            chunks.push((i.start_pos, i.tokens.len(), i.score_prompt));
            step(&mut s, &p);
        }
        let score = |next: Option<u32>| Some(ScorePrompt { top: 3, next_token: next });
        // From position 0 although the prompt is cached; each chunk names the prompt token after it; the
        // decode step after the prompt scores nothing.
        assert_eq!(chunks, [(0, 5, score(Some(15))), (5, 5, score(Some(20))), (10, 2, score(None)), (12, 1, None)]);
    }

    #[test]
    fn a_constrained_sequence_samples_under_its_mask_and_ends_when_its_grammar_is_complete() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
        let tok = crate::tokenizer::Tokenizer::load(&dir).unwrap();
        let grammars = crate::constrain::Grammars::new(&tok, 512).unwrap();
        // The single-letter pieces (the mask allows one token per byte string: not their byte-fallback twins).
        let byte = |b: u8| tok.hf().token_to_id(&(b as char).to_string()).unwrap();
        let mut s = sched(32, 4, 4, 8);
        let mut seq = seq(1, 6, 50);
        seq.constraint = Some(grammars.compile(&Spec::Choice(vec!["ok".into()])).unwrap());
        s.add(seq);
        // The prefill chunk that does not sample carries no mask; the one that samples does.
        let p = s.schedule();
        assert!(s.inputs(&p)[0].allowed.is_none());
        step(&mut s, &p);
        let mut sampled = Vec::new();
        for b in [b'o', b'k'] {
            let p = s.schedule();
            let mask = s.inputs(&p)[0].allowed.expect("a sampling step carries the mask").to_vec();
            assert!(tessera_proto::step::mask_allows(&mask, byte(b)));
            assert!(!tessera_proto::step::mask_allows(&mask, byte(b'x')));
            let out = s.apply(
                &p,
                vec![SeqSampled { id: 1, sampled: Sampled { token: byte(b), logprob: None, top_logprobs: vec![] } }],
                &[2],
            );
            assert!(s.prepare_masks().is_empty());
            sampled.push(out[0].finished);
        }
        // "ok" completes the choice: it ends with `stop` without an end-of-sequence token.
        assert_eq!(sampled, [None, Some(FinishReason::Stop)]);
        assert!(s.is_idle());
    }

    #[test]
    fn prefix_cache_hits_skip_computed_blocks_but_never_the_last_token() {
        let mut s = sched(32, 4, 100, 8);
        let prompt: Vec<u32> = (10..22).collect(); // 12 tokens = 3 full blocks
        s.add(Sequence::new(1, prompt.clone(), SamplingParams::greedy(), 1, false));
        let p = s.schedule();
        step(&mut s, &p);
        assert!(s.is_idle());
        // Same prompt again: two blocks come from the cache; the third is recomputed (it holds the last
        // prompt token, which must be fed to get logits).
        s.add(Sequence::new(2, prompt.clone(), SamplingParams::greedy(), 1, false));
        let p = s.schedule();
        assert_eq!(p, [Planned { id: 2, start: 8, end: 12, sample: true }]);
        assert!(s.inputs(&p)[0].starts, "the first step after a prefix hit begins the sequence on the workers");
        assert_eq!(s.inputs(&p)[0].penalty_context.len(), 12);
        assert_eq!(s.get(2).unwrap().cached_tokens, 8);
        assert_eq!(s.blocks.stats.hits, 2);
        // A prompt sharing only the first block hits once.
        step(&mut s, &p);
        let mut other = prompt.clone();
        other[5] = 99;
        s.add(Sequence::new(3, other, SamplingParams::greedy(), 1, false));
        let p = s.schedule();
        assert_eq!(p[0].start, 4);
    }

    #[test]
    fn only_a_sequences_first_generated_token_is_first_even_after_a_recompute() {
        let mut s = sched(4, 2, 100, 8);
        s.add(seq(1, 3, 6));
        s.add(seq(2, 3, 6));
        let firsts = |o: &[Outcome]| o.iter().map(|o| (o.id, o.first)).collect::<Vec<_>>();
        let p = s.schedule();
        assert_eq!(firsts(&step(&mut s, &p)), [(1, true), (2, true)]);
        let p = s.schedule();
        assert_eq!(firsts(&step(&mut s, &p)), [(1, false), (2, false)]);
        // Seq 2 is preempted for blocks, then recomputed with the tokens it generated: not first again.
        let p = s.schedule();
        assert_eq!(firsts(&step(&mut s, &p)), [(1, false)]);
        while s.get(1).is_some() {
            let p = s.schedule();
            step(&mut s, &p);
        }
        let p = s.schedule();
        assert_eq!(firsts(&step(&mut s, &p)), [(2, false)]);
    }

    #[test]
    fn a_full_pool_preempts_the_newest_and_recomputes_it_later() {
        // 4 blocks of 2 tokens; two sequences of 3 tokens each need 2 blocks apiece, then grow.
        let mut s = sched(4, 2, 100, 8);
        s.add(seq(1, 3, 6));
        s.add(seq(2, 3, 6));
        let p = s.schedule();
        assert_eq!(p.len(), 2);
        step(&mut s, &p); // both have 4 tokens now, 2 blocks each, pool empty
        let p = s.schedule(); // position 3 still fits in the second block
        assert_eq!(p.len(), 2);
        step(&mut s, &p);
        let p = s.schedule(); // both need a third block for position 4: seq 2 is preempted
        assert_eq!(p, [Planned { id: 1, start: 4, end: 5, sample: true }]);
        assert_eq!(s.preemptions, 1);
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
        // Run seq 1 to the end; seq 2 then restarts from position 0 with its generated token included.
        let mut guard = 0;
        while s.get(1).is_some() {
            let p = s.schedule();
            step(&mut s, &p);
            guard += 1;
            assert!(guard < 20);
        }
        let p = s.schedule();
        assert_eq!(p, [Planned { id: 2, start: 0, end: 5, sample: true }]);
        let inputs = s.inputs(&p);
        assert_eq!(inputs[0].output_context, [7, 7], "the restarted sequence carries what it generated");
        assert_eq!(inputs[0].penalty_context.len(), 3);
    }

    #[test]
    fn abort_frees_blocks_at_once_wherever_the_sequence_is() {
        let mut s = sched(8, 4, 100, 1);
        s.add(seq(1, 6, 5));
        s.add(seq(2, 6, 5));
        let p = s.schedule();
        assert_eq!(p.len(), 1, "max_num_seqs = 1");
        assert_eq!(s.blocks.num_used(), 2);
        assert!(s.abort(1).is_some());
        assert_eq!(s.blocks.num_used(), 0);
        assert!(s.abort(2).is_some(), "waiting sequences abort too");
        assert!(s.abort(2).is_none());
        assert!(s.is_idle());
    }

    fn flow_seq(id: u64, flow: &str, weight: f64) -> Sequence {
        seq(id, 4, 4).in_flow(Some(flow.to_string()), weight)
    }

    #[test]
    fn a_flow_with_one_request_goes_ahead_of_another_flows_backlog() {
        let mut s = sched(256, 4, 1000, 2);
        for id in 1..=6 {
            s.add(flow_seq(id, "a", 1.0));
        }
        // Two slots, both a's.
        let p = s.schedule();
        assert_eq!(p.iter().map(|p| p.id).collect::<Vec<_>>(), [1, 2]);
        step(&mut s, &p);
        // b's one request arrives behind a's backlog in time, but goes ahead of it in the queue.
        s.add(flow_seq(100, "b", 1.0));
        assert_eq!(s.waiting.front().map(|q| q.id), Some(100));
        // Both slots are a's and b has nothing running: the newest of a's is preempted for b.
        let p = s.schedule();
        assert!(p.iter().any(|p| p.id == 100), "b was not admitted: {p:?}");
        assert_eq!(s.preemptions, 1);
        assert_eq!(s.running.iter().filter(|q| q.flow.as_deref() == Some("a")).count(), 1);
        // a's preempted sequence waits as a's next request, not ahead of the rest of a's queue.
        assert_eq!(s.waiting.iter().map(|q| q.id).collect::<Vec<_>>(), [3, 4, 5, 6, 2]);
    }

    /// Teaches `s` steps that cost what they compute (a CPU): 0.1 ms fixed, 30 µs a token.
    fn compute_bound(s: &mut Scheduler, now: Instant) {
        for t in [1, 2, 4, 8, 16, 32, 64, 64, 64] {
            s.step_cost.observe(t, 1e-4 + 3e-5 * t as f64, now);
        }
    }

    /// Teaches `s` steps that cost the same whatever their size (a GPU).
    fn memory_bound(s: &mut Scheduler, now: Instant) {
        for t in [1, 2, 4, 8, 16, 32, 64, 64, 64] {
            s.step_cost.observe(t, 8e-4, now);
        }
    }

    fn tokens(plan: &[Planned]) -> usize {
        plan.iter().map(|p| p.end - p.start).sum()
    }

    /// Queues flow a's requests `1..=n` and runs the step that admits them (as many as fit).
    fn flow_a_admitted(s: &mut Scheduler, n: u64) {
        for id in 1..=n {
            s.add(flow_seq(id, "a", 1.0));
        }
        let p = s.schedule();
        step(s, &p);
    }

    #[test]
    fn a_newcomer_gets_a_step_of_its_own_only_where_steps_cost_what_they_compute() {
        let now = Instant::now();
        for separate in [true, false] {
            let mut s = sched(256, 4, 1000, 32);
            if separate {
                compute_bound(&mut s, now);
            } else {
                memory_bound(&mut s, now);
            }
            flow_a_admitted(&mut s, 16);
            // a's 16 now decode; b's request and one more of a's arrive.
            s.add(flow_seq(100, "b", 1.0));
            s.add(flow_seq(17, "a", 1.0));
            let p = s.schedule();
            let ids: Vec<u64> = p.iter().map(|p| p.id).collect();
            let everyone: Vec<u64> = (1..=16).chain([100, 17]).collect();
            if separate {
                assert_eq!(ids, [100], "b's prefill alone, and nothing of a's");
                assert_eq!(s.newcomer_steps, 1);
                step(&mut s, &p);
                // Never twice in a row: the next step has everyone's decodes (and a's newcomer).
                let ids: Vec<u64> = s.schedule().iter().map(|p| p.id).collect();
                assert_eq!(ids, everyone);
            } else {
                assert_eq!(ids, everyone, "b rides along with the decodes");
                assert_eq!(s.newcomer_steps, 0);
            }
        }
        // One flow: a new request is never a newcomer.
        let mut s = sched(256, 4, 1000, 8);
        compute_bound(&mut s, now);
        s.add(seq(1, 4, 4));
        let p = s.schedule();
        step(&mut s, &p);
        s.add(seq(2, 4, 4));
        assert_eq!(s.schedule().iter().map(|p| p.id).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn a_newcomer_steps_in_while_the_decodes_are_paused_and_its_extra_slot_is_given_back() {
        let now = Instant::now();
        let mut s = sched(256, 4, 1000, 16);
        compute_bound(&mut s, now);
        flow_a_admitted(&mut s, 18);
        // a's sixteen decode in a step in flight, paused. Another of a's arriving is not a newcomer.
        let in_flight = s.schedule();
        assert_eq!(in_flight.iter().map(|p| p.id).collect::<Vec<_>>(), (1..=16).collect::<Vec<_>>());
        let flying = tokens(&in_flight);
        assert!(s.schedule_during(flying, now).is_empty());
        // b's request is: it takes a seventeenth slot for its prefill, and nothing of a's moves.
        s.add(flow_seq(100, "b", 1.0));
        let during = s.schedule_during(flying, now);
        assert_eq!(during, [Planned { id: 100, start: 0, end: 4, sample: true }]);
        assert_eq!((s.running.len(), s.preemptions, s.steps_paused, s.newcomer_steps), (17, 0, 1, 1));
        step(&mut s, &during);
        step(&mut s, &in_flight);
        // The next step gives the slot back: a's newest waits, the step holds sixteen.
        let next: Vec<u64> = s.schedule().iter().map(|p| p.id).collect();
        assert_eq!(next, (1..=15).chain([100]).collect::<Vec<_>>());
        assert_eq!(s.preemptions, 1);
        assert_eq!(s.waiting.iter().map(|q| q.id).collect::<Vec<_>>(), [17, 18, 16], "a's next, then the preempted");

        // Where the step in flight costs about what the newcomer's own would (four decodes against a
        // four-token prompt), it is not paused for it.
        let mut s = sched(256, 4, 1000, 8);
        compute_bound(&mut s, now);
        flow_a_admitted(&mut s, 4);
        let in_flight = s.schedule();
        s.add(flow_seq(100, "b", 1.0));
        assert!(s.schedule_during(tokens(&in_flight), now).is_empty());

        // A newcomer's own step in flight is not paused for another newcomer: decodes come next.
        let mut s = sched(256, 4, 1000, 32);
        compute_bound(&mut s, now);
        flow_a_admitted(&mut s, 16);
        s.add(flow_seq(100, "b", 1.0));
        let in_flight = s.schedule();
        assert_eq!(in_flight.iter().map(|p| p.id).collect::<Vec<_>>(), [100]);
        s.add(flow_seq(200, "c", 1.0));
        assert!(s.schedule_during(tokens(&in_flight), now).is_empty());

        // Where steps cost the same whatever their size, the newcomer joins the decodes instead.
        let mut s = sched(256, 4, 1000, 8);
        memory_bound(&mut s, now);
        flow_a_admitted(&mut s, 1);
        let in_flight = s.schedule();
        s.add(flow_seq(100, "b", 1.0));
        assert!(s.schedule_during(tokens(&in_flight), now).is_empty());
    }

    #[test]
    fn weights_share_admissions_in_proportion_and_one_flow_keeps_arrival_order() {
        let mut s = sched(1024, 4, 1000, 1000);
        for id in 0..30 {
            s.add(flow_seq(id, "heavy", 1.0));
            s.add(flow_seq(1000 + id, "light", 2.0));
        }
        // Of the first 30 in queue order, the weight-2 flow has about two thirds.
        let light = s.waiting.iter().take(30).filter(|q| q.flow.as_deref() == Some("light")).count();
        assert!((19..=21).contains(&light), "light got {light} of 30");
        let mut one = sched(1024, 4, 1000, 1000);
        for id in [5, 3, 9, 1] {
            one.add(seq(id, 6, 2));
        }
        assert_eq!(one.waiting.iter().map(|q| q.id).collect::<Vec<_>>(), [5, 3, 9, 1], "one flow is FIFO");
    }
}
