//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2): weights of one tensor-parallel shard and the
//! batched forward pass over a paged KV cache, built as candle's `llama.rs` builds it: a [`Model`] of
//! [`block::Block`]s, each an [`attention::Attention`] and an [`mlp::Mlp`] with its own `load` and
//! `forward`.
//!
//! - [`shard`]: this rank's place in its group and the heads, features and vocabulary rows it holds;
//! - [`block`], [`attention`], [`mlp`]: the decoder's parts;
//! - [`pass`]: what the parts of one pass share (per-token inputs, the collective, the profiler);
//! - [`scoring`]: prompt logprobs, the logits of every position of a chunk that asks for them;
//! - [`profile`]: device time per op, for benchmarks.
//!
//! Sharding is Megatron-style: q/k/v and gate/up are split by output rows (heads, intermediate features),
//! o and down by input columns followed by an all-reduce, the embedding is replicated and `lm_head` is split
//! by vocabulary and all-gathered. With a world of one every slice is the whole tensor.
//!
//! A pass is a sequence of sublayers (each block's attention, then its MLP); a pausable pass
//! ([`Model::forward_pausable`]) may stop between two of them and go on later.

pub mod attention;
pub mod block;
pub mod mlp;
pub mod pass;
pub mod profile;
pub mod scoring;
pub mod shard;

use std::{path::Path, sync::Mutex, time::Instant};

use tessera_proto::step::ScorePrompt;

use tessera_kernels::{
    DType, Device, Tensor,
    cpu::quant::random::random_blocks,
    ops::{self, AttentionSeq, AttentionShape},
};

pub use self::shard::{Shard, ShardLayout};
use self::{
    block::{Block, Sublayer},
    pass::{Ctx, TokenInputs, WeightSource},
    profile::OpProfile,
};
use crate::{
    collective::Collective,
    config::ModelConfig,
    error::ModelError,
    gguf_model::GgufModel,
    kv_cache::{KvCache, KvGeometry},
    lora::{Adapter, LoraBatch},
    quantize::QuantizeTo,
    weights::{Slice, WeightFiles},
};

/// A forward pass stopped between two sublayers: the residual stream, the next sublayer's normed input,
/// and the per-token inputs computed when it started.
pub struct ForwardState {
    x: Tensor,
    h: Tensor,
    /// The sublayer to run next (`Sublayer::nth`).
    next: usize,
    tokens: TokenInputs,
}

/// What [`Model::forward_pausable`] got to.
pub enum Forward {
    /// Finished: the logits of the sequences that asked for them, as [`Model::forward`] returns them.
    Done(Option<Tensor>),
    Paused(ForwardState),
}

/// One sequence's part of a forward pass.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// New tokens this pass (prefill chunk or one decode token).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions before it are already in the cache.
    pub start_pos: usize,
    /// Cache blocks covering positions `0..start_pos + tokens.len()`.
    pub block_table: &'a [u32],
    /// Whether to compute logits for the last token.
    pub logits: bool,
    /// Score the prompt tokens this chunk's positions predict ([`scoring`]).
    pub score: Option<ScorePrompt>,
    /// The LoRA adapter over the base weights for this sequence (none: the base model).
    pub adapter: Option<&'a Adapter>,
}

pub struct Model {
    pub config: ModelConfig,
    pub shard: Shard,
    pub layout: ShardLayout,
    /// Where the weights and the KV cache live: f32 on the CPU, bf16 on CUDA.
    pub device: Device,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// This rank's vocabulary rows of the output projection.
    lm_head: Tensor,
    /// RoPE inverse frequencies when they do not depend on the sequence length.
    inv_freq: Vec<f32>,
    /// Per-op device time, collected only while [`Model::profile_ops`] is on (benchmarks).
    profile: OpProfile,
    /// The prompt scores of the last pass, until [`Model::take_scores`].
    scored: Mutex<Vec<scoring::ScoredChunk>>,
}

impl Model {
    /// Loads the shard `shard` of the model at `path` (a model directory or a GGUF file) on the CPU.
    pub fn load(path: &Path, shard: Shard) -> Result<Self, ModelError> {
        Self::load_on(path, shard, Device::Cpu)
    }

    /// Loads the shard `shard` of the model at `path` onto `device`: a Hugging Face model directory, or a
    /// GGUF file ([`crate::gguf_model`]).
    pub fn load_on(path: &Path, shard: Shard, device: Device) -> Result<Self, ModelError> {
        Self::load_with(path, shard, device, None)
    }

