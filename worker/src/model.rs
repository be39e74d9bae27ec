//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2): weights of one tensor-parallel shard and the
//! batched forward pass over a paged KV cache.
//!
//! Sharding is Megatron-style: q/k/v and gate/up are split by output rows (heads, intermediate features),
//! o and down by input columns followed by an all-reduce, the embedding is replicated and `lm_head` is split
//! by vocabulary and all-gathered. With a world of one every slice is the whole tensor.

use std::{ops::Range, path::Path};

use tessera_kernels::{
    DType, Device, Tensor,
    ops::{self, AttentionSeq, AttentionShape},
};

use crate::{
    collective::Collective,
    config::ModelConfig,
    error::ModelError,
    kv_cache::{KvCache, KvGeometry},
    weights::{Slice, WeightFiles},
};

/// Where a model's weights come from: `(name, full shape, this rank's slice)` → the slice, on the device.
type WeightSource<'a> = dyn Fn(&str, &[usize], Slice) -> Result<Tensor, ModelError> + 'a;

/// This process's place in its tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };
}

/// Which heads, KV heads, features and vocabulary rows one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub heads: Range<usize>,
    pub kv_heads: Range<usize>,
    pub intermediate: Range<usize>,
    pub vocab: Range<usize>,
}

impl ShardLayout {
    /// Splits `cfg` for `shard`, refusing splits that do not divide evenly or break the GQA grouping.
    pub fn new(cfg: &ModelConfig, shard: Shard) -> Result<Self, ModelError> {
        let Shard { rank, world } = shard;
        if world == 0 || rank >= world {
            return Err(ModelError::Sharding(format!("rank {rank} is not in a group of {world}")));
        }
        if !cfg.num_heads.is_multiple_of(world) {
            return Err(ModelError::Sharding(format!(
                "tp = {world} does not divide num_attention_heads = {}",
                cfg.num_heads
            )));
        }
        if !cfg.intermediate_size.is_multiple_of(world) {
            return Err(ModelError::Sharding(format!(
                "tp = {world} does not divide intermediate_size = {}",
                cfg.intermediate_size
            )));
        }
        let per = cfg.num_heads / world;
        let group = cfg.num_heads / cfg.num_kv_heads;
        let heads = rank * per..(rank + 1) * per;
        // The KV heads this rank's query heads read: an even split when tp divides them, otherwise the
        // shared KV head is replicated on every rank that needs it.
        let kv_heads = heads.start / group..(heads.end - 1) / group + 1;
        let local_group = per / kv_heads.len().max(1);
        let consistent = per.is_multiple_of(kv_heads.len())
            && heads.clone().all(|h| h / group - kv_heads.start == (h - heads.start) / local_group);
        if !consistent {
            return Err(ModelError::Sharding(format!(
                "tp = {world} splits the {} query heads across the {} KV-head groups unevenly",
                cfg.num_heads, cfg.num_kv_heads
            )));
        }
        let inter = cfg.intermediate_size / world;
        let v = cfg.vocab_size.div_ceil(world);
        let vocab = (rank * v).min(cfg.vocab_size)..((rank + 1) * v).min(cfg.vocab_size);
        Ok(ShardLayout { heads, kv_heads, intermediate: rank * inter..(rank + 1) * inter, vocab })
    }
}

/// One decoder layer. q, k and v are stacked into one projection, and so are gate and up: one GEMM (one
/// launch, one pass over the activations) instead of three and two.
struct Layer {
    input_norm: Tensor,
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    o: Tensor,
    o_bias: Option<Tensor>,
    post_norm: Tensor,
    gate_up: Tensor,
    gate_up_bias: Option<Tensor>,
    down: Tensor,
    down_bias: Option<Tensor>,
}

/// The projections' weights (or biases) one above the other: one fused projection.
fn stack(parts: &[&Tensor]) -> Result<Tensor, ModelError> {
    Ok(Tensor::concat_rows(parts)?)
}

/// A forward pass stopped between two halves of the decoder (a layer's attention and its MLP, or two
/// layers): the residual stream, the next half's normed input, and the per-token inputs computed when it
/// started.
pub struct ForwardState {
    x: Tensor,
    h: Tensor,
    /// The half to run next: layer `next_half / 2`, its attention when even, its MLP when odd.
    next_half: usize,
    positions: Vec<u32>,
    slots: Vec<usize>,
    freqs: Vec<f32>,
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
}

