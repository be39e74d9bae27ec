//! Where steps run. An engine loop talks to a [`Backend`]: a tensor-parallel group of worker processes over
//! gRPC (`super::group`), or an engine in this process (the `tessera` binary's `LocalBackend`). Both take the
//! same step.

use std::{fmt, time::Duration};

use tessera_proto::step::{AdapterSpec, PromptScores, SamplingParams, ScorePrompt, SeqSampled, StepSeq};

/// Facts about the loaded model a scheduler needs.
#[derive(Clone, Copy, Debug)]
pub struct ModelInfo {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// Ranks in the replica's tensor-parallel group.
    pub world_size: usize,
}

/// How a step failed. The engine loop retires a replica only for the failures that mean it is gone
/// ([`StepFailure::is_fatal`]); a refused step fails only its own sequences.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepFailure {
    /// Validation refused the step before anything ran: nothing changed on any rank, and the replica goes
    /// on serving.
    #[error("{0}")]
    Refused(String),
    /// Ranks of a tensor-parallel group failed: its collectives are out of step for good. Causes come
    /// first (a rank lost, a rank silent past the deadline), consequences after (peers' broken collectives).
    #[error("tensor-parallel group failed: {}", join(.0))]
    Group(Vec<RankFailure>),
    /// The group failed at an earlier step and runs no more.
    #[error("the group failed earlier and cannot run steps: {0}")]
    Retired(String),
    /// The workers hold no state of these sequences and did not run the step: it goes again with them in
    /// full (only from [`Backend::wait`]: [`Backend::step`] does that itself).
    #[error("the workers hold no state of sequences {0:?}")]
    Resend(Vec<u64>),
    /// The backend in this process failed (a kernel, the device), or broke its own contract.
    #[error("{0}")]
    Internal(String),
}

impl StepFailure {
    /// Whether the replica is gone: everything but a refused step, or one to send again.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, StepFailure::Refused(_) | StepFailure::Resend(_))
    }
}

/// One rank's part in a group's failure.
#[derive(Debug, Clone, PartialEq)]
pub enum RankFailure {
    /// The transport failed: the process died or cannot be reached.
    Lost { rank: usize, address: String, message: String },
    /// No answer within the step deadline.
    Timeout { rank: usize, address: String, timeout: Duration },
    /// The rank's collective failed (usually because a peer is lost).
    CollectiveBroken { rank: usize, address: String, message: String },
}

impl RankFailure {
    /// Causes before consequences: a lost rank, then a silent one, then a broken collective.
    fn precedence(&self) -> u8 {
        match self {
            RankFailure::Lost { .. } => 0,
            RankFailure::Timeout { .. } => 1,
            RankFailure::CollectiveBroken { .. } => 2,
        }
    }

    /// Orders a group's failures for its message: causes first, then by text.
    pub fn sort(failures: &mut [RankFailure]) {
        failures.sort_by_cached_key(|f| (f.precedence(), f.to_string()));
    }
}

impl fmt::Display for RankFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RankFailure::Lost { rank, address, message } => {
                write!(f, "worker rank {rank} at {address} failed: {message}")
            }
            RankFailure::Timeout { rank, address, timeout } => {
                write!(f, "worker rank {rank} at {address} did not answer within {timeout:?}")
            }
            RankFailure::CollectiveBroken { rank, address, message } => {
                write!(f, "worker rank {rank} at {address}: {message}")
            }
        }
    }
}

fn join(failures: &[RankFailure]) -> String {
    failures.iter().map(RankFailure::to_string).collect::<Vec<_>>().join("; ")
}

