//! The running batch, kept from step to step: sequences in admission order, each found by id, and how many
//! each fair-share flow runs. Admissions, finishes and preemptions update it as they happen, so a step costs
//! what it plans (one look-up per planned sequence), not a search of the batch for each of them.

use std::{
    collections::HashMap,
    ops::{Deref, Index, IndexMut},
};

use super::sequence::Sequence;

/// Sequence ids hash with foldhash: SipHash's resistance to chosen keys buys nothing for ids we assign.
type Ids<V> = HashMap<u64, V, foldhash::fast::RandomState>;

#[derive(Default)]
pub struct Running {
    /// In admission order: preemption takes from the back.
    seqs: Vec<Sequence>,
    /// Each sequence's index in `seqs`.
    at: Ids<usize>,
    /// Sequences running per fair-share flow (flows with none are absent).
    flows: HashMap<Option<String>, usize>,
}

impl Running {
    pub fn push(&mut self, seq: Sequence) {
        self.at.insert(seq.id, self.seqs.len());
        *self.flows.entry(seq.flow.clone()).or_default() += 1;
        self.seqs.push(seq);
    }

    pub fn pop(&mut self) -> Option<Sequence> {
        let seq = self.seqs.pop()?;
        self.forget(&seq);
        Some(seq)
    }

    /// Takes out the sequence at `i`; those after it move up one place.
    pub fn remove(&mut self, i: usize) -> Sequence {
        let seq = self.seqs.remove(i);
        self.forget(&seq);
        self.moved_up(&[i]);
        seq
    }

    /// Takes out every sequence in `ids` (those not running are ignored), in one pass over the batch.
    pub fn remove_all(&mut self, ids: &[u64]) -> Vec<Sequence> {
        let mut places: Vec<usize> = ids.iter().filter_map(|id| self.position(*id)).collect();
        let Some(&first) = places.iter().min() else { return Vec::new() };
        places.sort_unstable();
        let mut kept = Vec::with_capacity(self.seqs.len() - first);
        let mut gone = Vec::with_capacity(places.len());
        for seq in self.seqs.drain(first..) {
            if ids.contains(&seq.id) { gone.push(seq) } else { kept.push(seq) }
        }
        self.seqs.extend(kept);
        for seq in &gone {
            self.forget(seq);
        }
        self.moved_up(&places);
        gone
    }

    pub fn position(&self, id: u64) -> Option<usize> {
        self.at.get(&id).copied()
    }

    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.position(id).map(|i| &self.seqs[i])
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Sequence> {
        self.position(id).map(|i| &mut self.seqs[i])
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Sequence> {
        self.seqs.iter_mut()
    }

    /// Sequences of `flow` running.
    pub fn of_flow(&self, flow: &Option<String>) -> usize {
        self.flows.get(flow).copied().unwrap_or(0)
    }

    /// The flow running the most sequences, and how many.
    pub fn busiest_flow(&self) -> Option<(&Option<String>, usize)> {
        self.flows.iter().map(|(f, &n)| (f, n)).max_by_key(|&(_, n)| n)
    }

    fn forget(&mut self, seq: &Sequence) {
        self.at.remove(&seq.id);
        if let Some(n) = self.flows.get_mut(&seq.flow) {
            *n -= 1;
            if *n == 0 {
                self.flows.remove(&seq.flow);
            }
        }
    }

    /// The sequences at the (sorted) places `removed` left: every other one moves up by the number removed
    /// before it. One pass over the index's table, not a hash look-up per sequence that moved.
    fn moved_up(&mut self, removed: &[usize]) {
        for at in self.at.values_mut() {
            *at -= removed.partition_point(|&r| r < *at);
        }
    }
}

impl Deref for Running {
    type Target = [Sequence];
    fn deref(&self) -> &[Sequence] {
        &self.seqs
    }
}

impl Index<usize> for Running {
    type Output = Sequence;
    fn index(&self, i: usize) -> &Sequence {
        &self.seqs[i]
    }
}

/// Mutable access leaves ids and flows as they are: nothing changes a running sequence's id or flow.
impl IndexMut<usize> for Running {
    fn index_mut(&mut self, i: usize) -> &mut Sequence {
        &mut self.seqs[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::step::SamplingParams;

    fn seq(id: u64, flow: &str) -> Sequence {
        Sequence::new(id, vec![1, 2], SamplingParams::greedy(), 4, false).in_flow(Some(flow.into()), 1.0)
    }

    fn ids(r: &Running) -> Vec<u64> {
        r.iter().map(|s| s.id).collect()
    }

    /// Every id maps to its place and the flow counts match the batch, after any sequence of updates.
    fn consistent(r: &Running) {
        for (i, s) in r.iter().enumerate() {
            assert_eq!(r.position(s.id), Some(i));
        }
        assert_eq!(r.at.len(), r.len());
        let mut flows: HashMap<Option<String>, usize> = HashMap::new();
        for s in r.iter() {
            *flows.entry(s.flow.clone()).or_default() += 1;
        }
        assert_eq!(flows, r.flows);
    }

    #[test]
    fn ids_and_flows_follow_admissions_removals_and_preemptions() {
        let mut r = Running::default();
        for (id, flow) in [(1, "a"), (2, "b"), (3, "a"), (4, "a"), (5, "c"), (6, "b")] {
            r.push(seq(id, flow));
        }
        consistent(&r);
        assert_eq!(r.busiest_flow(), Some((&Some("a".to_string()), 3)));
        assert_eq!(r.remove(1).id, 2);
        consistent(&r);
        assert_eq!(r.pop().map(|s| s.id), Some(6));
        assert_eq!(r.of_flow(&Some("b".into())), 0);
        let gone: Vec<u64> = r.remove_all(&[4, 1, 99]).iter().map(|s| s.id).collect();
        assert_eq!(gone, [1, 4], "in batch order; an id not running is ignored");
        assert_eq!(ids(&r), [3, 5]);
        consistent(&r);
        assert!(r.remove_all(&[42]).is_empty());
        assert_eq!(r.get(5).map(|s| s.id), Some(5));
        assert!(r.get(1).is_none());
        r.push(seq(7, "a"));
        assert_eq!(ids(&r), [3, 5, 7]);
        consistent(&r);
    }

    #[test]
    fn any_sequence_of_updates_keeps_the_order_the_index_and_the_counts() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (mut r, mut model, mut id) = (Running::default(), Vec::new(), 0);
        for _ in 0..2000 {
            match next(4) {
                0 | 1 => {
                    id += 1;
                    r.push(seq(id, ["a", "b", "c"][next(3) as usize]));
                    model.push(id);
                }
                2 if !model.is_empty() => {
                    let i = next(model.len() as u64) as usize;
                    assert_eq!(r.remove(i).id, model.remove(i));
                }
                _ => {
                    let ids: Vec<u64> = (0..next(4)).map(|_| next(id + 2)).collect();
                    let want: Vec<u64> = model.iter().copied().filter(|m| ids.contains(m)).collect();
                    model.retain(|m| !ids.contains(m));
                    assert_eq!(r.remove_all(&ids).iter().map(|s| s.id).collect::<Vec<_>>(), want);
                }
            }
            assert_eq!(ids(&r), model);
            consistent(&r);
        }
    }
}
