//! Where steps run. The generation loop talks to a [`Backend`]: today an engine in this process, with the
//! workers issue a tensor-parallel group of worker processes over gRPC. Both take the same step.

use anyhow::Result;
use tessera_worker::{Engine, SeqSampled, StepSeq};

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
    /// Forgets per-sequence state of finished sequences.
    fn release(&mut self, ids: &[u64]);
    /// Per rank, what the last step cost on the worker.
    fn last_timings(&self) -> Vec<WorkerTiming>;
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

    fn last_timings(&self) -> Vec<WorkerTiming> {
        vec![self.last]
    }

    fn release(&mut self, ids: &[u64]) {
        for &id in ids {
            self.engine.release(id);
        }
    }
}