    /// [`Model::load_on`], with a model directory's matrices quantized to `quantize` as they load
    /// ([`crate::quantize`]; not for a GGUF file, whose weights are quantized already). On a GPU the
    /// blocks go to the device, as a GGUF file's do.
    pub fn load_with(
        path: &Path,
        shard: Shard,
        device: Device,
        quantize: Option<QuantizeTo>,
    ) -> Result<Self, ModelError> {
        tessera_kernels::ensure_available(device)?;
        if let Some(q) = quantize
            && path.is_file()
        {
            return Err(ModelError::File {
                path: path.to_path_buf(),
                message: format!("--quantize {q} is for model directories: a GGUF file runs in its own formats"),
            });
        }
        let model = if path.is_file() {
            Self::from_gguf(&GgufModel::open(path)?, shard, device)?
        } else if path.is_dir() {
            let config = ModelConfig::load(path)?;
            let files = WeightFiles::open(path)?;
            Self::from_weights_quantized(config, &files, shard, device, quantize)?
        } else {
            return Err(ModelError::NoModel(path.to_path_buf()));
        };
        give_back_load_scratch();
        Ok(model)
    }

    /// The config of the model at `path`: a directory's `config.json`, or a GGUF file's metadata.
    pub fn config_at(path: &Path) -> Result<ModelConfig, ModelError> {
        if path.is_file() {
            crate::gguf_model::read_config(path)
        } else if path.is_dir() {
            ModelConfig::load(path)
        } else {
            Err(ModelError::NoModel(path.to_path_buf()))
        }
    }

    /// The shard `shard` of an opened GGUF model. Its quantized matrices stay in their block formats, on
    /// either device (decoded where they are read); everything else becomes f32 on the CPU, bf16 on a GPU.
    pub fn from_gguf(gguf: &GgufModel, shard: Shard, device: Device) -> Result<Self, ModelError> {
        let dtype = Self::weight_dtype(device);
        Self::build(gguf.config.clone(), shard, device, &|name, shape, slice| {
            if let Some(t) = gguf.load_blocks(name, shape, slice.clone(), device)? {
                return Ok(t);
            }
            if device == Device::Cpu {
                return gguf.load(name, shape, slice);
            }
            Ok(gguf.load(name, shape, slice)?.to_dtype(dtype)?.to_device(device)?)
        })
    }

    /// Refuses, before anything is loaded, a split into `tp` ranks that the model at `path` cannot take:
    /// uneven heads or features, or (a GGUF file) quantized blocks cut between ranks.
    pub fn check_split(path: &Path, tp: usize) -> Result<(), ModelError> {
        let config = Self::config_at(path)?;
        ShardLayout::new(&config, Shard { rank: 0, world: tp })?;
        if path.is_file() {
            GgufModel::open(path)?.check_split(tp)?;
        }
        Ok(())
    }

    pub fn from_weights(
        config: ModelConfig,
        w: &WeightFiles,
        shard: Shard,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::from_weights_quantized(config, w, shard, device, None)
    }

    fn from_weights_quantized(
        config: ModelConfig,
        w: &WeightFiles,
        shard: Shard,
        device: Device,
        quantize: Option<QuantizeTo>,
    ) -> Result<Self, ModelError> {
        let dtype = Self::weight_dtype(device);
        let tied = config.tie_word_embeddings;
        Self::build(config, shard, device, &|name, shape, slice| {
            let t = w.load(name, shape, slice)?;
            let t = match quantize {
                Some(q) => q.apply(name, t, tied)?,
                None => t,
            };
            match t.dtype() {
                _ if device == Device::Cpu => Ok(t),
                DType::Quant(_) => Ok(t.to_device(device)?),
                _ => Ok(t.to_dtype(dtype)?.to_device(device)?),
            }
        })
    }

    /// A model of `config`'s shape with random weights made on `device` itself (uniform, scaled by each
    /// matrix's fan-in; norms one): benchmarks use it where no checkpoint of that size exists. The same
    /// seed gives the same weights on every device.
    pub fn random(config: ModelConfig, shard: Shard, device: Device, seed: u64) -> Result<Self, ModelError> {
        Self::random_in(config, shard, device, seed, None)
    }