pub trait Backend: Send {
    fn info(&self) -> ModelInfo;
    /// Runs one step over a batch; returns a token for each sequence that asked to sample, in order.
    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, StepFailure>;
    /// Whether steps can pause ([`Backend::step_pausable`]): only then does the engine loop run steps in
    /// the middle of others. Not a tensor-parallel group (its ranks would have to stop at the same point),
    /// nor a GPU (a step costs about the same with a newcomer's prefill in it, so pausing buys nothing).
    fn can_pause(&self) -> bool {
        false
    }
    /// [`Backend::step`] that may stop before a layer's attention or MLP when `pause()` says so (`Ok(None)`);
    /// steps of other sequences may then run before [`Backend::resume`] finishes it. Called only when
    /// [`Backend::can_pause`]; a backend that cannot pause runs the step whole.
    fn step_pausable(
        &mut self,
        batch: &[StepSeq<'_>],
        _pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
        self.step(batch).map(Some)
    }
    /// Goes on with the paused step (the same batch).
    fn resume(
        &mut self,
        _batch: &[StepSeq<'_>],
        _pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
        Err(StepFailure::Internal("this backend does not pause steps".into()))
    }
    /// Whether a step can run while the engine loop prepares the next ([`Backend::submit`], then
    /// [`Backend::wait`]): where the forward pass runs off the loop's thread (a group of worker processes).
    fn can_overlap(&self) -> bool {
        false
    }
    /// Sends a step and returns while it runs; [`Backend::wait`] takes its result. Called only when
    /// [`Backend::can_overlap`], and never twice without a `wait` between.
    fn submit(&mut self, _batch: &[StepSeq<'_>]) -> Result<(), StepFailure> {
        Err(StepFailure::Internal("this backend does not overlap steps".into()))
    }
    /// The result of the step [`Backend::submit`] sent: as [`Backend::step`]'s, or
    /// [`StepFailure::Resend`] when the workers asked for sequences in full (the step did not run).
    fn wait(&mut self) -> Result<Vec<SeqSampled>, StepFailure> {
        Err(StepFailure::Internal("no step was submitted".into()))
    }
    /// Forgets per-sequence state of finished sequences.
    fn release(&mut self, ids: &[u64]);
    /// Whether steps run on this process's CPU, in rayon's parallel loops (the engine loop then runs on a
    /// thread of their pool: `engine_loop::spawn`).
    fn computes_on_cpu(&self) -> bool {
        false
    }
    /// Per rank, what the last step cost on the worker.
    fn last_timings(&self) -> Vec<WorkerTiming>;
    /// The prompt tokens the last step scored (its sequences with `score_prompt`), taken once.
    fn take_prompt_scores(&mut self) -> Vec<PromptScores> {
        Vec::new()
    }
    /// Loads a LoRA adapter on every rank, between steps; loading one already loaded (same id) does
    /// nothing. The message of a failure names the file and field or tensor at fault.
    fn load_adapter(&mut self, spec: &AdapterSpec) -> Result<(), String> {
        Err(format!("this backend cannot load LoRA adapters (asked for {})", spec.name))
    }
    /// Forgets a LoRA adapter on every rank; steps naming it are refused from then on.
    fn unload_adapter(&mut self, _id: u32) -> Result<(), String> {
        Ok(())
    }
}

/// A step's sequence with its own copies of what [`StepSeq`] borrows: a paused step keeps its batch while
/// the scheduler moves on.
pub struct OwnedStepSeq {
    id: u64,
    tokens: Vec<u32>,
    start_pos: usize,
    block_table: Vec<u32>,
    sample: Option<SamplingParams>,
    penalty_context: Vec<u32>,
    output_context: Vec<u32>,
    starts: bool,
    score_prompt: Option<ScorePrompt>,
    allowed: Option<Vec<u32>>,
    adapter: u32,
}

impl OwnedStepSeq {
    pub fn new(s: &StepSeq<'_>) -> Self {
        OwnedStepSeq {
            id: s.id,
            tokens: s.tokens.to_vec(),
            start_pos: s.start_pos,
            block_table: s.block_table.to_vec(),
            sample: s.sample.cloned(),
            penalty_context: s.penalty_context.to_vec(),
            output_context: s.output_context.to_vec(),
            starts: s.starts,
            score_prompt: s.score_prompt,
            allowed: s.allowed.map(<[u32]>::to_vec),
            adapter: s.adapter,
        }
    }

    pub fn view(&self) -> StepSeq<'_> {
        StepSeq {
            id: self.id,
            tokens: &self.tokens,
            start_pos: self.start_pos,
            block_table: &self.block_table,
            sample: self.sample.as_ref(),
            penalty_context: &self.penalty_context,
            output_context: &self.output_context,
            starts: self.starts,
            score_prompt: self.score_prompt,
            allowed: self.allowed.as_deref(),
            adapter: self.adapter,
        }
    }
}

/// One rank's share of a step, as the worker measured it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkerTiming {
    /// The whole step on the worker (forward pass and sampling).
    pub step_seconds: f64,
    /// Of which in collectives, waiting on peers included.
    pub collective_seconds: f64,
}
