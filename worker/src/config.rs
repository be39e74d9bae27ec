//! `config.json` of a Hugging Face model directory, for the Llama family: `LlamaForCausalLM`,
//! `MistralForCausalLM` and `Qwen2ForCausalLM`.
//!
//! Fields are read one by one from the JSON value rather than through a derive, so that a missing or
//! mistyped field produces an error naming it. Both spellings of RoPE settings are accepted: the classic
//! `rope_theta` + `rope_scaling`, and transformers 5's `rope_parameters`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tessera_kernels::rope::{Rope, RopeScaling};

use crate::error::ModelError;

/// The model families this engine runs; they differ only in details of the same decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope: Rope,
    /// Mistral-style sliding attention window, in tokens (a token sees itself and `window - 1` before it).
    pub sliding_window: Option<usize>,
    /// Bias on the q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the o projection (Llama's `attention_bias` covers it too).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

struct Fields<'a> {
    path: PathBuf,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> ModelError {
        ModelError::Field { path: self.path.clone(), field: field.into(), message: message.into() }
    }
    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }
    fn usize(&self, field: &str) -> Result<usize, ModelError> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing"))
    }
    fn opt_usize(&self, field: &str) -> Result<Option<usize>, ModelError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.err(field, format!("expected a positive integer, found {v}"))),
            },
        }
    }
    fn opt_f64(&self, field: &str) -> Result<Option<f64>, ModelError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }
    fn opt_bool(&self, field: &str) -> Result<Option<bool>, ModelError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => {
                v.as_bool().map(Some).ok_or_else(|| self.err(field, format!("expected true or false, found {v}")))
            }
        }
    }
    fn token_ids(&self, field: &str) -> Result<Vec<u32>, ModelError> {
        let bad = || self.err(field, "expected a token id or a list of token ids");
        match self.get(field) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().map(|n| n as u32).ok_or_else(bad)).collect(),
            Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(bad),
        }
    }
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = crate::files::read_json_text(&path)?;
        Self::parse(&text, &path)
    }

    /// Parses the text of a `config.json`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ModelError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::File { path: path.into(), message: format!("not valid JSON: {e}") })?;
        let map = value
            .as_object()
            .ok_or_else(|| ModelError::File { path: path.into(), message: "expected a JSON object".into() })?;
        let f = Fields { path: path.into(), map };

        let architecture = parse_architecture(&f)?;
        let (hidden_size, num_heads, num_kv_heads, head_dim) = parse_heads(&f)?;
        let max_position_embeddings = f.opt_usize("max_position_embeddings")?.unwrap_or(2048);
        // Positions travel as u32 (the protocol, RoPE): a larger context would be silently truncated.
        if max_position_embeddings == 0 || max_position_embeddings > u32::MAX as usize {
            return Err(
                f.err("max_position_embeddings", format!("{max_position_embeddings} is outside 1..={}", u32::MAX))
            );
        }
        let rope = parse_rope(&f, head_dim, max_position_embeddings)?;

        let sliding_window = match architecture {
            Architecture::Mistral => f.opt_usize("sliding_window")?,
            // Qwen2 only slides when asked to, and then only above `max_window_layers`: not supported.
            Architecture::Qwen2 if f.opt_bool("use_sliding_window")?.unwrap_or(false) => {
                return Err(f.err("use_sliding_window", "Qwen2 sliding-window layers are not supported"));
            }
            _ => None,
        };
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let eos_token_ids = f.token_ids("eos_token_id")?;
        let bos_token_id = f.token_ids("bos_token_id")?.first().copied();
        let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(f.err("rms_norm_eps", format!("must be positive, found {rms_norm_eps}")));
        }
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            max_position_embeddings,
            rms_norm_eps: rms_norm_eps as f32,
            rope,
            sliding_window,
            qkv_bias,
            o_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id,
            eos_token_ids,
        })
    }

    /// Parameters in the full (unsharded) model, for reporting and benchmarks.
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let attn = h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * i;
        let per_layer = attn + mlp + 2 * h;
        let lm_head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * per_layer + h + lm_head
    }
}

