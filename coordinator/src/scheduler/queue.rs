//! The waiting queue, in weighted fair-queuing order (start-time fair queuing across flows, as vLLM keeps
//! its `request_queue.py` apart from the scheduler).
//!
//! A request's tag is where its flow's previous request ends in virtual time, or the current virtual time
//! if that is later, plus its cost (prompt + `max_tokens`) over its flow's weight; the queue is kept in tag
//! order, so a flow with one request waiting goes ahead of another flow's backlog. Virtual time advances to
//! the start tag of each sequence admitted. The preemption victim for fairness is chosen here too.

use std::collections::{HashMap, VecDeque};

use super::{running::Running, sequence::Sequence};

#[derive(Default)]
pub struct FairQueue {
    waiting: VecDeque<Sequence>,
    /// Virtual time: the start tag of the last sequence admitted.
    vtime: f64,
    /// Each flow's last finish tag.
    flow_finish: HashMap<Option<String>, f64>,
}

impl FairQueue {
    /// Queues `seq` as its flow's next request, in tag order.
    pub fn push(&mut self, mut seq: Sequence) {
        let last = self.flow_finish.get(&seq.flow).copied().unwrap_or(0.0);
        seq.start_tag = last.max(self.vtime);
        let cost = (seq.prompt_len + seq.max_tokens).max(1) as f64;
        seq.finish_tag = seq.start_tag + cost / seq.weight;
        self.flow_finish.insert(seq.flow.clone(), seq.finish_tag);
        let at = self.waiting.iter().position(|w| w.finish_tag > seq.finish_tag).unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
    }

    /// Puts `seq` back at the head, keeping its tags: it was preempted for blocks, or could not be admitted
    /// for want of them, and goes first when there is room.
    pub fn push_front(&mut self, seq: Sequence) {
        self.waiting.push_front(seq);
    }

    pub fn pop_front(&mut self) -> Option<Sequence> {
        self.waiting.pop_front()
    }

    pub fn front(&self) -> Option<&Sequence> {
        self.waiting.front()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Sequence> {
        self.waiting.iter()
    }

    /// Takes sequence `id` out of the queue.
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        let i = self.waiting.iter().position(|s| s.id == id)?;
        self.waiting.remove(i)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Sequence> {
        self.waiting.iter_mut().find(|s| s.id == id)
    }

    /// `seq` leaves the queue to run: virtual time catches up with it.
    pub fn admitted(&mut self, seq: &Sequence) {
        self.vtime = self.vtime.max(seq.start_tag);
    }

    /// The head of the queue belongs to a flow with nothing in `running`.
    pub fn head_is_newcomer(&self, running: &Running) -> bool {
        self.waiting.front().is_some_and(|head| running.of_flow(&head.flow) == 0)
    }
}

/// The sequence fairness preempts: the newest of the flow running the most, if it runs two or more.
pub fn fairness_victim(running: &Running) -> Option<usize> {
    let (flow, n) = running.busiest_flow()?;
    if n < 2 {
        return None;
    }
    running.iter().rposition(|s| &s.flow == flow)
}
