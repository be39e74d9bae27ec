//! A PEFT LoRA adapter as Hugging Face writes it (`adapter_config.json` + `adapter_model.safetensors`),
//! loaded as this rank's shard: for every layer and target projection the down-projection `A` (`[r, in]`)
//! and up-projection `B` (`[out, r]`), cut like the base layer they adapt.
//!
//! A column-parallel projection (q, k, v, gate, up: split by output rows) keeps `A` whole and this rank's
//! rows of `B`; a row-parallel one (o, down: split by input columns) keeps this rank's columns of `A` and
//! `B` whole, so its delta is a partial sum that the base layer's all-reduce completes. No collective of
//! its own.
//!
//! Everything in the files is untrusted: the config is bounded and checked field by field, every tensor's
//! shape is checked against the model's, and a tensor the adapter would not use is an error naming it
//! rather than something silently ignored.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use serde_json::Value;
use tessera_kernels::{DType, Device, Tensor};

use crate::{
    config::ModelConfig,
    error::ModelError,
    model::ShardLayout,
    weights::{Slice, WeightFiles},
};

/// A projection of a decoder block that an adapter may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// The module's name in Hugging Face checkpoints and in PEFT's `target_modules`.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    fn from_module(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.module() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One projection's low-rank pair, this rank's shard of it.
pub struct LoraPair {
    /// `[r, in_local]`.
    pub a: Tensor,
    /// `[out_local, r]`.
    pub b: Tensor,
}

/// Limits an adapter must fit (`--max-lora-rank`).
#[derive(Clone, Copy, Debug)]
pub struct AdapterLimits {
    pub max_rank: usize,
}

/// A loaded adapter: its pairs per layer and target, and the scale its deltas are multiplied by.
pub struct Adapter {
    pub name: String,
    pub dir: PathBuf,
    pub rank: usize,
    /// `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA.
    pub scale: f32,
    pub targets: Vec<Target>,
    /// `layers[l][target]`.
    layers: Vec<[Option<LoraPair>; 7]>,
}

/// `adapter_config.json`'s fields that matter, checked.
struct AdapterConfig {
    rank: usize,
    alpha: f64,
    rslora: bool,
    targets: Vec<Target>,
}

fn parse_config(path: &Path) -> Result<AdapterConfig, ModelError> {
    let text = crate::files::read_json_text(path)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::File { path: path.into(), message: format!("not valid JSON: {e}") })?;
    let err = |field: &str, message: String| ModelError::Field { path: path.into(), field: field.into(), message };
    let obj = v
        .as_object()
        .ok_or_else(|| ModelError::File { path: path.into(), message: "expected a JSON object".into() })?;
    if let Some(t) = obj.get("peft_type").and_then(Value::as_str)
        && t != "LORA"
    {
        return Err(err("peft_type", format!("{t} adapters are not supported; only LORA")));
    }
    let r = obj
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| err("r", "missing, or not a positive integer".into()))?;
    // Bounded before anything is allocated by it; `--max-lora-rank` bounds it again, more tightly.
    if r > 1 << 16 {
        return Err(err("r", format!("rank {r} is above the largest supported, {}", 1 << 16)));
    }
    let rank = r as usize;
    let alpha = match obj.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(a) => a.as_f64().filter(|a| a.is_finite()).ok_or_else(|| err("lora_alpha", "not a number".into()))?,
    };
    let rslora = match obj.get("use_rslora") {
        None | Some(Value::Null) => false,
        Some(b) => b.as_bool().ok_or_else(|| err("use_rslora", "not a boolean".into()))?,
    };
    // Features that change what a LoRA layer computes, refused rather than ignored.
    let off = |field: &str, ok: &dyn Fn(&Value) -> bool| -> Result<(), ModelError> {
        match obj.get(field) {
            Some(v) if !v.is_null() && !ok(v) => Err(err(field, format!("{v} is not supported"))),
            _ => Ok(()),
        }
    };
    off("bias", &|v| v == "none")?;
    off("use_dora", &|v| v == false)?;
    off("fan_in_fan_out", &|v| v == false)?;
    off("modules_to_save", &|v| v.as_array().is_some_and(Vec::is_empty))?;
    off("lora_bias", &|v| v == false)?;
    off("rank_pattern", &|v| v.as_object().is_some_and(|m| m.is_empty()))?;
    for field in ["layer_replication", "target_parameters", "alora_invocation_tokens", "trainable_token_indices"] {
        off(field, &|_| false)?;
    }
    off("alpha_pattern", &|v| v.as_object().is_some_and(|m| m.is_empty()))?;
    let targets = match obj.get("target_modules") {
        Some(Value::Array(a)) => {
            let mut t = Vec::new();
            for m in a {
                let name = m.as_str().ok_or_else(|| err("target_modules", format!("{m} is not a module name")))?;
                let target = Target::from_module(name).ok_or_else(|| {
                    err(
                        "target_modules",
                        format!(
                            "the model has no projection `{name}` an adapter can change (it can change {})",
                            Target::ALL.map(Target::module).join(", ")
                        ),
                    )
                })?;
                if !t.contains(&target) {
                    t.push(target);
                }
            }
            t
        }
        Some(Value::String(s)) if s == "all-linear" => Target::ALL.to_vec(),
        Some(Value::String(s)) => {
            return Err(err("target_modules", format!("the pattern {s:?} is not supported; list the module names")));
        }
        _ => return Err(err("target_modules", "missing, or not a list of module names".into())),
    };
    if targets.is_empty() {
        return Err(err("target_modules", "names no module".into()));
    }
    Ok(AdapterConfig { rank, alpha, rslora, targets })
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("scale", &self.scale)
            .finish()
    }
}