/// `architectures` (one we run) and the activation (SiLU, the only one these architectures use).
fn parse_architecture(f: &Fields<'_>) -> Result<Architecture, ModelError> {
    let arch_name = match f.get("architectures") {
        Some(Value::Array(a)) if !a.is_empty() => a[0].as_str().unwrap_or_default().to_string(),
        Some(v) => {
            return Err(f.err("architectures", format!("expected a non-empty list of names, found {v}")));
        }
        None => return Err(f.err("architectures", "missing")),
    };
    let architecture = match arch_name.as_str() {
        "LlamaForCausalLM" => Architecture::Llama,
        "MistralForCausalLM" => Architecture::Mistral,
        "Qwen2ForCausalLM" => Architecture::Qwen2,
        other => {
            return Err(f.err(
                "architectures",
                format!(
                    "unsupported architecture {other:?}; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
                ),
            ));
        }
    };
    if let Some(act) = f.get("hidden_act").or_else(|| f.get("hidden_activation"))
        && act.as_str() != Some("silu")
    {
        return Err(f.err("hidden_act", format!("unsupported activation {act}; only \"silu\" is supported")));
    }
    Ok(architecture)
}

/// Hidden size, query heads, KV heads (dividing the query heads) and head size (even, for RoPE).
fn parse_heads(f: &Fields<'_>) -> Result<(usize, usize, usize, usize), ModelError> {
    let hidden_size = f.usize("hidden_size")?;
    let num_heads = f.usize("num_attention_heads")?;
    let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    if !num_heads.is_multiple_of(num_kv_heads) {
        return Err(
            f.err("num_key_value_heads", format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"))
        );
    }
    let head_dim = match f.opt_usize("head_dim")? {
        Some(d) => d,
        None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
        None => {
            return Err(f.err("head_dim", "missing, and hidden_size is not a multiple of num_attention_heads"));
        }
    };
    if !head_dim.is_multiple_of(2) {
        return Err(f.err("head_dim", format!("{head_dim} is odd; rotary embeddings need an even head size")));
    }
    Ok((hidden_size, num_heads, num_kv_heads, head_dim))
}

fn parse_rope(f: &Fields<'_>, head_dim: usize, max_pos: usize) -> Result<Rope, ModelError> {
    // transformers 5 nests everything under rope_parameters; older configs use rope_theta + rope_scaling.
    let (field, params) = match f.get("rope_parameters") {
        Some(Value::Object(p)) => ("rope_parameters", Some(p)),
        Some(v) => return Err(f.err("rope_parameters", format!("expected an object, found {v}"))),
        None => match f.get("rope_scaling") {
            Some(Value::Object(p)) => ("rope_scaling", Some(p)),
            Some(v) => {
                return Err(f.err("rope_scaling", format!("expected an object or null, found {v}")));
            }
            None => ("rope_scaling", None),
        },
    };
    let sub = params.map(|p| Fields { path: f.path.clone(), map: p });
    let theta = match sub.as_ref().and_then(|s| s.get("rope_theta")) {
        Some(_) => sub.as_ref().unwrap().opt_f64("rope_theta")?,
        None => f.opt_f64("rope_theta")?,
    }
    .unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(f.err("rope_theta", format!("must be a positive number, found {theta}")));
    }
    let Some(sub) = sub else {
        return Ok(Rope { dim: head_dim, theta, scaling: RopeScaling::None });
    };
    let err = |name: &str, msg: String| f.err(&format!("{field}.{name}"), msg);
    let kind = sub.get("rope_type").or_else(|| sub.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor = || -> Result<f32, ModelError> {
        match sub.opt_f64("factor").map_err(|_| err("factor", "expected a number".into()))? {
            Some(x) if x >= 1.0 => Ok(x as f32),
            Some(x) => Err(err("factor", format!("must be at least 1, found {x}"))),
            None => Err(err("factor", format!("missing (required by rope_type {kind:?})"))),
        }
    };
    let num = |name: &str| -> Result<f32, ModelError> {
        sub.opt_f64(name)
            .map_err(|_| err(name, "expected a number".into()))?
            .map(|x| x as f32)
            .ok_or_else(|| err(name, format!("missing (required by rope_type {kind:?})")))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            max_position_embeddings: sub
                .opt_usize("original_max_position_embeddings")
                .map_err(|_| err("original_max_position_embeddings", "expected a positive integer".into()))?
                .unwrap_or(max_pos),
        },
        "llama3" => {
            let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
            if high <= low {
                return Err(err("high_freq_factor", format!("must exceed low_freq_factor ({high} <= {low})")));
            }
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: sub
                    .opt_usize("original_max_position_embeddings")
                    .map_err(|_| err("original_max_position_embeddings", "expected a positive integer".into()))?
                    .ok_or_else(|| err("original_max_position_embeddings", "missing (required by llama3)".into()))?,
            }
        }
        other => {
            return Err(err(
                "rope_type",
                format!("unsupported rope_type {other:?}; supported: default, linear, dynamic, llama3"),
            ));
        }
    };
    Ok(Rope { dim: head_dim, theta, scaling })
}
