//! Planning the next step while one is in flight: the engine loop's overlap, for backends whose forward
//! pass runs off its thread (a group of worker processes).
//!
//! [`Scheduler::launch`] counts a sent step's positions as computed and gives every sequence that samples
//! in it a placeholder for the token it will get, so that [`Scheduler::schedule`] plans step n + 1 as if
//! every sequence went on: a decode at the placeholder's position, in a block allocated for it. A sequence
//! whose placeholder is its last allowed token is not planned, since it is sure to finish.
//! [`Scheduler::land`] puts the sampled tokens in place of their placeholders (wherever the sequence is
//! now: planning may have preempted it) and ends the sequences that finished; the caller drops those from
//! the plan before sending it, so a finished sequence never runs another step. [`Scheduler::rollback`]
//! takes the placeholders back out of a step that failed.
//!
//! Prefix-cache blocks are registered only when a step has landed: a block registered earlier could be
//! served to a newcomer before its keys and values exist, or after the step that was to write them failed.

use tessera_proto::step::SeqSampled;

use super::{Outcome, Planned, Scheduler, Sequence};

/// What a sequence holds in place of a token being sampled; no vocabulary is that large.
const PLACEHOLDER: u32 = u32::MAX;

impl Scheduler {
    /// Step `plan` was sent: its positions count as computed, and each sequence sampling in it holds a
    /// placeholder for its token.
    pub fn launch(&mut self, plan: &[Planned]) {
        for p in plan {
            let Some(s) = self.running.get_mut(p.id) else { continue };
            s.num_computed = s.num_computed.max(p.end);
            s.launched = true;
            if p.sample {
                s.tokens.push(PLACEHOLDER);
                s.pending = true;
            }
        }
    }

    /// Launched step `plan` ran and sampled `sampled`: records it as [`Scheduler::apply`] records a step,
    /// for the sequences still there. Sequences it finished leave (their blocks are released); the
    /// caller drops them from the step it planned meanwhile.
    pub fn land(&mut self, plan: &[Planned], sampled: Vec<SeqSampled>, eos: &[u32]) -> Vec<Outcome> {
        // A sequence preempted since it launched starts again on the workers: it stays fresh, and the
        // blocks it computed then are gone.
        let launched = self.still_launched(plan);
        for p in &launched {
            if let Some(s) = self.running.get_mut(p.id) {
                s.launched = false;
            }
        }
        self.record_computed(&launched, false);
        let max_model_len = self.cfg.max_model_len;
        let mut out = Vec::with_capacity(sampled.len());
        let mut finished_ids = Vec::new();
        for x in sampled {
            let Some(s) = self.pending_mut(x.id) else { continue };
            *s.tokens.last_mut().expect("a pending sequence holds its placeholder") = x.sampled.token;
            s.pending = false;
            let finished = s.took_token(eos, max_model_len);
            if finished.is_some() {
                finished_ids.push(x.id);
            }
            let first = s.generated().len() == 1;
            out.push(Outcome { id: x.id, cached_tokens: s.cached_tokens, sampled: x.sampled, finished, first });
        }
        // A sampling sequence the step did not answer for (the backend broke its contract, or it was left
        // out of a step sent again) has no token to put in place.
        self.unpend(plan);
        let gone = self.running.remove_all(&finished_ids);
        for s in &gone {
            self.blocks.release(&s.blocks);
        }
        if gone.len() < finished_ids.len() {
            // Preempted while the step ran, and finished by it: it leaves the queue.
            for id in finished_ids.iter().filter(|id| !gone.iter().any(|s| s.id == **id)) {
                if let Some(s) = self.waiting.remove(*id) {
                    self.blocks.release(&s.blocks);
                }
            }
        }
        out
    }

    /// Launched step `plan` failed: its sequences hold no placeholders any more, and what it was to compute
    /// counts as not computed.
    pub fn rollback(&mut self, plan: &[Planned]) {
        for p in plan {
            if let Some(s) = self.running.get_mut(p.id).filter(|s| s.launched) {
                s.launched = false;
                s.num_computed = s.num_computed.min(p.start);
            }
        }
        self.unpend(plan);
    }

    /// The part of launched `plan` still as it was sent (not aborted or preempted since), to send again.
    pub fn still_launched(&self, plan: &[Planned]) -> Vec<Planned> {
        plan.iter().copied().filter(|p| self.running.get(p.id).is_some_and(|s| s.launched)).collect()
    }

