//! The in-process backend: an engine of this process (tp = 1) behind the coordinator's [`Backend`] trait,
//! so `tessera serve` without `--tp` runs the same engine loop as a group of workers does. Its steps can
//! pause on the CPU (a newcomer's step runs in the middle; `tessera_coordinator::engine::engine_loop`).

use std::path::Path;
use tessera_coordinator::engine::backend::{Backend, ModelInfo, StepFailure, WorkerTiming};

use tessera_proto::step::AdapterSpec;
use tessera_worker::{Engine, SeqSampled, StepError, StepProgress, StepSeq, lora::AdapterLimits};

/// A refused step changed nothing (the engine validates the whole batch first); anything else is the
/// engine's own failure.
fn failure(e: StepError) -> StepFailure {
    match e {
        StepError::Invalid(_) => StepFailure::Refused(e.to_string()),
        _ => StepFailure::Internal(e.to_string()),
    }
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
        f: impl FnOnce(&mut Engine) -> Result<StepProgress, StepError>,
    ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
        let t = std::time::Instant::now();
        let out = f(&mut self.engine);
        let seconds = std::mem::take(&mut self.paused_seconds) + t.elapsed().as_secs_f64();
        Ok(match out.map_err(failure)? {
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

    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, StepFailure> {
        let t = std::time::Instant::now();
        let out = self.engine.step(batch).map_err(failure)?;
        self.last = WorkerTiming { step_seconds: t.elapsed().as_secs_f64(), collective_seconds: 0.0 };
        Ok(out)
    }

    fn step_pausable(
        &mut self,
        batch: &[StepSeq<'_>],
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
        self.timed(|e| e.step_pausable(batch, pause))
    }

    fn resume(
        &mut self,
        batch: &[StepSeq<'_>],
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
        self.timed(|e| e.resume(batch, pause))
    }

    fn last_timings(&self) -> Vec<WorkerTiming> {
        vec![self.last]
    }

    fn take_prompt_scores(&mut self) -> Vec<tessera_worker::PromptScores> {
        self.engine.take_prompt_scores()
    }

    /// On the CPU only: on a GPU a step costs about the same with a newcomer's prefill in it
    /// (memory-bound), so the scheduler would never run one in the middle.
    fn can_pause(&self) -> bool {
        self.engine.model.device == tessera_kernels::Device::Cpu
    }

    fn computes_on_cpu(&self) -> bool {
        self.engine.model.device == tessera_kernels::Device::Cpu
    }

    fn release(&mut self, ids: &[u64]) {
        for &id in ids {
            self.engine.release(id);
        }
    }

    fn load_adapter(&mut self, spec: &AdapterSpec) -> Result<(), String> {
        if self.engine.has_adapter(spec.id) {
            return Ok(());
        }
        let limits = AdapterLimits { max_rank: spec.max_rank as usize };
        self.engine.load_adapter(spec.id, &spec.name, Path::new(&spec.path), limits).map_err(|e| e.to_string())
    }

    fn unload_adapter(&mut self, id: u32) -> Result<(), String> {
        self.engine.unload_adapter(id).map(drop).map_err(|e| e.to_string())
    }
}
