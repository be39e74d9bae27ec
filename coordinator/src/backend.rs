//! Where steps run. The generation loop talks to a [`Backend`]: today an engine in this process, with the
//! workers issue a tensor-parallel group of worker processes over gRPC. Both take the same step.

use anyhow::Result;
use tessera_worker::{Engine, SamplingParams, SeqSampled, StepProgress, StepSeq};

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

pub trait Backend: Send {
    fn info(&self) -> ModelInfo;
    /// Runs one step over a batch; returns a token for each sequence that asked to sample, in order.
    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>>;
    /// [`Backend::step`] that may stop before a layer's attention or MLP when `pause()` says so (`Ok(None)`);
    /// steps of other sequences may then run before [`Backend::resume`] finishes it. A backend that cannot
    /// pause (a tensor-parallel group, whose ranks would have to stop at the same point) runs the step whole.
    fn step_pausable(
        &mut self,
        batch: &[StepSeq<'_>],
        _pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>> {
        self.step(batch).map(Some)
    }
    /// Goes on with the paused step (the same batch).
    fn resume(
        &mut self,
        _batch: &[StepSeq<'_>],
        _pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>> {
        anyhow::bail!("this backend does not pause steps")
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

/// An engine in this process (tp = 1).
pub struct LocalBackend {
    pub engine: Engine,
    pub last: WorkerTiming,
    /// Seconds the paused step has run so far.
    paused_seconds: f64,
}

impl LocalBackend {
    pub fn new(engine: Engine) -> Self {
        LocalBackend { engine, last: WorkerTiming::default(), paused_seconds: 0.0 }
    }

    /// Times one call into a pausable step: a step's time is the sum of its calls (its own work, not what
    /// ran while it was paused).
    fn timed(
        &mut self,
        f: impl FnOnce(&mut Engine) -> Result<StepProgress, tessera_worker::StepError>,
    ) -> Result<Option<Vec<SeqSampled>>> {
        let t = std::time::Instant::now();
        let out = f(&mut self.engine);
        let seconds = std::mem::take(&mut self.paused_seconds) + t.elapsed().as_secs_f64();
        Ok(match out? {
            StepProgress::Done(v) => {
                self.last = WorkerTiming { step_seconds: seconds, collective_seconds: 0.0 };
                Some(v)
            }
            StepProgress::Paused => {
                self.paused_seconds = seconds;
                None
            }
        })
    }
}

impl Backend for LocalBackend {
    fn info(&self) -> ModelInfo {
        let c = &self.engine.model.config;
        ModelInfo {
            vocab_size: c.vocab_size,
            max_position_embeddings: c.max_position_embeddings,
            num_blocks: self.engine.cache.num_blocks,
            block_size: self.engine.cache.block_size,
            world_size: 1,
        }
    }

    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>> {
        let t = std::time::Instant::now();
        let out = self.engine.step(batch)?;
        self.last = WorkerTiming { step_seconds: t.elapsed().as_secs_f64(), collective_seconds: 0.0 };
        Ok(out)
    }

    fn step_pausable(
        &mut self,
        batch: &[StepSeq<'_>],
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>> {
        // On a GPU a step costs about the same with a newcomer's prefill in it (memory-bound), so the
        // scheduler never runs one in the middle: pausing would buy nothing.
        if self.engine.model.device != tessera_kernels::Device::Cpu {
            return self.step(batch).map(Some);
        }
        self.timed(|e| e.step_pausable(batch, pause))
    }

    fn resume(&mut self, batch: &[StepSeq<'_>], pause: &(dyn Fn() -> bool + Sync)) -> Result<Option<Vec<SeqSampled>>> {
        self.timed(|e| e.resume(batch, pause))
    }

    fn last_timings(&self) -> Vec<WorkerTiming> {
        vec![self.last]
    }

    fn computes_on_cpu(&self) -> bool {
        self.engine.model.device == tessera_kernels::Device::Cpu
    }

    fn release(&mut self, ids: &[u64]) {
        for &id in ids {
            self.engine.release(id);
        }
    }
}