    /// Whether sequence `id` is running.
    pub fn is_running(&self, id: u64) -> bool {
        self.running.position(id).is_some()
    }

    /// Takes the placeholder out of every sampling sequence of `plan` still holding one.
    fn unpend(&mut self, plan: &[Planned]) {
        for p in plan.iter().filter(|p| p.sample) {
            if let Some(s) = self.pending_mut(p.id) {
                s.tokens.pop();
                s.pending = false;
            }
        }
    }

    /// Sequence `id` if it holds a placeholder, running or (preempted) waiting.
    fn pending_mut(&mut self, id: u64) -> Option<&mut Sequence> {
        match self.running.position(id) {
            Some(i) => Some(&mut self.running[i]),
            None => self.waiting.get_mut(id),
        }
        .filter(|s| s.pending)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tessera_proto::step::{Sampled, SamplingParams, StepSeq};

    use super::*;
    use crate::{engine::contract::FinishReason, scheduler::SchedulerConfig};

    const EOS: u32 = 2;

    fn sched(blocks: usize, bs: usize, max_seqs: usize) -> Scheduler {
        let cfg = SchedulerConfig { max_num_seqs: max_seqs, max_batched_tokens: 24, max_model_len: 40, overlap: true };
        Scheduler::new(cfg, blocks, bs)
    }

    fn seq(id: u64, len: usize, max_tokens: usize) -> Sequence {
        let prompt = (0..len as u32).map(|t| 10 + (t * 7 + id as u32) % 50).collect();
        Sequence::new(id, prompt, SamplingParams::greedy(), max_tokens, false)
    }

    /// A model whose token at each position of each sequence is fixed (an end of sequence now and then),
    /// and that checks every step's inputs against the tokens it gave: no placeholder, nothing stale.
    #[derive(Default)]
    struct Model {
        given: HashMap<(u64, usize), u32>,
    }

    impl Model {
        fn token(id: u64, pos: usize) -> u32 {
            let h = (id * 7919 + pos as u64 * 104_729) % 97;
            if h.is_multiple_of(19) { EOS } else { 10 + h as u32 }
        }

        fn step(&mut self, inputs: &[StepSeq<'_>]) -> Vec<SeqSampled> {
            let mut out = Vec::new();
            for s in inputs {
                for (i, &t) in s.tokens.iter().enumerate() {
                    assert_ne!(t, PLACEHOLDER, "sequence {} sent a placeholder", s.id);
                    if let Some(&g) = self.given.get(&(s.id, s.start_pos + i)) {
                        assert_eq!(t, g, "sequence {} sent a token it was not given", s.id);
                    }
                }
                assert!(!s.output_context.contains(&PLACEHOLDER));
                if s.sample.is_some() {
                    let pos = s.start_pos + s.tokens.len();
                    let token = Self::token(s.id, pos);
                    self.given.insert((s.id, pos), token);
                    out.push(SeqSampled { id: s.id, sampled: Sampled { token, logprob: None, top_logprobs: vec![] } });
                }
            }
            out
        }
    }

    type Outputs = HashMap<u64, (Vec<u32>, Option<FinishReason>)>;

    fn record(out: &mut Outputs, outcomes: Vec<Outcome>) {
        for o in outcomes {
            let e = out.entry(o.id).or_default();
            assert!(e.1.is_none(), "sequence {} got a token after it finished", o.id);
            e.0.push(o.sampled.token);
            e.1 = o.finished;
        }
    }

    /// Runs `seqs` to the end one step after another.
    fn run_plain(mut s: Scheduler, seqs: Vec<Sequence>) -> Outputs {
        let (mut model, mut out) = (Model::default(), Outputs::new());
        seqs.into_iter().for_each(|q| s.add(q));
        for _ in 0..10_000 {
            let plan = s.schedule();
            if plan.is_empty() {
                if s.is_idle() {
                    return out;
                }
                s.unstick();
                continue;
            }
            let sampled = model.step(&s.inputs(&plan));
            record(&mut out, s.apply(&plan, sampled, &[EOS]));
        }
        panic!("did not finish");
    }

    /// Runs `seqs` to the end planning each step while the one before is in flight, as the engine loop
    /// does. Returns the outputs and the preemptions of sequences in flight.
    fn run_overlapped(mut s: Scheduler, seqs: Vec<Sequence>) -> (Outputs, usize) {
        let (mut model, mut out) = (Model::default(), Outputs::new());
        seqs.into_iter().for_each(|q| s.add(q));
        let mut flight: Option<(Vec<Planned>, Vec<SeqSampled>)> = None;
        let mut preempted_in_flight = 0;
        for _ in 0..10_000 {
            let Some((plan, sampled)) = flight.take() else {
                let plan = s.schedule();
                if plan.is_empty() {
                    if s.is_idle() {
                        return (out, preempted_in_flight);
                    }
                    s.unstick();
                    continue;
                }
                let sampled = model.step(&s.inputs(&plan));
                s.launch(&plan);
                flight = Some((plan, sampled));
                continue;
            };
            let mut next = s.schedule();
            preempted_in_flight += plan.iter().filter(|p| !s.is_running(p.id) && s.get(p.id).is_some()).count();
            let outcomes = s.land(&plan, sampled, &[EOS]);
            let finished: Vec<u64> = outcomes.iter().filter(|o| o.finished.is_some()).map(|o| o.id).collect();
            record(&mut out, outcomes);
            next.retain(|p| s.is_running(p.id));
            assert!(next.iter().all(|p| !finished.contains(&p.id)), "a finished sequence is in the next step");
            if !next.is_empty() {
                let sampled = model.step(&s.inputs(&next));
                s.launch(&next);
                flight = Some((next, sampled));
            }
        }
        panic!("did not finish");
    }

    fn workload(n: u64, seed: u64) -> Vec<Sequence> {
        (0..n).map(|i| seq(i + 1, 3 + ((i * 5 + seed) % 11) as usize, 1 + ((i * 3 + seed * 7) % 17) as usize)).collect()
    }

    #[test]
    fn overlapped_steps_give_every_sequence_what_plain_steps_give_it() {
        let mut preempted = 0;
        for seed in 0..20 {
            // A pool that holds a few sequences at a time: preemptions, some of them mid-flight.
            let plain = run_plain(sched(14, 4, 6), workload(12, seed));
            let (overlapped, p) = run_overlapped(sched(14, 4, 6), workload(12, seed));
            preempted += p;
            assert_eq!(plain.len(), 12);
            assert_eq!(overlapped, plain, "seed {seed}");
            assert!(plain.values().any(|o| o.1 == Some(FinishReason::Stop)), "some end by end of sequence");
        }
        assert!(preempted > 0, "no sequence was preempted while in flight: the test misses that case");
    }

    #[test]
    fn the_next_step_decodes_the_placeholders_and_loses_what_finished() {
        let mut s = sched(32, 4, 8);
        s.add(seq(1, 5, 10));
        s.add(seq(2, 5, 10));
        let plan = s.schedule();
        s.launch(&plan);
        let next = s.schedule();
        assert_eq!(
            next,
            [Planned { id: 1, start: 5, end: 6, sample: true }, Planned { id: 2, start: 5, end: 6, sample: true }],
            "both decode the token their prefill samples"
        );
        let token = |id, token| SeqSampled { id, sampled: Sampled { token, logprob: None, top_logprobs: vec![] } };
        let out = s.land(&plan, vec![token(1, 33), token(2, EOS)], &[EOS]);
        assert_eq!(out[1].finished, Some(FinishReason::Stop));
        let next: Vec<Planned> = next.into_iter().filter(|p| s.is_running(p.id)).collect();
        assert_eq!(next.len(), 1);
        let inputs = s.inputs(&next);
        assert_eq!(inputs[0].tokens, [33], "the placeholder is the sampled token by the time the step leaves");
        assert!(!inputs[0].starts, "landed: the workers hold it");
        assert_eq!(s.blocks.num_used(), 2, "the finished sequence's blocks are free");
    }

    #[test]
    fn a_sequence_sure_to_finish_is_not_planned_again() {
        let mut s = sched(32, 4, 8);
        s.add(seq(1, 5, 1));
        let plan = s.schedule();
        s.launch(&plan);
        assert!(s.schedule().is_empty(), "its one token is being sampled");
        assert_eq!(s.blocks.num_used(), 2);
    }

    #[test]
    fn a_failed_step_takes_its_placeholders_back() {
        let mut s = sched(32, 4, 8);
        s.add(seq(1, 5, 10));
        let plan = s.schedule();
        s.launch(&plan);
        s.rollback(&plan);
        assert_eq!(s.get(1).unwrap().tokens.len(), 5);
        assert_eq!(s.schedule(), plan, "the step is planned again as it was");
    }
}
