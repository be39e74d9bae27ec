//! Steps that carry what changed: what a group's workers already hold of each sequence (its block table
//! and sampling parameters), so that a step after a sequence's first sends only the block ids appended
//! since, and sampling parameters once. At 256 sequences of 4096-token contexts a full step carries 65,536
//! block ids to every rank; an incremental one a few per sequence.
//!
//! A sequence is sent in full when it begins (new, restarted after a preemption, or migrated: the step
//! says `starts`), when the workers hold nothing of it (the first step this group sees), and when a worker
//! says it does not know it (`Sent::forget`, after a FAILED_PRECONDITION naming it). The workers keep and
//! drop the same state on the same steps (`tessera_worker::kept`), so both sides agree.

use std::collections::HashMap;

use tessera_proto::{
    step::{SamplingParams, StepSeq},
    v1 as pb,
};

/// What the workers hold of one sequence.
struct Held {
    /// Block ids sent so far (the table only grows between steps that do not begin the sequence).
    blocks: usize,
    /// The sampling parameters last sent.
    sampling: Option<SamplingParams>,
}

/// What a group's workers hold, by sequence id.
#[derive(Default)]
pub struct Sent {
    held: HashMap<u64, Held>,
}

impl Sent {
    /// The protocol message for `s`, incremental when the workers hold the sequence, and records what they
    /// will hold once the step has run.
    pub fn encode(&mut self, s: &StepSeq<'_>) -> pb::SequenceStep {
        let mut m = pb::SequenceStep {
            sequence_id: s.id,
            token_ids: s.tokens.to_vec(),
            start_position: s.start_pos as u32,
            sample: s.sample.is_some(),
            penalty_context: s.penalty_context.to_vec(),
            output_context: s.output_context.to_vec(),
            starts: s.starts,
            prompt_logprobs: s.score_prompt.map(|p| p.top as u32),
            next_prompt_token: s.score_prompt.and_then(|p| p.next_token),
            allowed_tokens: s.allowed.filter(|_| s.sample.is_some()).map(<[u32]>::to_vec).unwrap_or_default(),
            adapter_id: s.adapter,
            ..Default::default()
        };
        let incremental =
            !(s.starts || s.start_pos == 0) && self.held.get(&s.id).is_some_and(|h| h.blocks <= s.block_table.len());
        let held = if incremental {
            let h = self.held.get_mut(&s.id).expect("checked above");
            m.incremental = true;
            m.appended_blocks = s.block_table[h.blocks..].to_vec();
            h
        } else {
            m.block_table = s.block_table.to_vec();
            self.held.entry(s.id).insert_entry(Held { blocks: 0, sampling: None }).into_mut()
        };
        held.blocks = s.block_table.len();
        if let Some(p) = s.sample
            && held.sampling.as_ref() != Some(p)
        {
            m.sampling = Some(sampling_to_proto(p));
            held.sampling = Some(p.clone());
        }
        m
    }

    /// The workers dropped these sequences (finished, refused, or unknown to them): the next step of any
    /// of them is sent in full.
    pub fn forget(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            self.held.remove(&id);
        }
    }

    /// Sequences held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

fn sampling_to_proto(p: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as u32,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        top_logprobs: p.top_logprobs as u32,
        logprobs: p.logprobs,
        logit_bias: p.logit_bias.iter().copied().collect(),
    }
}

/// The ids a worker's FAILED_PRECONDITION asks to be sent in full (its `tessera-resend` metadata).
pub fn resend_ids(status: &tonic::Status) -> Option<Vec<u64>> {
    let v = status.metadata().get(RESEND_METADATA)?.to_str().ok()?;
    v.split(',').map(|x| x.trim().parse().ok()).collect()
}

/// The metadata key of [`resend_ids`].
pub const RESEND_METADATA: &str = "tessera-resend";

#[cfg(test)]
mod tests {
    use super::*;

    fn seq<'a>(
        id: u64,
        start: usize,
        table: &'a [u32],
        sample: Option<&'a SamplingParams>,
        starts: bool,
    ) -> StepSeq<'a> {
        StepSeq {
            id,
            tokens: &[7],
            start_pos: start,
            block_table: table,
            sample,
            penalty_context: &[],
            output_context: &[],
            starts,
            score_prompt: None,
            allowed: None,
            adapter: 0,
        }
    }

    #[test]
    fn after_its_first_step_a_sequence_sends_only_new_blocks_and_no_sampling_parameters() {
        let p = SamplingParams { temperature: 0.7, seed: Some(3), ..Default::default() };
        let mut sent = Sent::default();
        let table: Vec<u32> = (0..300).collect();
        let first = sent.encode(&seq(1, 0, &table[..4], Some(&p), false));
        assert!(!first.incremental);
        assert_eq!(first.block_table, [0, 1, 2, 3]);
        assert_eq!(first.sampling.as_ref().map(|s| s.temperature), Some(0.7));
        // A decode that stays in its last block: nothing but the token.
        let second = sent.encode(&seq(1, 60, &table[..4], Some(&p), false));
        assert!(second.incremental);
        assert!(second.block_table.is_empty() && second.appended_blocks.is_empty());
        assert!(second.sampling.is_none(), "sampling parameters travel once");
        // One that needs a new block: that block alone.
        let third = sent.encode(&seq(1, 64, &table[..5], Some(&p), false));
        assert_eq!((third.incremental, third.appended_blocks.as_slice()), (true, &[4][..]));
        assert!(third.block_table.is_empty());
        // Parameters that change are sent again.
        let q = SamplingParams { temperature: 0.2, ..p.clone() };
        assert!(sent.encode(&seq(1, 65, &table[..5], Some(&q), false)).sampling.is_some());
        // A prefill chunk that does not sample, then its first sampling step.
        let chunk = sent.encode(&seq(2, 0, &table[..2], None, false));
        assert!(!chunk.incremental && chunk.sampling.is_none());
        let samples = sent.encode(&seq(2, 20, &table[..3], Some(&p), false));
        assert!(samples.incremental && samples.sampling.is_some());
        assert_eq!(sent.len(), 2);
    }

    #[test]
    fn a_sequence_that_begins_again_or_was_forgotten_is_sent_in_full() {
        let p = SamplingParams::greedy();
        let mut sent = Sent::default();
        let table: Vec<u32> = (0..10).collect();
        sent.encode(&seq(1, 0, &table[..3], Some(&p), false));
        // Preempted and recomputed, or migrated: the step begins it again.
        let again = sent.encode(&seq(1, 16, &table[..3], Some(&p), true));
        assert!(!again.incremental && again.block_table.len() == 3 && again.sampling.is_some());
        sent.forget([1]);
        let after = sent.encode(&seq(1, 40, &table[..4], Some(&p), false));
        assert!(!after.incremental && after.block_table.len() == 4 && after.sampling.is_some());
        // A shorter table than was sent cannot be a delta.
        let shorter = sent.encode(&seq(1, 41, &table[..2], Some(&p), false));
        assert!(!shorter.incremental && shorter.block_table.len() == 2);
    }

    #[test]
    fn resend_ids_are_read_from_the_status_metadata() {
        let mut s = tonic::Status::failed_precondition("unknown sequences");
        s.metadata_mut().insert(RESEND_METADATA, "5,9".parse().unwrap());
        assert_eq!(resend_ids(&s), Some(vec![5, 9]));
        assert_eq!(resend_ids(&tonic::Status::failed_precondition("x")), None);
    }
}
