//! Models from GGUF files (`testdata/gguf-models/`, written by llama.cpp's own converter with
//! `scripts/make_gguf_models.py`): each f32 file gives exactly the weights of the safetensors it was
//! converted from (names, layout, q/k un-permuted, this rank's slice) and reproduces that model's golden
//! file through the engine, alone and as a tensor-parallel pair; the Q8_0 file dequantizes to what
//! llama.cpp's `gguf.quants.dequantize` gives and its logits stay close to the f32 model's; and broken,
//! hostile or unsupported files are refused with a message naming the file and the key or tensor.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tessera_gguf::{Array, GgufFile, Value as GValue};
use tessera_worker::{
    Engine, Model, SamplingParams, Shard,
    gguf_model::GgufModel,
    kv_cache::KvCache,
    tcp_collective::loopback_ring,
    weights::{Slice, WeightFiles},
};

fn gguf_dir() -> PathBuf {
    repo().join("testdata/gguf-models")
}

/// Each f32 GGUF file and the Hugging Face model directory it was converted from (with its golden file).
fn f32_models() -> Vec<(PathBuf, PathBuf)> {
    let g = gguf_dir();
    vec![
        (g.join("stories260K-f32.gguf"), repo().join("models/stories260K")),
        (g.join("tiny-qwen2-f32.gguf"), repo().join("testdata/models/tiny-qwen2")),
        (g.join("tiny-llama-bpe-f32.gguf"), g.join("tiny-llama-bpe")),
    ]
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Per golden case, the greedy ids generated and the golden ones.
type GreedyPairs = Vec<(Vec<u32>, Vec<u32>)>;

/// Greedy ids and the worst |logit - golden| of every golden case of `dir`, run on `stepper`.
fn run_golden(stepper: &mut dyn Stepper, dir: &Path) -> (GreedyPairs, f32) {
    let cases = golden(dir);
    let n_new = cases[0].greedy_ids.len();
    let mut worst = 0f32;
    let mut ids = Vec::new();
    for c in &cases {
        let (got, logits) = run_batch_with(
            stepper,
            std::slice::from_ref(&c.prompt_ids),
            &[0],
            n_new,
            Some(5),
            &SamplingParams::greedy(),
        );
        assert_eq!(logits[0].len(), c.logits.len());
        for (a, b) in logits[0].iter().zip(&c.logits) {
            worst = worst.max((a - b).abs());
        }
        ids.push((got[0].clone(), c.greedy_ids.clone()));
    }
    (ids, worst)
}

#[test]
fn every_f32_gguf_reproduces_the_golden_file_of_its_model() {
    for (file, dir) in f32_models() {
        let mut e = engine(&file, 1);
        let (ids, worst) = run_golden(&mut e, &dir);
        for (got, want) in ids {
            assert_eq!(got, want, "{}: greedy ids", name(&file));
        }
        println!("{}: worst |logit - golden| = {worst:.2e}", name(&file));
        assert!(worst < 1e-4, "{}: logits differ from transformers' by {worst}", name(&file));
    }
}

#[test]
fn a_tensor_parallel_pair_on_a_gguf_file_reproduces_the_golden_file() {
    for (file, dir) in f32_models() {
        let ring = loopback_ring(2, std::time::Duration::from_secs(20)).unwrap();
        let mut group: Vec<Engine> = ring
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let model = Model::load(&file, Shard { rank, world: 2 }).unwrap();
                let cache = KvCache::new(&model.kv_geometry(), BLOCKS_PER_SEQ, BLOCK).unwrap();
                Engine::new(model, cache, Box::new(comm))
            })
            .collect();
        let (ids, worst) = run_golden(&mut group, &dir);
        for (got, want) in ids {
            assert_eq!(got, want, "{} at tp 2: greedy ids", name(&file));
        }
        println!("{} at tp 2: worst |logit - golden| = {worst:.2e}", name(&file));
        assert!(worst < 1e-4, "{} at tp 2: logits differ by {worst}", name(&file));
    }
}

