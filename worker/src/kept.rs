//! What a worker keeps of each sequence between steps, so that the coordinator's steps carry only what
//! changed (`SequenceStep.incremental`): the sequence's block table, and the sampling parameters it was
//! last sent. A full step replaces both; an incremental one appends its new block ids and keeps the
//! parameters unless it brings new ones. Dropped with `finished_sequence_ids`, with a refused step's
//! sequences (the coordinator fails them), and with the model (`LoadModel`).

use std::collections::HashMap;

use tessera_proto::{step::SamplingParams, v1 as pb};

#[derive(Default)]
struct Kept {
    blocks: Vec<u32>,
    sampling: Option<SamplingParams>,
}

/// Every sequence's kept state on this worker.
#[derive(Default)]
pub struct KeptSequences {
    seqs: HashMap<u64, Kept>,
}

/// A step's sequences as the engine takes them: block tables and sampling parameters whole.
pub struct Expanded {
    /// Per sequence of the step, in order: its whole block table and its sampling parameters (when it
    /// samples).
    pub tables: Vec<(u64, Vec<u32>)>,
    pub sampling: Vec<Option<SamplingParams>>,
}

impl KeptSequences {
    /// Applies a step's sequences to what is kept and returns their whole tables and parameters; `Err`
    /// with the ids of incremental sequences this worker holds nothing of (nothing is changed then).
    /// `to_params` turns the protocol's parameters into the engine's.
    pub fn apply(
        &mut self,
        steps: &[pb::SequenceStep],
        to_params: impl Fn(&pb::SamplingParams) -> SamplingParams,
    ) -> Result<Expanded, Vec<u64>> {
        let unknown: Vec<u64> = steps
            .iter()
            .filter(|s| {
                s.incremental
                    && self
                        .seqs
                        .get(&s.sequence_id)
                        .is_none_or(|k| s.sample && s.sampling.is_none() && k.sampling.is_none())
            })
            .map(|s| s.sequence_id)
            .collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let mut tables = Vec::with_capacity(steps.len());
        let mut sampling = Vec::with_capacity(steps.len());
        for s in steps {
            let k = if s.incremental {
                let k = self.seqs.get_mut(&s.sequence_id).expect("checked above");
                k.blocks.extend_from_slice(&s.appended_blocks);
                k
            } else {
                self.seqs
                    .entry(s.sequence_id)
                    .insert_entry(Kept { blocks: s.block_table.clone(), sampling: None })
                    .into_mut()
            };
            if let Some(p) = &s.sampling {
                k.sampling = Some(to_params(p));
            }
            // The engine borrows each table for the step; moved out here and back in `restore`.
            tables.push((s.sequence_id, std::mem::take(&mut k.blocks)));
            // A full step that samples without parameters samples greedily, as it always has.
            sampling.push(s.sample.then(|| k.sampling.clone().unwrap_or_else(SamplingParams::greedy)));
        }
        Ok(Expanded { tables, sampling })
    }

    /// Puts the tables [`KeptSequences::apply`] lent out back.
    pub fn restore(&mut self, tables: Vec<(u64, Vec<u32>)>) {
        for (id, blocks) in tables {
            if let Some(k) = self.seqs.get_mut(&id) {
                k.blocks = blocks;
            }
        }
    }

    /// Forgets sequences.
    pub fn release(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            self.seqs.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: u64, incremental: bool, blocks: &[u32], sampling: Option<f32>) -> pb::SequenceStep {
        pb::SequenceStep {
            sequence_id: id,
            incremental,
            block_table: if incremental { vec![] } else { blocks.to_vec() },
            appended_blocks: if incremental { blocks.to_vec() } else { vec![] },
            sample: true,
            sampling: sampling.map(|t| pb::SamplingParams { temperature: t, ..Default::default() }),
            ..Default::default()
        }
    }

    fn params(p: &pb::SamplingParams) -> SamplingParams {
        SamplingParams { temperature: p.temperature, ..SamplingParams::greedy() }
    }

    #[test]
    fn incremental_steps_extend_the_kept_table_and_reuse_the_kept_parameters() {
        let mut k = KeptSequences::default();
        let e = k.apply(&[step(1, false, &[4, 5], Some(0.5))], params).unwrap();
        assert_eq!(e.tables, [(1, vec![4, 5])]);
        assert_eq!(e.sampling[0].as_ref().map(|p| p.temperature), Some(0.5));
        k.restore(e.tables);
        let e = k.apply(&[step(1, true, &[9], None)], params).unwrap();
        assert_eq!(e.tables, [(1, vec![4, 5, 9])]);
        assert_eq!(e.sampling[0].as_ref().map(|p| p.temperature), Some(0.5), "kept parameters");
        k.restore(e.tables);
        let e = k.apply(&[step(1, true, &[], Some(0.9))], params).unwrap();
        assert_eq!(e.tables, [(1, vec![4, 5, 9])]);
        assert_eq!(e.sampling[0].as_ref().map(|p| p.temperature), Some(0.9), "new parameters replace them");
        k.restore(e.tables);
        // A full step replaces what was kept.
        let e = k.apply(&[step(1, false, &[7], Some(0.1))], params).unwrap();
        assert_eq!(e.tables, [(1, vec![7])]);
        k.restore(e.tables);
        k.release([1]);
        assert!(k.is_empty());
    }

    #[test]
    fn an_incremental_step_of_an_unknown_sequence_is_refused_and_changes_nothing() {
        let mut k = KeptSequences::default();
        let e = k.apply(&[step(1, false, &[4], Some(0.5))], params).unwrap();
        k.restore(e.tables);
        assert_eq!(k.apply(&[step(1, true, &[5], None), step(2, true, &[6], None)], params).err(), Some(vec![2]));
        let e = k.apply(&[step(1, true, &[], None)], params).unwrap();
        assert_eq!(e.tables, [(1, vec![4])], "the refused step appended nothing");
        // Incremental, sampling, and no parameters on either side: as unknown.
        let mut fresh = KeptSequences::default();
        let e = fresh.apply(&[pb::SequenceStep { sample: false, ..step(3, false, &[1], None) }], params).unwrap();
        fresh.restore(e.tables);
        assert_eq!(fresh.apply(&[step(3, true, &[], None)], params).err(), Some(vec![3]));
    }
}
