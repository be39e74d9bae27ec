//! Random-weight Llama models written as ordinary Hugging Face directories, for benchmarks: the same file
//! can be loaded by Tessera, `transformers` and (after conversion) llama.cpp, so all three run the same
//! weights side by side.

use std::path::Path;

use anyhow::{Context, Result};
use safetensors::{Dtype, tensor::TensorView};
use serde_json::{Value, json};

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
pub struct Rng(pub u64);

impl Rng {
    pub fn next_f32(&mut self) -> f32 {
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

/// A SentencePiece-style tokenizer over the model's vocabulary, shaped as Llama 2's is: `<unk>`, `<s>`,
/// `</s>`, the 256 byte-fallback tokens `<0x00>`..`<0xFF>`, then pieces (`▁` for a space) made of letters,
/// digits and JSON punctuation, shortest first, until the vocabulary is full. So the directory is a complete
/// model that `tessera serve` can load, every token decodes to text, and constrained decoding has a
/// vocabulary of realistic size and variety to compute masks over. (No merges: text encodes a character
/// at a time, which benchmarks do not mind; they send token ids.)
pub fn write_tokenizer(dir: &Path, vocab: usize) -> Result<()> {
    let special = |id: usize, content: &str| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let mut pieces: Vec<String> = ["<unk>", "<s>", "</s>"].iter().map(|s| s.to_string()).collect();
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let alphabet: Vec<char> =
        "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789{}[]\":,.".chars().collect();
    let mut shorter: Vec<String> = vec![String::new()];
    while pieces.len() < vocab {
        let longer: Vec<String> =
            shorter.iter().flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}"))).collect();
        pieces.extend(longer.iter().take(vocab - pieces.len()).cloned());
        shorter = longer;
    }
    pieces.truncate(vocab);
    let words: serde_json::Map<String, Value> = pieces.iter().enumerate().map(|(i, p)| (p.clone(), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": words, "merges": []},
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
        let shape = Shape { hidden: 32, intermediate: 64, layers: 2, heads: 4, kv_heads: 2, vocab: 400, context: 64 };
        write_model(tmp.path(), shape, 7).unwrap();
        let m = tessera_worker::Model::load(tmp.path(), tessera_worker::Shard::WHOLE).unwrap();
        let c = &m.config;
        let expect = 2 * 400 * 32 + 32 + 2 * (32 * 32 * 2 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32);
        assert_eq!(c.num_parameters(), expect);
        let tok = tessera_coordinator::tokenizer::Tokenizer::load(tmp.path()).unwrap();
        assert_eq!(tok.vocab_size(), 400);
        // A character at a time: `▁`, letters, and a byte token for what has no piece.
        let ids = tok.encode_prompt("ab é").unwrap();
        assert_eq!(ids[..4], [1, 259, 260, 261]);
        assert_eq!(tok.decode(&ids).unwrap(), "ab é");
        assert_eq!(
            BENCH_SHAPE.hidden * BENCH_SHAPE.vocab * 2
                + 12 * (768 * 768 * 2 + 2 * 768 * 256 + 3 * 768 * 2048 + 2 * 768)
                + 768,
            124_668_672
        );
    }
}