/// Every weight, whole and as the rows and columns a rank of two (and of four) reads, bit for bit.
#[test]
fn an_f32_gguf_file_gives_exactly_the_safetensors_weights_in_every_slice() {
    for (file, dir) in f32_models() {
        let gguf = GgufModel::open(&file).unwrap();
        let st = WeightFiles::open(&dir).unwrap();
        let mut names: Vec<&str> = st.names().collect();
        names.sort();
        let mut checked = 0;
        for n in names {
            let shape = st.shape(n).unwrap();
            let mut slices = vec![Slice::Full];
            for parts in [2, 4] {
                let rows = shape[0] / parts;
                slices.push(Slice::Rows(rows..2 * rows));
                if let [_, cols] = shape[..] {
                    slices.push(Slice::Cols(cols / parts..2 * (cols / parts)));
                }
            }
            // q and k rows are taken a head at a time, as ranks take them.
            if n.contains("q_proj") || n.contains("k_proj") {
                let hd = gguf.config.head_dim;
                slices.push(Slice::Rows(hd..2 * hd));
            }
            for s in slices {
                let want = st.load(n, &shape, s.clone()).unwrap();
                let got = gguf.load(n, &shape, s.clone()).unwrap_or_else(|e| panic!("{}: {n}: {e}", name(&file)));
                assert_eq!(got.shape(), want.shape(), "{}: {n} {s:?}", name(&file));
                let (g, w) = (got.host_f32().unwrap(), want.host_f32().unwrap());
                assert!(
                    g.iter().zip(w.iter()).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{}: {n} {s:?} differs from the safetensors",
                    name(&file)
                );
            }
            checked += 1;
        }
        assert!(checked > 10, "{}: only {checked} tensors", name(&file));
    }
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(gguf_dir().join("reference.json")).unwrap()).unwrap()
}

/// The weights of every model file, as the worker loads them, hash to what gguf-py's dequantize and the
/// inverse of the converter's permute give (`reference.json`): the Q8_0 file's included.
#[test]
fn weights_are_what_gguf_py_dequantizes_for_every_file_and_type() {
    let r = reference();
    let mut types = std::collections::BTreeSet::new();
    for (file, tensors) in r["weights"].as_object().unwrap() {
        let gguf = GgufModel::open(&gguf_dir().join(file)).unwrap();
        for (n, t) in tensors.as_object().unwrap() {
            if n == "rope_freqs.weight" {
                continue;
            }
            let shape: Vec<usize> =
                t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let got = gguf.load(n, &shape, Slice::Full).unwrap_or_else(|e| panic!("{file}: {n}: {e}"));
            let bytes: Vec<u8> = got.host_f32().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
            let hash: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hash, t["sha256"].as_str().unwrap(), "{file}: {n} ({})", t["gguf"]);
            types.insert(t["type"].as_str().unwrap().to_string());
        }
    }
    for ty in ["F32", "F16", "Q8_0"] {
        assert!(types.contains(ty), "no {ty} tensor was checked: {types:?}");
    }
}

/// The Q8_0 file through the engine, its matrices kept in Q8_0 and multiplied with int8 activations as
/// llama.cpp multiplies them: close to what transformers computes with the weights gguf-py dequantizes from
/// it (the first 16 greedy ids exactly, logits within 0.3), and close to the f32 model: its logits within
/// 0.4 of the f32 golden file's, its first greedy tokens the same. (Agreement with llama.cpp itself is
/// checked on the files of `testdata/gguf-quant/`, in `gguf_quantized.rs`.)
#[test]
fn the_q8_0_file_is_its_dequantized_weights_and_stays_close_to_the_f32_model() {
    let file = gguf_dir().join("stories260K-q8_0.gguf");
    let mut e = engine(&file, 1);
    let (ids, worst) = run_golden(&mut e, &gguf_dir().join("stories260K-q8_0-golden"));
    println!("stories260K-q8_0: worst |logit - dequantized golden| = {worst:.2e}");
    for (got, want) in &ids {
        assert_eq!(
            got[..16],
            want[..16],
            "stories260K-q8_0: greedy ids against transformers on the dequantized weights"
        );
    }
    // The engine quantizes activations to int8 per 32 values for the Q8_0 matrices, as llama.cpp does
    // (measured: 0.237 at worst on logits of magnitude up to ~20; the weights' own quantization costs 0.198).
    assert!(worst < 0.3, "Q8_0 logits differ from transformers' on the same weights by {worst}");

    let f32_dir = repo().join("models/stories260K");
    let (ids, worst) = run_golden(&mut e, &f32_dir);
    let largest = golden(&f32_dir).iter().flat_map(|c| c.logits.clone()).fold(0f32, |m, x| m.max(x.abs()));
    let same: usize = ids.iter().map(|(g, w)| g.iter().zip(w).take_while(|(a, b)| a == b).count()).sum();
    let total: usize = ids.iter().map(|(_, w)| w.len()).sum();
    println!(
        "stories260K-q8_0: worst |logit - f32 golden| = {worst:.3} (largest |logit| {largest:.1}); greedy tokens \
         equal before a first difference: {same}/{total}"
    );
    assert!(worst > 0.0, "Q8_0 cannot be exact");
    // Measured: 0.355 at worst (0.198 with f32 activations, before the matrices stayed in Q8_0).
    assert!(worst < 0.4, "Q8_0 logits differ from the f32 model's by {worst}");
    assert!(ids.iter().all(|(g, w)| g[..8] == w[..8]), "the first greedy tokens should survive Q8_0: {ids:?}");
}