pub struct Model {
    pub config: ModelConfig,
    pub shard: Shard,
    pub layout: ShardLayout,
    /// Where the weights and the KV cache live: f32 on the CPU, bf16 on CUDA.
    pub device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// This rank's vocabulary rows of the output projection.
    lm_head: Tensor,
    /// RoPE inverse frequencies when they do not depend on the sequence length.
    inv_freq: Vec<f32>,
    /// Per-op device time, collected only while [`Model::profile_ops`] is on (benchmarks).
    profile: OpProfile,
}

/// Device time per op of the forward pass. Enabling it synchronises after every op, so it is for finding
/// where a step's time goes, not for timing steps.
#[derive(Default)]
struct OpProfile {
    on: std::sync::atomic::AtomicBool,
    times: std::sync::Mutex<Vec<(&'static str, f64, usize)>>,
}

impl OpProfile {
    fn lap(&self, device: Device, name: &'static str, since: &mut std::time::Instant) -> Result<(), ModelError> {
        if !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        tessera_kernels::synchronize(device)?;
        let dt = since.elapsed().as_secs_f64();
        *since = std::time::Instant::now();
        let mut times = self.times.lock().unwrap_or_else(|p| p.into_inner());
        match times.iter_mut().find(|(n, _, _)| *n == name) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => times.push((name, dt, 1)),
        }
        Ok(())
    }
}

impl Model {
    /// Loads the shard `shard` of the model in `dir` on the CPU.
    pub fn load(dir: &Path, shard: Shard) -> Result<Self, ModelError> {
        Self::load_on(dir, shard, Device::Cpu)
    }

