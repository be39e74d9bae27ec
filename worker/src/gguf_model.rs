//! A model from one GGUF file (llama.cpp's format), for the `llama` and `qwen2` architectures as llama.cpp's
//! converter (`convert_hf_to_gguf.py`) writes them: the metadata read into a [`ModelConfig`], and the
//! tensors handed to the decoder under the Hugging Face names and layout it asks for, so that
//! `Model::load_on` builds the same model from a `.gguf` file as from a model directory.
//!
//! - **Config**: `general.architecture` (`llama` or `qwen2`), then under that prefix `context_length`,
//!   `embedding_length`, `feed_forward_length`, `block_count`, `attention.head_count`,
//!   `attention.layer_norm_rms_epsilon` (required); `attention.head_count_kv` (default: the head count),
//!   `attention.key_length`/`value_length` (default: embedding / heads), `rope.dimension_count` (must be the
//!   head size: partial rotary is not supported), `rope.freq_base` (default 10000), `rope.scaling.type` and
//!   `rope.scaling.factor` (`none` and `linear`; also the older `rope.scale_linear`), `vocab_size` (default:
//!   the length of `tokenizer.ggml.tokens`). A missing required key, or any key of the wrong type, is an
//!   error naming the file and the key. Biases are read when the file has them (q/k/v for qwen2 always;
//!   for llama q/k/v, o and the MLP's each when present); the embedding is tied when there is no
//!   `output.weight`. llama3 RoPE scaling: the converter writes no `rope.scaling.*` keys for it but a
//!   `rope_freqs.weight` tensor of per-frequency factors, which is applied as llama.cpp applies it
//!   (each frequency divided by its factor, [`RopeScaling::Factors`]). Mixture-of-experts files (`llama` with
//!   `expert_count`, as Mixtral converts) and fused `attn_qkv` tensors are refused by name.
//! - **Tensors**: `token_embd`, `output_norm`, `output`, and per block `blk.N.attn_q`/`attn_k`/`attn_v`/
//!   `attn_output`/`ffn_gate`/`ffn_up`/`ffn_down`/`attn_norm`/`ffn_norm` (`.weight`, `.bias`) are the
//!   Hugging Face tensors of the same role. GGUF lists dimensions fastest first (`ne[0]` is the row length),
//!   so a Hugging Face `[rows, cols]` weight is `[cols, rows]` there with the same bytes; every tensor's shape
//!   is checked against the config (an error names the tensor).
//! - **q and k of `llama`**: the converter (`LlamaModel.permute`) reorders the rows of each head of q and k
//!   (and their biases) from Hugging Face's "rotate half" layout, where dimension `i` pairs with `i + d/2`,
//!   to GGML's interleaved one, where `2i` pairs with `2i + 1`: Hugging Face row `s·d/2 + i` of a head is
//!   stored as row `2i + s`. Loading puts each row back. `qwen2` is not permuted.
//! - **Quantized weights** (CPU): a matrix in a block format the CPU kernels run (Q4_0, Q4_1, Q5_0, Q5_1,
//!   Q8_0, Q2_K–Q6_K) stays in it: this rank's rows, or its columns cut on block boundaries, are copied
//!   as blocks into a quantized [`Tensor`] ([`GgufModel::load_blocks`]). A `tp` whose column split would cut
//!   a block is refused before any worker starts ([`GgufModel::check_split`]).
//! - **Dequantizing**: every other tensor of a type `tessera_gguf` dequantizes (the F32/F16/BF16 norms and
//!   biases; everything for a GPU, which computes in bf16) is turned into f32 when it is loaded, row by row
//!   (in parallel), and only this rank's rows or columns of it ([`Slice`], as `WeightFiles::load` reads a
//!   safetensors file).
//! - **Memory**: once a tensor is copied or converted, its pages of the file's map are given back
//!   (`GgufFile::release`), so a load peaks near the model's size rather than twice it.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tessera_gguf::{GgmlType, GgufFile, Metadata};
use tessera_kernels::{
    Device, Tensor,
    cpu::quant,
    rope::{Rope, RopeScaling},
};

use crate::{
    config::{Architecture, ModelConfig},
    error::ModelError,
    weights::{Bounds, Slice},
};

/// A GGUF model file opened, with its config.
pub struct GgufModel {
    file: GgufFile,
    pub config: ModelConfig,
    /// Whether q and k were permuted by the converter (the `llama` architecture).
    permuted: bool,
}