#[test]
fn the_config_read_from_gguf_metadata_is_the_config_json() {
    for (file, dir) in f32_models() {
        let g = Model::config_at(&file).unwrap();
        let h = Model::config_at(&dir).unwrap();
        let key = |c: &tessera_worker::ModelConfig| {
            (
                c.architecture,
                c.hidden_size,
                c.intermediate_size,
                c.num_layers,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                c.vocab_size,
                c.max_position_embeddings,
                c.rms_norm_eps,
                c.rope.theta,
                (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings),
            )
        };
        assert_eq!(key(&g), key(&h), "{}", name(&file));
        // llama3 scaling comes back as the converter's per-frequency factors: the same frequencies.
        let (a, b) = (g.rope.inv_freq(1), h.rope.inv_freq(1));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * y.abs(), "{}: RoPE {a:?} vs {b:?}", name(&file));
        }
    }
    let bpe = Model::config_at(&gguf_dir().join("tiny-llama-bpe-f32.gguf")).unwrap();
    assert!(matches!(bpe.rope.scaling, tessera_kernels::rope::RopeScaling::Factors(_)), "{:?}", bpe.rope);
}

// ---------------------------------------------------------------------------------------------------------
// Broken and unsupported files.
// ---------------------------------------------------------------------------------------------------------