    /// Loads the shard `shard` of the model in `dir` onto `device`.
    pub fn load_on(dir: &Path, shard: Shard, device: Device) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NoDirectory(dir.to_path_buf()));
        }
        device.ensure_available()?;
        let config = ModelConfig::load(dir)?;
        let files = WeightFiles::open(dir)?;
        Self::from_weights(config, &files, shard, device)
    }

    pub fn from_weights(
        config: ModelConfig,
        w: &WeightFiles,
        shard: Shard,
        device: Device,
    ) -> Result<Self, ModelError> {
        let dtype = Self::weight_dtype(device);
        Self::build(config, shard, device, &|name, shape, slice| {
            let t = w.load(name, shape, slice)?;
            if device == Device::Cpu { Ok(t) } else { Ok(t.to_dtype(dtype)?.to_device(device)?) }
        })
    }

    /// A model of `config`'s shape with random weights made on `device` itself (uniform, scaled by each
    /// matrix's fan-in; norms one): benchmarks use it where no checkpoint of that size exists. The same
    /// seed gives the same weights on every device.
    pub fn random(config: ModelConfig, shard: Shard, device: Device, seed: u64) -> Result<Self, ModelError> {
        device.ensure_available()?;
        let dtype = Self::weight_dtype(device);
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
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let q_rows = layout.heads.start * hd..layout.heads.end * hd;
        let kv_rows = layout.kv_heads.start * hd..layout.kv_heads.end * hd;
        let first = shard.rank == 0;
        let opt = |present: bool, name: String, shape: &[usize], s: Slice| -> Result<Option<Tensor>, ModelError> {
            if present { get(&name, shape, s).map(Some) } else { Ok(None) }
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
            let q = get(&format!("{p}.self_attn.q_proj.weight"), &[qd, h], Slice::Rows(q_rows.clone()))?;
            let k = get(&format!("{p}.self_attn.k_proj.weight"), &[kvd, h], Slice::Rows(kv_rows.clone()))?;
            let v = get(&format!("{p}.self_attn.v_proj.weight"), &[kvd, h], Slice::Rows(kv_rows.clone()))?;
            let qkv_bias = match (
                opt(c.qkv_bias, format!("{p}.self_attn.q_proj.bias"), &[qd], Slice::Rows(q_rows.clone()))?,
                opt(c.qkv_bias, format!("{p}.self_attn.k_proj.bias"), &[kvd], Slice::Rows(kv_rows.clone()))?,
                opt(c.qkv_bias, format!("{p}.self_attn.v_proj.bias"), &[kvd], Slice::Rows(kv_rows.clone()))?,
            ) {
                (Some(a), Some(b), Some(c)) => Some(stack(&[&a, &b, &c])?),
                _ => None,
            };
            let inter_rows = Slice::Rows(layout.intermediate.clone());
            let gate = get(&format!("{p}.mlp.gate_proj.weight"), &[inter, h], inter_rows.clone())?;
            let up = get(&format!("{p}.mlp.up_proj.weight"), &[inter, h], inter_rows.clone())?;
            let gate_up_bias = match (
                opt(c.mlp_bias, format!("{p}.mlp.gate_proj.bias"), &[inter], inter_rows.clone())?,
                opt(c.mlp_bias, format!("{p}.mlp.up_proj.bias"), &[inter], inter_rows.clone())?,
            ) {
                (Some(a), Some(b)) => Some(stack(&[&a, &b])?),
                _ => None,
            };
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[h], Slice::Full)?,
                qkv: stack(&[&q, &k, &v])?,
                qkv_bias,
                o: get(&format!("{p}.self_attn.o_proj.weight"), &[h, qd], Slice::Cols(q_rows.clone()))?,
                // Row-parallel biases are added once, by rank 0, before the all-reduce sums the partials.
                o_bias: opt(c.o_bias && first, format!("{p}.self_attn.o_proj.bias"), &[h], Slice::Full)?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h], Slice::Full)?,
                gate_up: stack(&[&gate, &up])?,
                gate_up_bias,
                down: get(&format!("{p}.mlp.down_proj.weight"), &[h, inter], Slice::Cols(layout.intermediate.clone()))?,
                down_bias: opt(c.mlp_bias && first, format!("{p}.mlp.down_proj.bias"), &[h], Slice::Full)?,
            });
        }
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
            layers,
            norm,
            lm_head,
            inv_freq,
            profile: OpProfile::default(),
        })
    }

    /// Starts (or stops) recording the device time of each op of the forward pass.
    pub fn profile_ops(&self, on: bool) {
        self.profile.on.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The recorded (op, seconds, calls), in first-seen order, and clears them.
    pub fn take_op_profile(&self) -> Vec<(&'static str, f64, usize)> {
        std::mem::take(&mut *self.profile.times.lock().unwrap_or_else(|p| p.into_inner()))
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
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.input_norm, &l.qkv, &l.o, &l.post_norm, &l.gate_up, &l.down]
                    .iter()
                    .map(|t| t.size_in_bytes())
                    .sum::<usize>()
            })
            .sum();
        l + self.norm.size_in_bytes() + self.lm_head.size_in_bytes()
    }

    /// The per-token inputs of a pass (positions, cache slots, RoPE frequencies) and the first layer's
    /// input: the embeddings and their norm.
    fn forward_start(
        &self,
        seqs: &[SeqInput<'_>],
        block_size: usize,
        at: &mut std::time::Instant,
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
        let h = match self.layers.first() {
            Some(l) => ops::rms_norm(&x, &l.input_norm, c.rms_norm_eps)?,
            None => x.clone(),
        };
        self.profile.lap(self.device, "embedding + norm", at)?;
        Ok(ForwardState { x, h, next_half: 0, positions, slots, freqs })
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

    /// [`Model::forward`] that stops before a layer's attention or its MLP (never before the first) when
    /// `pause()` says so, and returns where it stood; called again with that state (and the same batch), it
    /// goes on from there. At least one half-layer runs per call. Between the calls the cache may serve other sequences' passes, as long as they write no
    /// block this one reads or writes (`Engine` checks). A single rank only: a group's ranks would have to
    /// stop at the same point.
    pub fn forward_pausable(
        &self,
        seqs: &[SeqInput<'_>],
        cache: &mut KvCache,
        comm: &dyn Collective,
        resume: Option<ForwardState>,
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Forward, ModelError> {
        let c = &self.config;
        let hd = c.head_dim;
        let shape = self.attention_shape(cache.block_size);
        let (nh, nkv) = (shape.num_heads, shape.num_kv_heads);

        let mut attn_seqs = Vec::with_capacity(seqs.len());
        let mut t = 0;
        for s in seqs {
            attn_seqs.push(AttentionSeq {
                q_start: t,
                q_len: s.tokens.len(),
                pos0: s.start_pos,
                block_table: s.block_table,
            });
            t += s.tokens.len();
        }
        if t == 0 {
            return Ok(Forward::Done(None));
        }
        let eps = c.rms_norm_eps;
        let (dev, prof) = (self.device, &self.profile);
        let mut at = std::time::Instant::now();
        let ForwardState { mut x, mut h, next_half, positions, slots, freqs } = match resume {
            Some(state) => state,
            None => self.forward_start(seqs, cache.block_size, &mut at)?,
        };
        // Halves, not layers, so that a newcomer waits for at most one attention or one MLP of the step in
        // flight (on a small model under a flood, a layer of 64 decodes is a few hundred microseconds).
        for half in next_half..2 * self.layers.len() {
            if half > next_half && comm.world_size() == 1 && pause() {
                return Ok(Forward::Paused(ForwardState { x, h, next_half: half, positions, slots, freqs }));
            }
            let (li, layer) = (half / 2, &self.layers[half / 2]);
            if half % 2 == 1 {
                let gate_up = ops::linear(&h, &layer.gate_up, layer.gate_up_bias.as_ref())?;
                prof.lap(dev, "gate/up projection", &mut at)?;
                let act = ops::silu_mul_packed(&gate_up)?;
                drop(gate_up);
                prof.lap(dev, "silu * up", &mut at)?;
                let mut down = ops::linear(&act, &layer.down, layer.down_bias.as_ref())?;
                prof.lap(dev, "down projection", &mut at)?;
                comm.all_reduce_tensor(&mut down)?;
                prof.lap(dev, "all-reduce", &mut at)?;
                match self.layers.get(li + 1) {
                    Some(next) => h = ops::add_rms_norm(&mut x, &down, &next.input_norm, eps)?,
                    None => ops::add_inplace(&mut x, &down)?,
                }
                prof.lap(dev, "add + norm", &mut at)?;
                continue;
            }
            let qkv = ops::linear(&h, &layer.qkv, layer.qkv_bias.as_ref())?;
            prof.lap(dev, "qkv projection", &mut at)?;
            let [q, k, v]: [Tensor; 3] = ops::split_cols(&qkv, &[nh * hd, nkv * hd, nkv * hd])?
                .try_into()
                .map_err(|_| ModelError::Sharding("split of the fused qkv projection".into()))?;
            drop(qkv);
            let mut q = q.reshape(&[t, nh, hd])?;
            let mut k = k.reshape(&[t, nkv, hd])?;
            let v = v.reshape(&[t, nkv, hd])?;
            prof.lap(dev, "qkv split", &mut at)?;
            ops::rope_inplace(&mut q, &positions, &freqs)?;
            ops::rope_inplace(&mut k, &positions, &freqs)?;
            prof.lap(dev, "rope", &mut at)?;
            let (kc, vc) = cache.layer_mut(li);
            ops::write_kv_cache(&k, &v, kc, vc, &slots)?;
            prof.lap(dev, "kv cache write", &mut at)?;
            let (kc, vc) = cache.layer(li);
            let attn = ops::paged_attention(&q, kc, vc, &attn_seqs, &shape)?.reshape(&[t, nh * hd])?;
            prof.lap(dev, "attention", &mut at)?;
            let mut o = ops::linear(&attn, &layer.o, layer.o_bias.as_ref())?;
            prof.lap(dev, "o projection", &mut at)?;
            comm.all_reduce_tensor(&mut o)?;
            prof.lap(dev, "all-reduce", &mut at)?;
            h = ops::add_rms_norm(&mut x, &o, &layer.post_norm, eps)?;
            prof.lap(dev, "add + norm", &mut at)?;
        }

        // Only the last token of sequences that sample needs the (expensive) vocabulary projection.
        let rows: Vec<u32> = attn_seqs
            .iter()
            .zip(seqs)
            .filter(|(_, s)| s.logits)
            .map(|(a, _)| (a.q_start + a.q_len - 1) as u32)
            .collect();
        let n = rows.len();
        if n == 0 {
            return Ok(Forward::Done(None));
        }
        let last = ops::rms_norm(&ops::gather_rows(&x, &rows)?, &self.norm, eps)?;
        let local = ops::linear_to(&last, &self.lm_head, None, DType::F32)?;
        prof.lap(dev, "final norm + lm_head", &mut at)?;
        if comm.world_size() == 1 {
            return Ok(Forward::Done(Some(local)));
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
        Ok(Forward::Done(Some(Tensor::from_f32(full, &[n, c.vocab_size])?)))
    }
}