    /// [`Model::random`] with its matrices as random blocks of the formats `quantize` gives them (for
    /// benchmarks of quantized models: their speed does not depend on the values).
    pub fn random_in(
        config: ModelConfig,
        shard: Shard,
        device: Device,
        seed: u64,
        quantize: Option<QuantizeTo>,
    ) -> Result<Self, ModelError> {
        tessera_kernels::ensure_available(device)?;
        let dtype = Self::weight_dtype(device);
        let tied = config.tie_word_embeddings;
        Self::build(config, shard, device, &|name, shape, slice| {
            let full = shape.to_vec();
            let local: Vec<usize> = match (&slice, shape) {
                (Slice::Full, _) => full.clone(),
                (Slice::Rows(r), [_]) => vec![r.len()],
                (Slice::Rows(r), [_, c]) => vec![r.len(), *c],
                (Slice::Cols(c), [r, _]) => vec![*r, c.len()],
                _ => return Err(ModelError::Sharding(format!("{name}: slice {slice:?} of {shape:?}"))),
            };
            if name.ends_with("norm.weight") {
                let ones = Tensor::from_f32(vec![1.0; local.iter().product()], &local)?;
                return Ok(ones.to_dtype(dtype)?.to_device(device)?);
            }
            let fan_in = *full.last().unwrap_or(&1) as f32;
            let mut h = std::hash::DefaultHasher::new();
            std::hash::Hash::hash(&(name, seed), &mut h);
            let s = std::hash::Hasher::finish(&h);
            if let (Some(q), [rows, cols]) = (quantize, &local[..])
                && name.ends_with(".weight")
                && let Some(ty) = q.type_for(name, *cols, tied)
                && let Some(bytes) = random_blocks(ty, *rows, *cols, s, 1.0 / fan_in.sqrt())
            {
                return Ok(Tensor::from_quant_on(ty, bytes, &local, device)?);
            }
            Ok(Tensor::uniform(&local, dtype, device, s, 1.0 / fan_in.sqrt())?)
        })
    }

    fn weight_dtype(device: Device) -> DType {
        if device == Device::Cpu { DType::F32 } else { DType::BF16 }
    }

    /// Builds the shard from a source of weights: `get(name, full_shape, slice)` returns this rank's slice,
    /// already on `device`.
    fn build(config: ModelConfig, shard: Shard, device: Device, get: &WeightSource<'_>) -> Result<Self, ModelError> {
        let c = &config;
        let layout = ShardLayout::new(c, shard)?;
        let h = c.hidden_size;
        let blocks = (0..c.num_layers)
            .map(|i| Block::load(get, c, &layout, i, shard.rank == 0))
            .collect::<Result<Vec<_>, _>>()?;
        let embed = get("model.embed_tokens.weight", &[c.vocab_size, h], Slice::Full)?;
        let head_name = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let lm_head = if shard.world == 1 && c.tie_word_embeddings {
            embed.clone()
        } else {
            get(head_name, &[c.vocab_size, h], Slice::Rows(layout.vocab.clone()))?
        };
        let norm = get("model.norm.weight", &[h], Slice::Full)?;
        let inv_freq = c.rope.inv_freq(c.max_position_embeddings);
        Ok(Model {
            config,
            shard,
            layout,
            device,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
            profile: OpProfile::default(),
            scored: Mutex::new(Vec::new()),
        })
    }

    /// Starts (or stops) recording the device time of each op of the forward pass.
    pub fn profile_ops(&self, on: bool) {
        self.profile.set(on);
    }

    /// The recorded (op, seconds, calls), in first-seen order, and clears them.
    pub fn take_op_profile(&self) -> Vec<(&'static str, f64, usize)> {
        self.profile.take()
    }

    /// The format the embedding table is kept in (a quantized file's stays quantized on the CPU).
    pub fn embedding_dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// KV heads held by this rank.
    pub fn local_kv_heads(&self) -> usize {
        self.layout.kv_heads.len()
    }

    /// The shape of a KV cache pool for this shard.
    pub fn kv_geometry(&self) -> KvGeometry {
        KvGeometry {
            layers: self.config.num_layers,
            kv_heads: self.local_kv_heads(),
            head_dim: self.config.head_dim,
            device: self.device,
        }
    }

    /// Bytes of weights this rank reads per decoded token (everything but the embedding table, of which a
    /// decode reads one row).
    pub fn weight_bytes_per_token(&self) -> usize {
        let blocks: usize = self.blocks.iter().map(Block::weight_bytes).sum();
        blocks + self.norm.size_in_bytes() + self.lm_head.size_in_bytes()
    }

