//! The engine of one worker: a loaded model shard, its KV cache pool and the per-sequence state that
//! lives between steps (where the sequence has got to, its sampler).
//!
//! [`Engine::step`] is the whole interface, the same one the gRPC `Step` carries: a batch of sequences,
//! each with its new tokens, start position, block table and (when it samples) its sampling parameters.
//! A step is validated completely before anything runs, so a bad step is refused with nothing changed.
//!
//! A step can also be run pausable ([`Engine::step_pausable`]): it stops between a layer's attention and
//! its MLP, or between two layers, when asked,
//! other steps may run meanwhile (a newcomer's prefill, so that its first token does not wait for a whole
//! step of decodes), and [`Engine::resume`] finishes it. Steps run in between are refused if they touch the
//! paused step's sequences or cache blocks.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::Arc,
};

use tessera_kernels::{Device, Tensor, ops};
use tessera_proto::step::mask_allows;
pub use tessera_proto::step::{PromptScores, SeqSampled, StepSeq};

use crate::{
    collective::Collective,
    error::{ModelError, StepError},
    kv_cache::KvCache,
    lora::{Adapter, AdapterLimits},
    model::{Forward, ForwardState, Model, SeqInput},
    sampling::{Sampled, Sampler, SamplingParams},
};

struct SeqState {
    /// The next position the sequence expects: everything before it is in the cache.
    next_pos: usize,
    sampler: Option<Sampler>,
    /// Penalty context that arrived before the first sampling step (chunked prefill): prompt, output.
    pending: (Vec<u32>, Vec<u32>),
}

/// Where a pausable step got to.
#[derive(Debug, PartialEq)]
pub enum StepProgress {
    Done(Vec<SeqSampled>),
    /// Stopped between two halves of the decoder: [`Engine::resume`] with the same batch finishes it.
    Paused,
}

/// A step stopped between two halves of the decoder (attention and MLP, or two layers).
struct PausedStep {
    state: ForwardState,
    /// Each sequence's id, start position and token count: a resume must bring the same batch.
    batch: Vec<(u64, usize, usize)>,
    /// Cache blocks its sequences read, and of those the ones it writes.
    reads: HashSet<u32>,
    writes: HashSet<u32>,
    /// LoRA adapters its sequences run with.
    adapters: HashSet<u32>,
}

impl PausedStep {
    fn new(state: ForwardState, batch: &[StepSeq<'_>], block_size: usize) -> Self {
        PausedStep {
            state,
            batch: batch.iter().map(|s| (s.id, s.start_pos, s.tokens.len())).collect(),
            reads: batch.iter().flat_map(|s| s.block_table.iter().copied()).collect(),
            writes: batch.iter().flat_map(|s| written_blocks(s, block_size)).collect(),
            adapters: batch.iter().map(|s| s.adapter).filter(|&a| a != 0).collect(),
        }
    }
}

/// Runs `f` on a rayon worker thread: each op's parallel loop then starts by work-stealing instead of a
/// cross-thread handoff from the caller (tens of microseconds a step on small models). The caller's span
/// follows the work onto the pool thread.
fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let span = tracing::Span::current();
    rayon::scope(|_| span.in_scope(f))
}

/// The blocks a sequence's step writes: those holding its new positions.
fn written_blocks<'a>(s: &'a StepSeq<'_>, block_size: usize) -> impl Iterator<Item = u32> + 'a {
    let end = s.start_pos + s.tokens.len();
    s.block_table[s.start_pos / block_size..end.div_ceil(block_size)].iter().copied()
}

pub struct Engine {
    pub model: Model,
    pub cache: KvCache,
    comm: Box<dyn Collective>,
    seqs: HashMap<u64, SeqState>,
    paused: Option<PausedStep>,
    /// Prompt tokens scored by the last step, until [`Engine::take_prompt_scores`] (rank 0 only).
    scores: Vec<PromptScores>,
    /// LoRA adapters by the id the coordinator loaded them under (never 0, the base model).
    adapters: HashMap<u32, Arc<Adapter>>,
}