/// Reads only the config of the GGUF file at `path`.
pub fn read_config(path: &Path) -> Result<ModelConfig, ModelError> {
    Ok(GgufModel::open(path)?.config)
}

impl GgufModel {
    /// Opens (memory-maps) the file and reads its config; no tensor is read yet.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        // A regular file first: opening a FIFO would block.
        crate::files::ensure_regular(path)?;
        let file = GgufFile::open(path)?;
        let (config, permuted) = config(&file)?;
        Ok(GgufModel { file, config, permuted })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The GGUF tensor the decoder calls `name`, checked to have the full shape `shape` (Hugging Face order),
    /// and an error constructor naming both.
    fn find(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<(tessera_gguf::Tensor<'_>, impl Fn(String) -> ModelError + '_), ModelError> {
        let gguf = gguf_name(name).ok_or_else(|| self.tensor_err(name, "no GGUF tensor holds this weight".into()))?;
        let found = self.file.tensor(&gguf);
        let hf = name.to_string();
        let err = move |message: String| self.tensor_err(&gguf, format!("({hf}) {message}"));
        let t = found.ok_or_else(|| err("missing".into()))?;
        // ggml order, fastest first, with trailing dimensions of one dropped.
        let mut ne: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
        while ne.len() > shape.len() && ne.last() == Some(&1) {
            ne.pop();
        }
        let hf_shape: Vec<usize> = ne.iter().rev().copied().collect();
        if hf_shape != shape {
            return Err(err(format!(
                "expected shape {shape:?} (GGUF order {:?}), found {hf_shape:?} (GGUF order {ne:?})",
                shape.iter().rev().collect::<Vec<_>>()
            )));
        }
        Ok((t, err))
    }

    /// This rank's part `slice` of the matrix the decoder calls `name`, kept in its block format, or `None`
    /// when it is not a matrix in a format the CPU kernels run (then [`GgufModel::load`] dequantizes it).
    pub fn load_blocks(
        &self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        device: Device,
    ) -> Result<Option<Tensor>, ModelError> {
        let (t, err) = self.find(name, shape)?;
        let ty = t.ggml_type();
        if shape.len() != 2 || !quant::supported(ty) {
            return Ok(None);
        }
        let Bounds { rows, cols, r0, r1, c0, c1 } = slice.bounds(shape).map_err(&err)?;
        let bs = ty.block_size();
        if !c0.is_multiple_of(bs) || !c1.is_multiple_of(bs) {
            return Err(err(format!("columns {c0}..{c1} cut its {ty} blocks of {bs} values; choose another tp")));
        }
        let row_bytes = quant::row_bytes(ty, cols);
        let (b0, b1) = (quant::row_bytes(ty, c0), quant::row_bytes(ty, c1));
        let heads = self.permuted_heads(name);
        let data = t.data();
        let mut bytes = Vec::with_capacity((r1 - r0) * (b1 - b0));
        for r in r0..r1 {
            let src = heads.map_or(r, |h| unpermuted(r, rows / h));
            bytes.extend_from_slice(&data[src * row_bytes + b0..src * row_bytes + b1]);
        }
        self.file.release(&t);
        Ok(Some(Tensor::from_quant_on(ty, bytes, &[r1 - r0, c1 - c0], device)?))
    }

    /// Refuses a split into `world` ranks that would cut the blocks of a quantized matrix: the columns of
    /// `o_proj` and `down_proj` are divided among the ranks, and each rank's share must be whole blocks.
    pub fn check_split(&self, world: usize) -> Result<(), ModelError> {
        let c = &self.config;
        let shares = [("self_attn.o_proj", c.num_heads * c.head_dim), ("mlp.down_proj", c.intermediate_size)];
        for layer in 0..c.num_layers {
            for (part, cols) in shares {
                let name = format!("model.layers.{layer}.{part}.weight");
                let Some(t) = gguf_name(&name).and_then(|g| self.file.tensor(&g)) else { continue };
                let (ty, share) = (t.ggml_type(), cols / world.max(1));
                if quant::supported(ty) && !share.is_multiple_of(ty.block_size()) {
                    return Err(ModelError::Sharding(format!(
                        "tp = {world} would give each rank {share} columns of {} ({ty}, blocks of {} values) in {}; \
                         choose a tp that divides it into whole blocks",
                        t.name(),
                        ty.block_size(),
                        self.file.path().display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The tensor the decoder calls `name` (a Hugging Face name), checked to have the full shape `shape`
    /// (Hugging Face order), dequantized to f32: the part `slice` of it.
    pub fn load(&self, name: &str, shape: &[usize], slice: Slice) -> Result<Tensor, ModelError> {
        let (t, err) = self.find(name, shape)?;
        let ty = t.ggml_type();
        if !ty.can_dequantize() {
            return Err(err(format!("type {ty} cannot be dequantized")));
        }
        let Bounds { rows, cols, r0, r1, c0, c1 } = slice.bounds(shape).map_err(&err)?;
        let row_bytes = ty.bytes_for(cols as u64).ok_or_else(|| err("row size overflows".into()))? as usize;
        let data = t.data();
        let heads = self.permuted_heads(name);
        let dequant =
            |bytes: &[u8], out: &mut [f32]| tessera_gguf::dequantize(ty, bytes, out).map_err(|e| err(e.to_string()));
        let out = if shape.len() == 1 {
            let mut all = vec![0f32; cols];
            dequant(data, &mut all)?;
            match heads {
                Some(h) => (c0..c1).map(|i| all[unpermuted(i, cols / h)]).collect(),
                None => all[c0..c1].to_vec(),
            }
        } else {
            let width = c1 - c0;
            let mut out = vec![0f32; (r1 - r0) * width];
            let whole_rows = width == cols;
            out.par_chunks_mut(width.max(1)).enumerate().try_for_each_init(
                || if whole_rows { Vec::new() } else { vec![0f32; cols] },
                |row_buf, (i, dst)| {
                    let r = r0 + i;
                    let src = match heads {
                        Some(h) => unpermuted(r, rows / h),
                        None => r,
                    };
                    let bytes = &data[src * row_bytes..(src + 1) * row_bytes];
                    if whole_rows {
                        dequant(bytes, dst)
                    } else {
                        dequant(bytes, row_buf)?;
                        dst.copy_from_slice(&row_buf[c0..c1]);
                        Ok(())
                    }
                },
            )?;
            out
        };
        self.file.release(&t);
        let out_shape = if shape.len() == 1 { vec![c1 - c0] } else { vec![r1 - r0, c1 - c0] };
        Ok(Tensor::from_f32(out, &out_shape)?)
    }

    /// For q and k of a permuted file, the number of heads whose rows were permuted.
    fn permuted_heads(&self, name: &str) -> Option<usize> {
        if !self.permuted {
            return None;
        }
        if name.contains(".self_attn.q_proj.") {
            Some(self.config.num_heads)
        } else if name.contains(".self_attn.k_proj.") {
            Some(self.config.num_kv_heads)
        } else {
            None
        }
    }

    fn tensor_err(&self, tensor: &str, message: String) -> ModelError {
        ModelError::Tensor { path: self.file.path().to_path_buf(), tensor: tensor.into(), message }
    }
}

/// Where Hugging Face row `r` of a tensor whose heads are `head_dim` rows each is stored after the
/// converter's `LlamaModel.permute`: row `s·d/2 + i` of a head went to row `2i + s` of the same head.
fn unpermuted(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, j) = (r / head_dim, r % head_dim);
    head * head_dim + 2 * (j % half) + j / half
}

/// The GGUF name of the tensor the decoder calls `name`.
fn gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let part = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.{kind}"))
}

/// The metadata's model config, and whether q/k were permuted.
fn config(file: &GgufFile) -> Result<(ModelConfig, bool), ModelError> {
    let md = file.metadata();
    let arch_name = md.get_str("general.architecture")?;
    let keys = Keys { file, md, arch: arch_name };
    let (architecture, permuted) = match arch_name {
        "llama" => (Architecture::Llama, true),
        "qwen2" => (Architecture::Qwen2, false),
        other => {
            return Err(keys.field(
                "general.architecture",
                format!("unsupported architecture {other:?}; supported: llama, qwen2"),
            ));
        }
    };
    keys.refuse_unsupported()?;
    let max_position_embeddings = keys.positive("context_length")?;
    if max_position_embeddings > u32::MAX as usize {
        return Err(
            keys.field(&keys.key("context_length"), format!("{max_position_embeddings} is more than {}", u32::MAX))
        );
    }
    let hidden_size = keys.positive("embedding_length")?;
    let (num_heads, num_kv_heads, head_dim) = keys.heads(hidden_size)?;
    let rms_key = keys.key("attention.layer_norm_rms_epsilon");
    let rms_norm_eps = md.get_f32(&rms_key)?;
    if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
        return Err(keys.field(&rms_key, format!("must be a positive number, found {rms_norm_eps}")));
    }
    let has = |name: &str| file.tensor(name).is_some();
    let token_id = |k: &str| md.optional(k, Metadata::get_u32);
    Ok((
        ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: keys.positive("feed_forward_length")?,
            num_layers: keys.positive("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: keys.vocab_size()?,
            max_position_embeddings,
            rms_norm_eps,
            rope: rope(file, arch_name, head_dim)?,
            sliding_window: None,
            qkv_bias: architecture == Architecture::Qwen2 || has("blk.0.attn_q.bias"),
            o_bias: has("blk.0.attn_output.bias"),
            mlp_bias: has("blk.0.ffn_gate.bias"),
            tie_word_embeddings: !has("output.weight"),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        },
        permuted,
    ))
}

/// The architecture's metadata keys (`<arch>.<name>`), read with errors naming the file and the key.
struct Keys<'a> {
    file: &'a GgufFile,
    md: &'a Metadata,
    arch: &'a str,
}

impl Keys<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn field(&self, key: &str, message: String) -> ModelError {
        ModelError::Field { path: self.file.path().to_path_buf(), field: key.into(), message }
    }

    /// A positive integer: zero heads or layers would make a model that cannot run.
    fn positive(&self, k: &str) -> Result<usize, ModelError> {
        let k = self.key(k);
        match self.md.get_usize(&k)? {
            0 => Err(self.field(&k, "must be positive, found 0".into())),
            n => Ok(n),
        }
    }

    fn optional_positive(&self, k: &str) -> Result<Option<usize>, ModelError> {
        if self.md.contains_key(&self.key(k)) { self.positive(k).map(Some) } else { Ok(None) }
    }

    /// Mixture-of-experts models and fused q/k/v tensors are refused up front.
    fn refuse_unsupported(&self) -> Result<(), ModelError> {
        let experts = self.key("expert_count");
        if self.md.optional(&experts, Metadata::get_u32)?.unwrap_or(0) > 0 {
            return Err(self.field(&experts, "mixture-of-experts models are not supported".into()));
        }
        if self.file.tensor("blk.0.attn_qkv.weight").is_some() {
            return Err(ModelError::Tensor {
                path: self.file.path().to_path_buf(),
                tensor: "blk.0.attn_qkv.weight".into(),
                message: "fused q/k/v tensors (converted with --fuse-qkv) are not supported".into(),
            });
        }
        Ok(())
    }

    /// Query heads, KV heads and the head size, checked against each other and against RoPE.
    fn heads(&self, hidden_size: usize) -> Result<(usize, usize, usize), ModelError> {
        let num_heads = self.positive("attention.head_count")?;
        let num_kv_heads = self.optional_positive("attention.head_count_kv")?.unwrap_or(num_heads);
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(self.field(
                &self.key("attention.head_count_kv"),
                format!("{num_kv_heads} does not divide {} = {num_heads}", self.key("attention.head_count")),
            ));
        }
        let head_dim = match self.optional_positive("attention.key_length")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            None => {
                return Err(self.field(
                    &self.key("attention.key_length"),
                    format!("missing, and the embedding length {hidden_size} is not a multiple of {num_heads} heads"),
                ));
            }
        };
        if let Some(v) = self.optional_positive("attention.value_length")?
            && v != head_dim
        {
            return Err(
                self.field(&self.key("attention.value_length"), format!("{v} differs from the key length {head_dim}"))
            );
        }
        if !head_dim.is_multiple_of(2) {
            return Err(self
                .field(&self.key("attention.key_length"), format!("{head_dim} is odd; RoPE needs an even head size")));
        }
        if let Some(d) = self.optional_positive("rope.dimension_count")?
            && d != head_dim
        {
            return Err(self.field(
                &self.key("rope.dimension_count"),
                format!("{d} differs from the head size {head_dim}: partial rotary embeddings are not supported"),
            ));
        }
        Ok((num_heads, num_kv_heads, head_dim))
    }

    /// `<arch>.vocab_size`, or the number of tokens in the vocabulary.
    fn vocab_size(&self) -> Result<usize, ModelError> {
        let vocab_key = self.key("vocab_size");
        match self.md.optional(&vocab_key, Metadata::get_usize)? {
            Some(0) => Err(self.field(&vocab_key, "must be positive, found 0".into())),
            Some(n) => Ok(n),
            None => match self.md.get_array("tokenizer.ggml.tokens") {
                Ok(tokens) if !tokens.is_empty() => Ok(tokens.len()),
                Ok(_) => Err(self.field("tokenizer.ggml.tokens", "is empty".into())),
                Err(_) => {
                    Err(self.field(&vocab_key, "missing, and so is the vocabulary (tokenizer.ggml.tokens)".into()))
                }
            },
        }
    }
}

/// RoPE: the base, and the scaling from `rope.scaling.*` or a `rope_freqs.weight` tensor.
fn rope(file: &GgufFile, arch: &str, head_dim: usize) -> Result<Rope, ModelError> {
    let md = file.metadata();
    let path: PathBuf = file.path().to_path_buf();
    let field = |key: &str, message: String| ModelError::Field { path: path.clone(), field: key.into(), message };
    let key = |k: &str| format!("{arch}.{k}");
    let theta_key = key("rope.freq_base");
    let theta = md.optional(&theta_key, Metadata::get_f32)?.unwrap_or(10_000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(field(&theta_key, format!("must be a positive number, found {theta}")));
    }
    let factor_key = key("rope.scaling.factor");
    let factor = || -> Result<f32, ModelError> {
        match md.get_f32(&factor_key)? {
            f if f >= 1.0 && f.is_finite() => Ok(f),
            f => Err(field(&factor_key, format!("must be at least 1, found {f}"))),
        }
    };
    let type_key = key("rope.scaling.type");
    let mut scaling = match md.optional(&type_key, Metadata::get_str)? {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear { factor: factor()? },
        Some(other) => {
            return Err(field(&type_key, format!("unsupported RoPE scaling {other:?}; supported: none, linear")));
        }
    };
    // Older files: a linear factor without a type.
    let legacy_key = key("rope.scale_linear");
    if scaling == RopeScaling::None
        && let Some(f) = md.optional(&legacy_key, Metadata::get_f32)?
        && f != 1.0
    {
        if !(f >= 1.0 && f.is_finite()) {
            return Err(field(&legacy_key, format!("must be at least 1, found {f}")));
        }
        scaling = RopeScaling::Linear { factor: f };
    }
    if let Some(t) = file.tensor("rope_freqs.weight") {
        let err =
            |message: String| ModelError::Tensor { path: path.clone(), tensor: "rope_freqs.weight".into(), message };
        if scaling != RopeScaling::None {
            return Err(err(format!("per-frequency factors and {type_key} together are not supported")));
        }
        if t.shape() != [head_dim as u64 / 2] || t.ggml_type() != GgmlType::F32 {
            return Err(err(format!(
                "expected {} f32 factors (half the head size), found shape {:?} of type {}",
                head_dim / 2,
                t.shape(),
                t.ggml_type()
            )));
        }
        let factors = t.dequantize()?;
        if let Some(f) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(err(format!("factor {f} is not a positive number")));
        }
        scaling = RopeScaling::Factors(factors);
    }
    Ok(Rope { dim: head_dim, theta: theta as f64, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_converters_interleaving() {
        // LlamaModel.permute on one head of 8 rows: reshape(1, 2, 4).swapaxes(1, 2): [0 4 1 5 2 6 3 7].
        let stored: Vec<usize> = vec![0, 4, 1, 5, 2, 6, 3, 7];
        for head in 0..2 {
            for r in 0..8 {
                assert_eq!(stored[unpermuted(head * 8 + r, 8) - head * 8], r);
            }
        }
    }

    #[test]
    fn names_map_to_gguf_names() {
        assert_eq!(gguf_name("model.layers.3.self_attn.q_proj.bias").unwrap(), "blk.3.attn_q.bias");
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight").unwrap(), "blk.0.ffn_norm.weight");
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(gguf_name("model.layers.0.mlp.experts.weight"), None);
    }
}