/// A GGUF file's parts, to be edited and written back.
struct Parts {
    metadata: Vec<(String, GValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn parts(path: &Path) -> Parts {
    let f = GgufFile::open(path).unwrap();
    Parts {
        metadata: f.metadata().iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        tensors: f
            .tensors()
            .map(|t| (t.name().to_string(), t.shape().to_vec(), t.ggml_type().id(), t.data().to_vec()))
            .collect(),
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s);
}

fn put_value(out: &mut Vec<u8>, v: &GValue) {
    match v {
        GValue::U8(x) => out.push(*x),
        GValue::I8(x) => out.extend(x.to_le_bytes()),
        GValue::U16(x) => out.extend(x.to_le_bytes()),
        GValue::I16(x) => out.extend(x.to_le_bytes()),
        GValue::U32(x) => out.extend(x.to_le_bytes()),
        GValue::I32(x) => out.extend(x.to_le_bytes()),
        GValue::F32(x) => out.extend(x.to_le_bytes()),
        GValue::Bool(x) => out.push(*x as u8),
        GValue::String(s) => put_str(out, s.as_bytes()),
        GValue::U64(x) => out.extend(x.to_le_bytes()),
        GValue::I64(x) => out.extend(x.to_le_bytes()),
        GValue::F64(x) => out.extend(x.to_le_bytes()),
        GValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend(a.elem_type().id().to_le_bytes());
    out.extend((a.len() as u64).to_le_bytes());
    for i in 0..a.len() {
        put_value(out, &a.get(i).unwrap());
    }
}

/// Writes `p` as a GGUF v3 file (alignment 32).
fn write(p: &Parts, path: &Path) {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((p.tensors.len() as u64).to_le_bytes());
    out.extend((p.metadata.len() as u64).to_le_bytes());
    for (k, v) in &p.metadata {
        put_str(&mut out, k.as_bytes());
        out.extend(v.value_type().id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    for (n, shape, ty, data) in &p.tensors {
        put_str(&mut out, n.as_bytes());
        out.extend((shape.len() as u32).to_le_bytes());
        shape.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (data.len() as u64).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    for (_, _, _, data) in &p.tensors {
        out.extend(data);
        out.resize(out.len().next_multiple_of(32), 0);
    }
    std::fs::write(path, out).unwrap();
}

/// The error loading `parts` written to a file, which must name that file and each of `expect`.
fn refused(p: &Parts, expect: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broken.gguf");
    write(p, &path);
    let e = match Model::load(&path, Shard::WHOLE) {
        Ok(_) => panic!("loading must fail (expected {expect:?})"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&path.display().to_string()), "the error must name the file: {e}");
    for x in expect {
        assert!(e.contains(x), "the error must mention {x:?}: {e}");
    }
    e
}

fn stories() -> Parts {
    parts(&gguf_dir().join("stories260K-f32.gguf"))
}

fn set(p: &mut Parts, key: &str, v: GValue) {
    match p.metadata.iter_mut().find(|(k, _)| k == key) {
        Some(kv) => kv.1 = v,
        None => p.metadata.push((key.into(), v)),
    }
}

#[test]
fn the_rewritten_file_still_loads_so_the_refusals_below_are_about_their_edits() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("same.gguf");
    write(&stories(), &path);
    let mut e = engine(&path, 1);
    let (ids, _) = run_golden(&mut e, &repo().join("models/stories260K"));
    assert_eq!(ids[0].0, ids[0].1);
}

#[test]
fn an_unsupported_architecture_is_refused_by_name() {
    let mut p = stories();
    set(&mut p, "general.architecture", GValue::String("gemma2".into()));
    refused(&p, &["general.architecture", "gemma2", "llama, qwen2"]);
}

#[test]
fn a_missing_or_mistyped_key_is_named() {
    let mut p = stories();
    p.metadata.retain(|(k, _)| k != "llama.block_count");
    refused(&p, &["llama.block_count", "missing"]);

    let mut p = stories();
    set(&mut p, "llama.attention.head_count", GValue::String("eight".into()));
    refused(&p, &["llama.attention.head_count", "string"]);

    let mut p = stories();
    set(&mut p, "llama.attention.layer_norm_rms_epsilon", GValue::U32(1));
    refused(&p, &["llama.attention.layer_norm_rms_epsilon", "f32"]);

    let mut p = stories();
    set(&mut p, "llama.rope.scaling.type", GValue::String("yarn".into()));
    refused(&p, &["llama.rope.scaling.type", "yarn"]);

    let mut p = stories();
    set(&mut p, "llama.expert_count", GValue::U32(8));
    refused(&p, &["llama.expert_count", "mixture-of-experts"]);

    let mut p = stories();
    set(&mut p, "llama.rope.dimension_count", GValue::U32(4));
    refused(&p, &["llama.rope.dimension_count", "partial rotary"]);
}

#[test]
fn a_tensor_of_the_wrong_shape_or_missing_is_named() {
    // Twice the KV heads: the file's k projection is half the rows the config now asks for.
    let mut p = stories();
    set(&mut p, "llama.attention.head_count_kv", GValue::U32(8));
    refused(&p, &["blk.0.attn_k.weight", "expected shape [64, 64]", "[32, 64]"]);

    let mut p = stories();
    for t in &mut p.tensors {
        if t.0 == "blk.1.ffn_up.weight" {
            t.0 = "blk.1.ffn_upper.weight".into();
        }
    }
    refused(&p, &["blk.1.ffn_up.weight", "missing"]);

    // rope_freqs of the wrong length.
    let mut p = stories();
    p.tensors.push(("rope_freqs.weight".into(), vec![3], 0, vec![0; 12]));
    refused(&p, &["rope_freqs.weight", "expected 4 f32 factors"]);
}

#[test]
fn a_truncated_or_hostile_file_is_refused_with_the_file_and_tensor_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = std::fs::read(gguf_dir().join("stories260K-f32.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &src[..src.len() * 3 / 5]).unwrap();
    let e = Model::load(&cut, Shard::WHOLE).err().expect("a truncated file must be refused").to_string();
    assert!(e.contains(&cut.display().to_string()) && e.contains("tensor ") && e.contains("past the end"), "{e}");

    // Only a header: cut inside the metadata.
    std::fs::write(&cut, &src[..300]).unwrap();
    let e = Model::load(&cut, Shard::WHOLE).err().unwrap().to_string();
    assert!(e.contains(&cut.display().to_string()) && e.contains("header"), "{e}");

    // Not GGUF at all, under a .gguf name.
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"{\"not\": \"gguf\"}").unwrap();
    let e = Model::load(&junk, Shard::WHOLE).err().unwrap().to_string();
    assert!(e.contains(&junk.display().to_string()) && e.contains("not a GGUF file"), "{e}");

    // A tensor whose data would lie past the end of the file.
    let mut p = stories();
    let last = p.tensors.len() - 1;
    p.tensors[last].1 = vec![64, 4096];
    let path = tmp.path().join("forged.gguf");
    write(&p, &path);
    let e = Model::load(&path, Shard::WHOLE).err().unwrap().to_string();
    assert!(e.contains(&p.tensors[last].0) && e.contains("past the end"), "{e}");

    // A vocabulary-only file has no weights.
    let vocab = gguf_dir().join("tokenizers/qwen2.gguf");
    let e = Model::load(&vocab, Shard::WHOLE).err().unwrap().to_string();
    assert!(e.contains("qwen2.gguf") && e.contains(".weight") && e.contains("missing"), "{e}");

    // A path that does not exist.
    let e = Model::load(&tmp.path().join("nope.gguf"), Shard::WHOLE).err().unwrap().to_string();
    assert!(e.contains("nope.gguf") && e.contains("does not exist"), "{e}");
}