impl Engine {
    pub fn new(model: Model, cache: KvCache, comm: Box<dyn Collective>) -> Self {
        Engine { model, cache, comm, seqs: HashMap::new(), paused: None, scores: Vec::new(), adapters: HashMap::new() }
    }

    /// Loads the LoRA adapter in `dir` as this rank's shard under `id` (> 0), replacing nothing: an id
    /// already taken is an error, as is an adapter that does not fit the model or `limits`.
    pub fn load_adapter(&mut self, id: u32, name: &str, dir: &Path, limits: AdapterLimits) -> Result<(), ModelError> {
        if id == 0 || self.adapters.contains_key(&id) {
            return Err(ModelError::File {
                path: dir.to_path_buf(),
                message: format!("adapter id {id} is the base model's or already taken"),
            });
        }
        let m = &self.model;
        let adapter = Adapter::load(name, dir, &m.config, &m.layout, m.device, limits)?;
        self.adapters.insert(id, Arc::new(adapter));
        Ok(())
    }

    /// Forgets adapter `id`; false if it was not loaded. Steps naming it are refused from now on. Refused
    /// while the paused step uses it: its resume would find the adapter gone halfway through the layers.
    pub fn unload_adapter(&mut self, id: u32) -> Result<bool, StepError> {
        if self.paused.as_ref().is_some_and(|p| p.adapters.contains(&id)) {
            return Err(StepError::Invalid(format!("LoRA adapter {id} is in the paused step: resume it first")));
        }
        Ok(self.adapters.remove(&id).is_some())
    }

    /// Whether adapter `id` is loaded.
    pub fn has_adapter(&self, id: u32) -> bool {
        self.adapters.contains_key(&id)
    }