    /// The per-token inputs of a pass (positions, cache slots, RoPE frequencies) and the first layer's
    /// input: the embeddings and their norm.
    fn forward_start(
        &self,
        seqs: &[SeqInput<'_>],
        block_size: usize,
        at: &mut Instant,
    ) -> Result<ForwardState, ModelError> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        for s in seqs {
            ids.extend_from_slice(s.tokens);
            for p in s.start_pos..s.start_pos + s.tokens.len() {
                positions.push(p as u32);
                slots.push(tessera_kernels::cpu::attention::slot(s.block_table, block_size, p));
            }
        }
        // Dynamic RoPE rescales by each sequence's own length, as transformers does per forward call: then
        // every token carries its sequence's frequencies.
        let freqs: Vec<f32> = if c.rope.depends_on_length() {
            let mut f = Vec::with_capacity(ids.len() * c.head_dim / 2);
            for s in seqs {
                let table = c.rope.inv_freq(s.start_pos + s.tokens.len());
                for _ in 0..s.tokens.len() {
                    f.extend_from_slice(&table);
                }
            }
            f
        } else {
            self.inv_freq.clone()
        };
        let x = ops::embedding(&ids, &self.embed)?;
        // Each layer's input norm is fused with the residual add that ends the layer before it.
        let h = match self.blocks.first() {
            Some(l) => ops::rms_norm(&x, &l.input_norm, c.rms_norm_eps)?,
            None => x.clone(),
        };
        self.profile.lap(self.device, "embedding + norm", at)?;
        Ok(ForwardState { x, h, next: 0, tokens: TokenInputs { positions, slots, freqs } })
    }

    fn attention_shape(&self, block_size: usize) -> AttentionShape {
        let c = &self.config;
        AttentionShape {
            num_heads: self.layout.heads.len(),
            num_kv_heads: self.layout.kv_heads.len(),
            head_dim: c.head_dim,
            block_size,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            sliding_window: c.sliding_window,
        }
    }

