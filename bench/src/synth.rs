//! Random-weight Llama models written as ordinary Hugging Face directories, for benchmarks: the same file
//! can be loaded by Tessera, `transformers` and (after conversion) llama.cpp, so all three run the same
//! weights side by side.

use std::path::Path;

use anyhow::{Context, Result};
use safetensors::{Dtype, tensor::TensorView};
use serde_json::json;

/// Shape of a synthetic Llama.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub context: usize,
}

/// The CPU benchmark shape: 124.7M parameters, about 400 MB of f32 weights read per decoded token.
pub const BENCH_SHAPE: Shape =
    Shape { hidden: 768, intermediate: 2048, layers: 12, heads: 12, kv_heads: 4, vocab: 32000, context: 2048 };

/// Llama 3 8B: 8.03B parameters, 16 GB of bf16 weights (the GPU benchmark shape).
pub const LLAMA3_8B: Shape =
    Shape { hidden: 4096, intermediate: 14336, layers: 32, heads: 32, kv_heads: 8, vocab: 128_256, context: 8192 };

/// A small, fast generator (SplitMix64): weights only need to be reproducible and non-degenerate.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The Hugging Face `config.json` of a Llama of `shape`.
pub fn config_json(shape: Shape) -> serde_json::Value {
    let s = shape;
    let hd = s.hidden / s.heads;
    let theta = if s.vocab > 100_000 { 500_000.0 } else { 10_000.0 };
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": hd,
        "vocab_size": s.vocab,
        "max_position_embeddings": s.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": theta,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    })
}

/// Writes `config.json` and `model.safetensors` (f32) for a random Llama of `shape` into `dir`.
pub fn write_model(dir: &Path, shape: Shape, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let s = shape;
    let hd = s.hidden / s.heads;
    let config = config_json(shape);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;

    let mut rng = Rng(seed);
    // Uniform with the standard deviation of the usual N(0, 0.02) initialisation.
    let a = 0.02 * 3f32.sqrt();
    let mut random =
        |n: usize| -> Vec<u8> { (0..n).flat_map(|_| ((rng.next_f32() * 2.0 - 1.0) * a).to_le_bytes()).collect() };
    let ones = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| 1f32.to_le_bytes()).collect() };
    let (h, i, q, kv) = (s.hidden, s.intermediate, s.heads * hd, s.kv_heads * hd);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        ("model.embed_tokens.weight".into(), vec![s.vocab, h], random(s.vocab * h)),
        ("model.norm.weight".into(), vec![h], ones(h)),
        ("lm_head.weight".into(), vec![s.vocab, h], random(s.vocab * h)),
    ];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            let n = shape.iter().product();
            tensors.push((format!("{p}.{name}"), shape, random(n)));
        }
        tensors.push((format!("{p}.input_layernorm.weight"), vec![h], ones(h)));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![h], ones(h)));
    }
    let views = tensors
        .iter()
        .map(|(n, shape, data)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), data)?)))
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).with_context(|| format!("writing {}", path.display()))?;
    write_tokenizer(dir, s.vocab)
}

/// A word-level tokenizer over the model's vocabulary (`<unk>`, `<s>`, `</s>`, then `w3`, `w4`, ...), so the
/// directory is a complete model that `tessera serve` can load and whose every token decodes to text.
pub fn write_tokenizer(dir: &Path, vocab: usize) -> Result<()> {
    let special = |id: usize, content: &str| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let mut words = serde_json::Map::new();
    for (i, w) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        words.insert(w.to_string(), json!(i));
    }
    for i in 3..vocab {
        words.insert(format!("w{i}"), json!(i));
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tokenizer)?)?;
    let config = json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": true});
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_model_loads_and_counts_parameters() {
        let tmp = tempfile::tempdir().unwrap();
        let shape = Shape { hidden: 32, intermediate: 64, layers: 2, heads: 4, kv_heads: 2, vocab: 100, context: 64 };
        write_model(tmp.path(), shape, 7).unwrap();
        let m = tessera_worker::Model::load(tmp.path(), tessera_worker::Shard::WHOLE).unwrap();
        let c = &m.config;
        let expect = 2 * 100 * 32 + 32 + 2 * (32 * 32 * 2 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32);
        assert_eq!(c.num_parameters(), expect);
        let tok = tessera_coordinator::tokenizer::Tokenizer::load(tmp.path()).unwrap();
        assert_eq!(tok.vocab_size(), 100);
        assert_eq!(tok.encode_prompt("w5 w99").unwrap(), [1, 5, 99]);
        assert_eq!(tok.decode(&[5, 99]).unwrap(), "w5 w99");
        assert_eq!(
            BENCH_SHAPE.hidden * BENCH_SHAPE.vocab * 2
                + 12 * (768 * 768 * 2 + 2 * 768 * 256 + 3 * 768 * 2048 + 2 * 768)
                + 768,
            124_668_672
        );
    }
}
