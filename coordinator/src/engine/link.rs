//! What connects a replica's engine loop to the server around it: the [`Command`]s it takes, the numbers
//! it publishes ([`ReplicaStats`]), and what it reports to routing through [`LoopHost`] (a failure, and
//! its sequences handed over as [`Migrant`]s). The loop defines this interface; `Replicas` implements it,
//! so the loop never calls into routing.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize},
    },
    time::Instant,
};

use tessera_proto::step::{AdapterSpec, SamplingParams};
use tokio::sync::mpsc::UnboundedSender;

use super::{
    contract::{Event, FinishReason, GenRequest},
    postman::Postman,
};
use crate::{constrain::Constraint, scheduler::Sequence};

pub enum Command {
    Submit(Box<GenRequest>, Instant),
    /// Stop a choice: the handler saw a stop string (`Some(Stop)`) or gave up on it (`None`).
    Abort {
        seq: u64,
        reason: Option<FinishReason>,
    },
    /// Continue a sequence another replica was running when it failed.
    Adopt(Box<Migrant>),
    /// The replica is lost (its group lost a worker): hand everything over and stop.
    Fail(String),
    /// Load a LoRA adapter on the backend between steps, and say how it went.
    LoadAdapter(AdapterSpec, tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Unload a LoRA adapter once no sequence of this replica uses it.
    UnloadAdapter(u32),
}

/// A sequence on its way from a failed replica to another: what it was asked, what it produced so far, and
/// the handler waiting for the rest.
pub struct Migrant {
    pub(super) id: u64,
    /// Prompt followed by the tokens already sent to the client.
    pub(super) tokens: Vec<u32>,
    pub(super) prompt_len: usize,
    pub(super) params: SamplingParams,
    pub(super) max_tokens: usize,
    pub(super) ignore_eos: bool,
    /// Its constraint, after the tokens already sent.
    pub(super) constraint: Option<Constraint>,
    pub(super) adapter: u32,
    pub(super) flow: Option<String>,
    pub(super) weight: f64,
    pub(super) track: Track,
}

impl Migrant {
    pub fn events_closed(&self) -> bool {
        self.track.events.is_closed()
    }

    /// Tokens it adds to a replica's load.
    pub fn charge(&self) -> i64 {
        self.track.charge
    }

    /// Nowhere to go: the handler hears why, through `postman`, after the events its replica posted.
    pub fn fail(self, message: &str, postman: &Postman) {
        postman.post(&self.track.events, Event::Error { choice: self.track.choice, message: message.to_string() });
    }

    /// The sequence to schedule again: prompt plus what was already sent, recomputed as after a preemption.
    pub(super) fn sequence(&mut self) -> Sequence {
        let mut seq = Sequence::new(
            self.id,
            self.tokens[..self.prompt_len].to_vec(),
            self.params.clone(),
            self.max_tokens,
            self.ignore_eos,
        )
        .in_flow(self.flow.clone(), self.weight);
        seq.tokens = self.tokens.clone();
        seq.arrival = self.track.arrival;
        seq.constraint = self.constraint.take();
        seq.adapter = self.adapter;
        seq
    }
}

/// What a replica's loop publishes about itself; read when routing and when metrics are scraped.
#[derive(Default, Debug)]
pub struct ReplicaStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub blocks_used: AtomicUsize,
    pub blocks_total: AtomicUsize,
    /// Prompt + max_tokens of sequences routed here and not finished.
    pub outstanding_tokens: AtomicI64,
    pub requests: AtomicU64,
    /// Fair-share flows with requests on the replica (kept by its loop).
    pub flows: Mutex<HashSet<Option<String>>>,
    /// A request of a flow not in `flows` was sent: the step in flight may pause for it.
    pub newcomer: AtomicBool,
}

impl ReplicaStats {
    pub fn lock_flows(&self) -> std::sync::MutexGuard<'_, HashSet<Option<String>>> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The loop's view changed: `flow` now has requests here (`present`) or none.
    pub fn set_flow(&self, flow: &Option<String>, present: bool) {
        let mut flows = self.lock_flows();
        if present {
            flows.insert(flow.clone());
        } else {
            flows.remove(flow);
        }
    }
}

/// What a loop tells the routing around it (`Replicas` implements it). The loop never routes: it says
/// that its replica failed and hands its sequences over, and routing decides where they go.
pub trait LoopHost: Send + Sync {
    /// The replica failed: take it out of routing. Called before the loop collects its sequences, so that
    /// nothing new is sent to it meanwhile.
    fn withdraw(&self, replica: u64, reason: &str);
    /// Sequences of the failed replica: continue each elsewhere, or fail it.
    fn adopt(&self, migrants: Vec<Migrant>, reason: &str);
    /// The loop published new numbers in its [`ReplicaStats`]: re-sum them (before the step's events go
    /// out, so that a client that sees its response complete also sees it counted).
    fn stats_changed(&self);
}

/// What a loop needs from the server around it: where to publish its numbers and hand over its work.
pub struct Hub {
    pub replica: u64,
    pub stats: Arc<ReplicaStats>,
    pub host: Arc<dyn LoopHost>,
    /// Delivers the loop's events (the same one as the host's, so that a sequence's events stay in order
    /// when it moves).
    pub postman: Postman,
}

/// Per-sequence bookkeeping the scheduler does not need.
pub(super) struct Track {
    pub(super) span: tracing::Span,
    /// Its fair-share flow.
    pub(super) flow: Option<String>,
    pub(super) events: UnboundedSender<Event>,
    /// Its index in the response (`GenRequest::first_choice` + its choice within the request).
    pub(super) choice: usize,
    pub(super) arrival: Instant,
    pub(super) last_token: Option<Instant>,
    pub(super) prompt_tokens: usize,
    /// What it adds to the replica's outstanding tokens (prompt + max_tokens).
    pub(super) charge: i64,
}