    /// Runs the decoder over a batch and returns logits `[n, vocab]` for the `n` sequences that asked for
    /// them, in batch order. Every rank must call this with the same batch; only the full vocabulary on
    /// every rank is returned (the all-gather makes it available everywhere, rank 0 uses it).
    /// Inputs must have been validated (see `Engine::step`).
    pub fn forward(
        &self,
        seqs: &[SeqInput<'_>],
        cache: &mut KvCache,
        comm: &dyn Collective,
    ) -> Result<Option<Tensor>, ModelError> {
        let mut state = None;
        loop {
            match self.forward_pausable(seqs, cache, comm, state.take(), &|| false)? {
                Forward::Done(logits) => return Ok(logits),
                Forward::Paused(s) => state = Some(s),
            }
        }
    }

    /// [`Model::forward`] that stops before a sublayer (a block's attention or its MLP; never before the
    /// first) when `pause()` says so, and returns where it stood; called again with that state (and the
    /// same batch), it goes on from there. At least one sublayer runs per call. Between the calls the cache
    /// may serve other sequences' passes, as long as they write no block this one reads or writes (`Engine`
    /// checks). A single rank only: a group's ranks would have to stop at the same point.
    pub fn forward_pausable(
        &self,
        seqs: &[SeqInput<'_>],
        cache: &mut KvCache,
        comm: &dyn Collective,
        resume: Option<ForwardState>,
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Forward, ModelError> {
        let attn_seqs = attention_rows(seqs);
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if rows == 0 {
            return Ok(Forward::Done(None));
        }
        let mut at = Instant::now();
        let ForwardState { mut x, mut h, next, tokens } = match resume {
            Some(state) => state,
            None => self.forward_start(seqs, cache.block_size, &mut at)?,
        };
        let lora = LoraBatch::new(seqs.iter().map(|s| (s.adapter, s.tokens.len())));
        let ctx = Ctx {
            tokens: &tokens,
            attn_seqs: &attn_seqs,
            shape: self.attention_shape(cache.block_size),
            eps: self.config.rms_norm_eps,
            rows,
            comm,
            lora: &lora,
            device: self.device,
            profile: &self.profile,
        };
        // Sublayers, not blocks, so that a newcomer waits for at most one attention or one MLP of the step
        // in flight (on a small model under a flood, a layer of 64 decodes is a few hundred microseconds).
        for i in next..2 * self.blocks.len() {
            if i > next && comm.world_size() == 1 && pause() {
                return Ok(Forward::Paused(ForwardState { x, h, next: i, tokens }));
            }
            let (layer, sub) = Sublayer::nth(i);
            let block = &self.blocks[layer];
            if let Some(next_h) =
                block.forward(sub, &mut x, &h, self.blocks.get(layer + 1), &ctx, cache, layer, &mut at)?
            {
                h = next_h;
            }
        }
        self.logits(&x, seqs, &attn_seqs, comm, &mut at).map(Forward::Done)
    }

    /// The prompt tokens the last pass scored (sequences with [`SeqInput::score`]), taken once.
    pub fn take_scores(&self) -> Vec<scoring::ScoredChunk> {
        std::mem::take(&mut *self.scored.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The final norm and the vocabulary projection for the last token of each sequence that samples
    /// (only those need it: it is the most expensive projection), all-gathered across the group; before
    /// them, the positions of chunks that score their prompt tokens.
    fn logits(
        &self,
        x: &Tensor,
        seqs: &[SeqInput<'_>],
        attn_seqs: &[AttentionSeq<'_>],
        comm: &dyn Collective,
        at: &mut Instant,
    ) -> Result<Option<Tensor>, ModelError> {
        let chunks: Vec<scoring::Chunk> = seqs
            .iter()
            .zip(attn_seqs)
            .enumerate()
            .filter_map(|(index, (s, a))| {
                let score = s.score?;
                Some(scoring::Chunk { index, first_row: a.q_start, tokens: s.tokens, start_pos: s.start_pos, score })
            })
            .collect();
        let scores = scoring::score(&chunks, self.config.vocab_size, |rows| self.vocab_rows(x, rows, comm, at))?;
        *self.scored.lock().unwrap_or_else(|p| p.into_inner()) = scores;
        let rows: Vec<u32> = attn_seqs
            .iter()
            .zip(seqs)
            .filter(|(_, s)| s.logits)
            .map(|(a, _)| (a.q_start + a.q_len - 1) as u32)
            .collect();
        if rows.is_empty() {
            return Ok(None);
        }
        self.vocab_rows(x, &rows, comm, at).map(Some)
    }

    /// Logits `[rows.len(), vocab]` of these rows of the residual stream: final norm, this rank's
    /// vocabulary projection, and the all-gather of every rank's (on the device with a world of one).
    fn vocab_rows(
        &self,
        x: &Tensor,
        rows: &[u32],
        comm: &dyn Collective,
        at: &mut Instant,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let n = rows.len();
        let last = ops::rms_norm(&ops::gather_rows(x, rows)?, &self.norm, c.rms_norm_eps)?;
        let local = ops::linear_to(&last, &self.lm_head, None, DType::F32)?;
        self.profile.lap(self.device, "final norm + lm_head", at)?;
        if comm.world_size() == 1 {
            return Ok(local);
        }
        let parts = comm.all_gather(&local.host_f32()?)?;
        // Each part is [n, local_vocab]; interleave rows back into [n, vocab].
        let mut full = Vec::with_capacity(n * c.vocab_size);
        for r in 0..n {
            for part in &parts {
                let w = part.len() / n;
                full.extend_from_slice(&part[r * w..(r + 1) * w]);
            }
        }
        Ok(Tensor::from_f32(full, &[n, c.vocab_size])?)
    }
}

/// Each sequence's rows of the batch, first position and block table, as attention takes them.
fn attention_rows<'a>(seqs: &[SeqInput<'a>]) -> Vec<AttentionSeq<'a>> {
    let mut t = 0;
    seqs.iter()
        .map(|s| {
            let a = AttentionSeq { q_start: t, q_len: s.tokens.len(), pos0: s.start_pos, block_table: s.block_table };
            t += s.tokens.len();
            a
        })
        .collect()
}

/// Gives the loader's freed scratch (tensors copied, repacked or converted on their way in) back to the
/// system. glibc keeps it in the heap's free lists, resident, and a process that goes straight from
/// loading to generating never reaches a point where it would trim by itself: about 2.7 MB of an 80 MB
/// GGUF file's load stayed resident for good.
#[cfg(target_env = "gnu")]
fn give_back_load_scratch() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(target_env = "gnu"))]
fn give_back_load_scratch() {}