    /// The loaded adapters' ids and names, by id.
    pub fn adapters(&self) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = self.adapters.iter().map(|(&id, a)| (id, a.name.clone())).collect();
        v.sort_unstable();
        v
    }

    /// Seconds spent in collectives since the last call.
    pub fn take_collective_seconds(&self) -> f64 {
        self.comm.take_seconds()
    }

    /// Sequences with state on this engine.
    pub fn active_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// The prompt tokens the last step scored, by sequence (rank 0; other ranks have none).
    pub fn take_prompt_scores(&mut self) -> Vec<PromptScores> {
        std::mem::take(&mut self.scores)
    }

    /// Drops a sequence's state (its blocks belong to the coordinator and need nothing here).
    pub fn release(&mut self, id: u64) {
        self.seqs.remove(&id);
    }

    fn validate(&self, batch: &[StepSeq<'_>]) -> Result<(), StepError> {
        let mut ids = HashSet::new();
        for s in batch {
            let checked = if ids.insert(s.id) {
                self.check_positions(s)
                    .and_then(|()| self.check_sampling(s))
                    .and_then(|()| self.check_against_paused(s))
            } else {
                Err("appears twice in one step".into())
            };
            checked.map_err(|m| StepError::Invalid(format!("sequence {}: {m}", s.id)))?;
        }
        Ok(())
    }

    /// Tokens, adapter, positions and blocks: within the model, the cache and what this engine holds.
    fn check_positions(&self, s: &StepSeq<'_>) -> Result<(), String> {
        let c = &self.model.config;
        if s.tokens.is_empty() {
            return Err("no tokens".into());
        }
        if s.adapter != 0 && !self.adapters.contains_key(&s.adapter) {
            return Err(format!("LoRA adapter {} is not loaded on this worker", s.adapter));
        }
        if let Some(&t) = s.tokens.iter().chain(s.penalty_context).find(|&&t| t as usize >= c.vocab_size) {
            return Err(format!("token id {t} outside the vocabulary of {}", c.vocab_size));
        }
        let end = s.start_pos + s.tokens.len();
        if end > c.max_position_embeddings {
            return Err(format!("positions up to {end} exceed the model's context of {}", c.max_position_embeddings));
        }
        if !s.begins() {
            match self.seqs.get(&s.id) {
                None => return Err(format!("unknown sequence (start position {} but never seen)", s.start_pos)),
                Some(st) if st.next_pos != s.start_pos => {
                    return Err(format!(
                        "start position {} but the cache holds {} positions",
                        s.start_pos, st.next_pos
                    ));
                }
                _ => {}
            }
        }
        let needed = end.div_ceil(self.cache.block_size);
        if s.block_table.len() < needed {
            return Err(format!("block table has {} blocks, positions up to {end} need {needed}", s.block_table.len()));
        }
        if let Some(&b) = s.block_table.iter().find(|&&b| b as usize >= self.cache.num_blocks) {
            return Err(format!("block {b} out of range (pool has {})", self.cache.num_blocks));
        }
        Ok(())
    }

    /// Sampling parameters, the allowed-token mask and prompt scoring: within the vocabulary.
    fn check_sampling(&self, s: &StepSeq<'_>) -> Result<(), String> {
        let vocab = self.model.config.vocab_size;
        if let Some(p) = s.sample {
            p.validate()?;
        }
        if let Some(mask) = s.allowed.filter(|_| s.sample.is_some()) {
            let words = vocab.div_ceil(32);
            if mask.len() != words {
                return Err(format!(
                    "allowed-token mask of {} words for a vocabulary of {vocab} ({words} words)",
                    mask.len()
                ));
            }
            if !(0..vocab as u32).any(|t| mask_allows(mask, t)) {
                return Err("allowed-token mask allows no token".into());
            }
        }
        if let Some(sp) = s.score_prompt {
            if let Some(t) = sp.next_token.filter(|&t| t as usize >= vocab) {
                return Err(format!("next prompt token {t} outside the vocabulary of {vocab}"));
            }
            if sp.top > vocab {
                return Err(format!("{} prompt logprob alternatives from a vocabulary of {vocab}", sp.top));
            }
        }
        Ok(())
    }

    /// A step taken while another is paused must not touch what the paused one reads or writes.
    fn check_against_paused(&self, s: &StepSeq<'_>) -> Result<(), String> {
        let Some(p) = &self.paused else { return Ok(()) };
        if p.batch.iter().any(|&(id, ..)| id == s.id) {
            return Err("is in the paused step".into());
        }
        if let Some(b) = written_blocks(s, self.cache.block_size).find(|b| p.reads.contains(b)) {
            return Err(format!("writes block {b}, which the paused step uses"));
        }
        if let Some(b) = s.block_table.iter().find(|b| p.writes.contains(b)) {
            return Err(format!("reads block {b}, which the paused step writes"));
        }
        Ok(())
    }

    /// Runs one step. On rank 0 returns a sampled token for each sequence that asked for one, in batch
    /// order; other ranks return an empty list.
    pub fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, StepError> {
        Ok(self.step_with_logits(batch)?.0)
    }

    /// [`Engine::step`], also returning the logits rows (`[n, vocab]`) of the sequences that sampled.
    pub fn step_with_logits(&mut self, batch: &[StepSeq<'_>]) -> Result<(Vec<SeqSampled>, Option<Tensor>), StepError> {
        self.validate(batch)?;
        in_pool(|| {
            let logits = self.forward_whole(batch)?;
            self.finish(batch, logits)
        })
    }

    /// [`Engine::step`] that stops when `pause()` returns true: it is asked before each half of the decoder
    /// (a layer's attention, a layer's MLP) but the first. Paused, the engine takes other steps that leave this one's sequences and
    /// blocks alone; [`Engine::resume`] finishes it. Only a single rank pauses: in a group the step runs
    /// whole.
    pub fn step_pausable(
        &mut self,
        batch: &[StepSeq<'_>],
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<StepProgress, StepError> {
        if self.paused.is_some() {
            return Err(StepError::Invalid("a step is already paused: resume it first".into()));
        }
        self.validate(batch)?;
        self.run(batch, None, pause)
    }

    /// Goes on with the paused step; `batch` must be the one it started with.
    pub fn resume(
        &mut self,
        batch: &[StepSeq<'_>],
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<StepProgress, StepError> {
        let Some(p) = self.paused.take() else {
            return Err(StepError::Invalid("no step is paused".into()));
        };
        if !batch.iter().map(|s| (s.id, s.start_pos, s.tokens.len())).eq(p.batch.iter().copied()) {
            self.paused = Some(p);
            return Err(StepError::Invalid("resume with a batch other than the paused step's".into()));
        }
        self.run(batch, Some(p.state), pause)
    }

    /// Whether a step is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Runs a validated step from the start or from `resume`.
    fn run(
        &mut self,
        batch: &[StepSeq<'_>],
        resume: Option<ForwardState>,
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<StepProgress, StepError> {
        in_pool(|| match self.forward_from(batch, resume, pause)? {
            Forward::Done(logits) => Ok(StepProgress::Done(self.finish(batch, logits)?.0)),
            Forward::Paused(state) => {
                self.paused = Some(PausedStep::new(state, batch, self.cache.block_size));
                Ok(StepProgress::Paused)
            }
        })
    }

    /// Per-sequence bookkeeping and sampling once the forward pass is done.
    fn finish(
        &mut self,
        batch: &[StepSeq<'_>],
        logits: Option<Tensor>,
    ) -> Result<(Vec<SeqSampled>, Option<Tensor>), StepError> {
        for s in batch {
            let st =
                self.seqs.entry(s.id).or_insert(SeqState { next_pos: 0, sampler: None, pending: Default::default() });
            if s.begins() {
                // A sequence starting over (new, or preempted and recomputed) starts its sampler over too.
                st.sampler = None;
                st.pending = (s.penalty_context.to_vec(), s.output_context.to_vec());
            }
            st.next_pos = s.start_pos + s.tokens.len();
            if let Some(p) = s.sample
                && st.sampler.is_none()
            {
                let mut sampler = Sampler::new(p.seed);
                let (prompt, output) = std::mem::take(&mut st.pending);
                sampler.observe_prompt(&prompt);
                // A sequence recomputed after preemption or moved from a failed replica has drawn once per
                // token it produced: a seeded one continues its stream where it was, not from the start.
                if !p.is_greedy() {
                    for _ in 0..output.len() {
                        sampler.next_uniform();
                    }
                }
                for t in output {
                    sampler.observe_output(t);
                }
                st.sampler = Some(sampler);
            }
        }
        let scored = self.model.take_scores();
        self.scores = if self.comm.rank() == 0 {
            scored
                .into_iter()
                .map(|c| PromptScores {
                    id: batch[c.index].id,
                    first_position: c.first_position,
                    tokens: c.tokens,
                    ranks: c.ranks,
                })
                .collect()
        } else {
            Vec::new()
        };
        let Some(logits) = logits else {
            return Ok((Vec::new(), None));
        };
        if self.comm.rank() != 0 {
            return Ok((Vec::new(), None));
        }
        let sampling: Vec<(&StepSeq<'_>, &SamplingParams)> =
            batch.iter().filter_map(|s| s.sample.map(|p| (s, p))).collect();
        // A mask needs the row on the host, as penalties do.
        if logits.device() != Device::Cpu && sampling.iter().all(|(s, p)| p.device_samplable() && s.allowed.is_none()) {
            let out = self.sample_on_device(&logits, &sampling)?;
            return Ok((out, Some(logits)));
        }
        let vocab = self.model.config.vocab_size;
        let rows = logits.host_f32().map_err(StepError::Kernel)?;
        let mut out = Vec::new();
        for ((s, p), row) in sampling.iter().zip(rows.chunks_exact(vocab)) {
            let sampler = self.seqs.get_mut(&s.id).and_then(|st| st.sampler.as_mut()).expect("created above");
            out.push(SeqSampled { id: s.id, sampled: sampler.sample(row, p, s.allowed) });
        }
        drop(rows);
        Ok((out, Some(logits)))
    }

    /// Picks tokens where the logits are (a GPU), copying back one id per row instead of the logits: argmax
    /// for greedy rows, the device's top-k/top-p draw with a uniform from the sequence's own seeded
    /// generator for the others.
    fn sample_on_device(
        &mut self,
        logits: &Tensor,
        sampling: &[(&StepSeq<'_>, &SamplingParams)],
    ) -> Result<Vec<SeqSampled>, StepError> {
        let any_greedy = sampling.iter().any(|(_, p)| p.is_greedy());
        let greedy = if any_greedy { ops::argmax_rows(logits)? } else { Vec::new() };
        let drawn = if sampling.iter().all(|(_, p)| p.is_greedy()) {
            Vec::new()
        } else {
            // Every row gets parameters (the kernel takes all rows); greedy rows' draws are ignored and take
            // no number from their generator.
            let mut params = Vec::with_capacity(sampling.len());
            for (s, p) in sampling {
                let sampler = self.seqs.get_mut(&s.id).and_then(|st| st.sampler.as_mut()).expect("created above");
                params.push(ops::RowSampling {
                    temperature: if p.is_greedy() { 1.0 } else { p.temperature },
                    top_k: p.top_k.min(u32::MAX as usize) as u32,
                    top_p: p.top_p,
                    uniform: if p.is_greedy() { 0.0 } else { sampler.next_uniform() },
                });
            }
            ops::sample_rows(logits, &params)?
        };
        let mut out = Vec::with_capacity(sampling.len());
        for (i, (s, p)) in sampling.iter().enumerate() {
            let token = if p.is_greedy() { greedy[i] } else { drawn[i] };
            let sampler = self.seqs.get_mut(&s.id).and_then(|st| st.sampler.as_mut()).expect("created above");
            sampler.observe_output(token);
            out.push(SeqSampled { id: s.id, sampled: Sampled { token, logprob: None, top_logprobs: Vec::new() } });
        }
        Ok(out)
    }

    /// Runs the forward pass only (no sampling, no per-sequence bookkeeping) and returns the logits rows of
    /// the sequences that sample (`[n, vocab]`). Benchmarks use it to time the model alone.
    pub fn forward(&mut self, batch: &[StepSeq<'_>]) -> Result<Option<Tensor>, StepError> {
        self.validate(batch)?;
        self.forward_whole(batch)
    }

    /// The forward pass of a validated batch, never paused.
    fn forward_whole(&mut self, batch: &[StepSeq<'_>]) -> Result<Option<Tensor>, StepError> {
        let mut state = None;
        loop {
            match self.forward_from(batch, state.take(), &|| false)? {
                Forward::Done(logits) => return Ok(logits),
                Forward::Paused(s) => state = Some(s),
            }
        }
    }

    fn forward_from(
        &mut self,
        batch: &[StepSeq<'_>],
        resume: Option<ForwardState>,
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Forward, StepError> {
        let inputs: Vec<SeqInput> = batch
            .iter()
            .map(|s| {
                let adapter = match s.adapter {
                    0 => None,
                    id => Some(self.adapters.get(&id).map(|a| &**a).ok_or_else(|| {
                        StepError::Invalid(format!("sequence {}: LoRA adapter {id} was unloaded", s.id))
                    })?),
                };
                Ok(SeqInput {
                    tokens: s.tokens,
                    start_pos: s.start_pos,
                    block_table: s.block_table,
                    logits: s.sample.is_some(),
                    score: s.score_prompt,
                    adapter,
                })
            })
            .collect::<Result<_, StepError>>()?;
        let _forward = tracing::info_span!(target: "tessera::worker", "forward", tokens = inputs.iter().map(|s| s.tokens.len()).sum::<usize>()).entered();
        self.model.forward_pausable(&inputs, &mut self.cache, self.comm.as_ref(), resume, pause).map_err(|e| match e {
            ModelError::Kernel(k) => StepError::Kernel(k),
            ModelError::Collective(c) => StepError::Collective(c),
            other => StepError::Invalid(other.to_string()),
        })
    }
}