impl Adapter {
    /// Loads the adapter in `dir` for a model of `model`'s shape, this rank's shard (`layout`), onto
    /// `device` (bf16 on a GPU, f32 on the CPU, like the base weights).
    pub fn load(
        name: &str,
        dir: &Path,
        model: &ModelConfig,
        layout: &ShardLayout,
        device: Device,
        limits: AdapterLimits,
    ) -> Result<Adapter, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::File {
                path: dir.to_path_buf(),
                message: "no such LoRA adapter directory (adapter_config.json and adapter_model.safetensors)".into(),
            });
        }
        let config_path = dir.join("adapter_config.json");
        let cfg = parse_config(&config_path)?;
        if cfg.rank > limits.max_rank {
            return Err(ModelError::Field {
                path: config_path,
                field: "r".into(),
                message: format!("rank {} is above the server's --max-lora-rank of {}", cfg.rank, limits.max_rank),
            });
        }
        let file = dir.join("adapter_model.safetensors");
        let w = WeightFiles::open_file(&file)?;
        let (h, hd, inter) = (model.hidden_size, model.head_dim, model.intermediate_size);
        let (qd, kvd) = (model.num_heads * hd, model.num_kv_heads * hd);
        let q_rows = layout.heads.start * hd..layout.heads.end * hd;
        let kv_rows = layout.kv_heads.start * hd..layout.kv_heads.end * hd;
        let r = cfg.rank;
        let mut used = HashSet::new();
        let mut layers = Vec::with_capacity(model.num_layers);
        for l in 0..model.num_layers {
            let mut pairs: [Option<LoraPair>; 7] = Default::default();
            for &t in &cfg.targets {
                let p = format!("base_model.model.model.layers.{l}.{}.{}", t.parent(), t.module());
                let (a_name, b_name) = (format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight"));
                // PEFT's `layers_to_transform` leaves some layers out: a layer may have neither tensor.
                match (w.contains(&a_name), w.contains(&b_name)) {
                    (false, false) => continue,
                    (true, true) => {}
                    (a, _) => {
                        let missing = if a { b_name } else { a_name };
                        return Err(ModelError::Tensor {
                            path: file,
                            tensor: missing,
                            message: "missing (the other half of its LoRA pair is there)".into(),
                        });
                    }
                }
                // (full shape of A, its slice; full shape of B, its slice)
                let (a_in, a_slice, b_out, b_slice) = match t {
                    Target::Q => (h, Slice::Full, qd, Slice::Rows(q_rows.clone())),
                    Target::K | Target::V => (h, Slice::Full, kvd, Slice::Rows(kv_rows.clone())),
                    Target::Gate | Target::Up => (h, Slice::Full, inter, Slice::Rows(layout.intermediate.clone())),
                    Target::O => (qd, Slice::Cols(q_rows.clone()), h, Slice::Full),
                    Target::Down => (inter, Slice::Cols(layout.intermediate.clone()), h, Slice::Full),
                };
                let put = |t: Tensor| -> Result<Tensor, ModelError> {
                    if device == Device::Cpu { Ok(t) } else { Ok(t.to_dtype(DType::BF16)?.to_device(device)?) }
                };
                let a = put(w.load(&a_name, &[r, a_in], a_slice)?)?;
                let b = put(w.load(&b_name, &[b_out, r], b_slice)?)?;
                used.insert(a_name);
                used.insert(b_name);
                pairs[t.index()] = Some(LoraPair { a, b });
            }
            layers.push(pairs);
        }
        let mut unused: Vec<&str> = w.names().filter(|n| !used.contains(*n)).collect();
        unused.sort_unstable();
        if let Some(first) = unused.first() {
            return Err(ModelError::Tensor {
                path: file,
                tensor: first.to_string(),
                message: format!(
                    "not a LoRA pair of a layer (0..{}) and target module ({}) of this adapter and model",
                    model.num_layers,
                    cfg.targets.iter().map(|t| t.module()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        if used.is_empty() {
            return Err(ModelError::File { path: file, message: "holds no LoRA weights".into() });
        }
        let scale = if cfg.rslora { cfg.alpha / (r as f64).sqrt() } else { cfg.alpha / r as f64 } as f32;
        Ok(Adapter { name: name.to_string(), dir: dir.to_path_buf(), rank: r, scale, targets: cfg.targets, layers })
    }

    /// Layer `layer`'s pair for `target`, if the adapter changes it.
    pub fn pair(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Bytes of this rank's adapter weights.
    pub fn size_in_bytes(&self) -> usize {
        self.layers.iter().flatten().flatten().map(|p| p.a.size_in_bytes() + p.b.size_in_bytes()).sum()
    }
}
