//! Quantized GGUF files made by llama.cpp's own quantizer (`testdata/gguf-quant/`, from
//! `scripts/make_quant_fixtures.py`): the engine keeps their matrices in Q8_0, Q4_0, Q4_K and Q6_K and
//! generates what llama.cpp generates on the same file; our Q4_K/Q6_K/Q8_0/Q4_0 quantizers give llama.cpp's
//! bytes; a tensor-parallel split that would cut a block is refused, one that does not agrees with tp 1.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;
use tessera_gguf::GgmlType;
use tessera_kernels::{DType, Device};
use tessera_worker::{
    Engine, Model, Shard,
    gguf_model::GgufModel,
    kv_cache::KvCache,
    quantize::QuantizeTo,
    tcp_collective::loopback_ring,
    weights::{Slice, WeightFiles},
};

fn dir() -> PathBuf {
    repo().join("testdata/gguf-quant")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap()
}

const FILES: [&str; 3] = ["quant-llama-q8_0.gguf", "quant-llama-q4_0.gguf", "quant-llama-q4_k_m.gguf"];

/// The files llama.cpp's references cover: ours, and the converter's Q8_0 file of stories260K (a trained
/// model).
fn reference_files() -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> = FILES.iter().map(|f| (f.to_string(), dir().join(f))).collect();
    files.push(("stories260K-q8_0.gguf".into(), repo().join("testdata/gguf-models/stories260K-q8_0.gguf")));
    files
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Per prompt: our 16 greedy ids, llama.cpp's, and the largest |logit difference| of the first step.
fn compare(stepper: &mut dyn Stepper, file: &Value) -> Vec<(Vec<u32>, Vec<u32>, f32)> {
    let cases = file["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["greedy_ids"])).collect();
    let (got, logits) = run_batch_with(
        stepper,
        &prompts,
        &vec![0; prompts.len()],
        want[0].len(),
        None,
        &tessera_worker::SamplingParams::greedy(),
    );
    cases
        .iter()
        .zip(got)
        .zip(want)
        .zip(logits)
        .map(|(((c, g), w), l)| {
            let theirs = c["first_logits"].as_array().unwrap();
            let worst = l.iter().zip(theirs).map(|(a, b)| (a - b.as_f64().unwrap() as f32).abs()).fold(0f32, f32::max);
            (g, w, worst)
        })
        .collect()
}

/// How far from a tie each divergence from llama.cpp's greedy output is: for every prompt whose 16 tokens
/// differ from llama.cpp's, our logit of our choice minus our logit of llama.cpp's choice at the first
/// token where they part (its context forced to the tokens both chose). Zero for prompts that agree.
fn divergence_margins(stepper: &mut dyn Stepper, file: &Value, got: &[Vec<u32>]) -> Vec<f32> {
    let cases = file["cases"].as_array().unwrap();
    let mut margins = Vec::new();
    for (c, g) in cases.iter().zip(got) {
        let w = ids(&c["greedy_ids"]);
        let Some(d) = g.iter().zip(&w).position(|(a, b)| a != b) else {
            margins.push(0.0);
            continue;
        };
        let context = [ids(&c["prompt_ids"]), w[..d].to_vec()].concat();
        let greedy = tessera_worker::SamplingParams::greedy();
        let (_, logits) = run_batch_with(stepper, &[context], &[0], 1, None, &greedy);
        margins.push(logits[0][g[d] as usize] - logits[0][w[d] as usize]);
    }
    margins
}

/// Greedy output agrees with llama.cpp's for all 16 tokens of most prompts, the first step's logits are
/// within 0.6 of llama.cpp's, and where a continuation parts from llama.cpp's it does so at a near-tie:
/// llama.cpp's choice is within 0.25 of ours (measured: 0.03 and 0.07). The engines round some
/// activations to different int8 levels, and these small models amplify it; the summation order matters
/// too: measured (8 prompts each), Q4_0 and Q4_K_M agree on 8/8 with llama.cpp, whose CPU backend
/// interleaves those formats' rows as we do (Q4_K_M's first-step logits equal bit for bit), while Q8_0,
/// which llama.cpp sums lane by lane, agrees on 5/8 (stories260K's Q8_0 on 7/8), worst first-step
/// |Δlogit| 0.15 and 0.25 on logits of magnitude up to ~18.
#[test]
fn quantized_files_generate_what_llama_cpp_generates() {
    let r = reference();
    // Every file's figures first, then the verdicts: a failure shows all of them.
    let mut verdicts = Vec::new();
    for (name, path) in reference_files() {
        let mut e = engine(&path, 8);
        let results = compare(&mut e, &r["files"][&name]);
        let got: Vec<Vec<u32>> = results.iter().map(|(g, _, _)| g.clone()).collect();
        let margins = divergence_margins(&mut e, &r["files"][&name], &got);
        let agree = results.iter().filter(|(g, w, _)| g == w).count();
        let worst = results.iter().map(|r| r.2).fold(0f32, f32::max);
        let widest = margins.iter().copied().fold(0f32, f32::max);
        println!(
            "{name}: {agree}/{} prompts agree with llama.cpp on 16 tokens; worst first-step |Δlogit| {worst:.4}; \
             where they part, llama.cpp's token is {widest:.4} below ours at most",
            results.len()
        );
        verdicts.push((name, results.len(), agree, worst, widest));
    }
    for (name, n, agree, worst, widest) in verdicts {
        assert!(agree * 2 > n, "{name}: only {agree}/{n} prompts agree with llama.cpp on 16 tokens");
        assert!(worst < 0.6, "{name}: first-step logits differ from llama.cpp's by {worst}");
        assert!(widest < 0.25, "{name}: a continuation parts from llama.cpp's where its token is {widest} below ours");
    }
}

/// The matrices stay in the file's formats: what a decode reads is within 1.2× of the file's size.
#[test]
fn quantized_matrices_stay_quantized_in_memory() {
    for name in FILES {
        let path = dir().join(name);
        let model = Model::load(&path, Shard::WHOLE).unwrap();
        let file_bytes = std::fs::metadata(&path).unwrap().len() as f64;
        let read = model.weight_bytes_per_token() as f64;
        println!("{name}: {read} weight bytes per token, file {file_bytes}");
        assert!(read < 1.2 * file_bytes, "{name}: the model reads {read} bytes a token from a {file_bytes}-byte file");
        let embed = model.embedding_dtype();
        assert!(matches!(embed, DType::Quant(_)), "{name}: the embedding table became {embed}");
    }
}

/// Our quantizers reproduce llama.cpp's bytes for every Q8_0, Q4_0, Q4_K and Q6_K matrix it wrote, from
/// the same F16 values (the Hugging Face copy in `hf/`; q/k rows are moved whole by the converter's
/// permutation, so the blocks of each row are the same).
#[test]
fn our_quantizers_give_llama_cpp_s_bytes() {
    let hf = WeightFiles::open(&dir().join("hf")).unwrap();
    let mut checked = std::collections::BTreeMap::new();
    for name in FILES {
        let file = GgufModel::open(&dir().join(name)).unwrap();
        for tensor in hf.names() {
            let shape = hf.shape(tensor).unwrap();
            let Some(blocks) = file.load_blocks(tensor, &shape, Slice::Full, Device::Cpu).unwrap() else { continue };
            let (ty, theirs) = blocks.quant_bytes().unwrap();
            let values = hf.load(tensor, &shape, Slice::Full).unwrap();
            let mut ours = Vec::new();
            tessera_gguf::quantize(ty, values.as_f32().unwrap(), &mut ours).unwrap();
            let bs = ty.type_size();
            let differ = ours.chunks(bs).zip(theirs.chunks(bs)).filter(|(a, b)| a != b).count();
            assert_eq!(ours.len(), theirs.len());
            assert_eq!(differ, 0, "{name}: {tensor} ({ty}): {differ} of {} blocks differ", theirs.len() / bs);
            *checked.entry(ty.to_string()).or_insert(0) += 1;
        }
    }
    println!("matrices checked per type: {checked:?}");
    for ty in ["Q8_0", "Q4_0", "Q4_K", "Q6_K"] {
        assert!(checked.contains_key(ty), "no {ty} matrix in the fixtures: {checked:?}");
    }
}

/// `--quantize q8_0` on the Hugging Face directory builds the model llama.cpp's Q8_0 file holds: the same
/// blocks, so the same logits bit for bit.
#[test]
fn quantize_on_load_equals_llama_cpp_s_q8_0_file() {
    let r = reference();
    let file = &r["files"]["quant-llama-q8_0.gguf"];
    let model = Model::load_with(&dir().join("hf"), Shard::WHOLE, tessera_kernels::Device::Cpu, Some(QuantizeTo::Q8_0))
        .unwrap();
    assert_eq!(model.embedding_dtype(), DType::Quant(GgmlType::Q8_0));
    let cache = KvCache::new(&model.kv_geometry(), 8 * BLOCKS_PER_SEQ, BLOCK).unwrap();
    let mut quantized = Engine::new(model, cache, Box::new(tessera_worker::collective::Single));
    let mut gguf = engine(&dir().join("quant-llama-q8_0.gguf"), 8);
    let cases = file["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let greedy = tessera_worker::SamplingParams::greedy();
    let a = run_batch_with(&mut quantized, &prompts, &vec![0; prompts.len()], 16, None, &greedy);
    let b = run_batch_with(&mut gguf, &prompts, &vec![0; prompts.len()], 16, None, &greedy);
    assert_eq!(a, b, "--quantize q8_0 against llama.cpp's Q8_0 file");
    let err = Model::load_with(
        &dir().join("quant-llama-q8_0.gguf"),
        Shard::WHOLE,
        tessera_kernels::Device::Cpu,
        Some(QuantizeTo::Q4_0),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("--quantize q4_0 is for model directories"), "{err}");
}

/// A split whose columns are whole blocks runs and agrees with tp 1; one that cuts Q4_K's 256-value blocks
/// is refused before loading, naming the tensor.
#[test]
fn tensor_parallel_splits_fall_on_block_boundaries() {
    let q4k = dir().join("quant-llama-q4_k_m.gguf");
    let err = Model::check_split(&q4k, 2).unwrap_err().to_string();
    assert!(err.contains("tp = 2") && err.contains("blk.0.attn_output.weight") && err.contains("256"), "{err}");
    assert!(Model::load(&q4k, Shard { rank: 0, world: 2 }).is_err());

    let q8 = dir().join("quant-llama-q8_0.gguf");
    Model::check_split(&q8, 2).unwrap();
    let ring = loopback_ring(2, std::time::Duration::from_secs(20)).unwrap();
    let mut group: Vec<Engine> = ring
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let model = Model::load(&q8, Shard { rank, world: 2 }).unwrap();
            let cache = KvCache::new(&model.kv_geometry(), 8 * BLOCKS_PER_SEQ, BLOCK).unwrap();
            Engine::new(model, cache, Box::new(comm))
        })
        .collect();
    let r = reference();
    let pair = compare(&mut group, &r["files"]["quant-llama-q8_0.gguf"]);
    let one = compare(&mut engine(&q8, 8), &r["files"]["quant-llama-q8_0.gguf"]);
    for ((g2, _, _), (g1, _, _)) in pair.iter().zip(&one) {
        assert_eq!(g2[..8], g1[..8], "Q8_0 at tp 2 against tp 1");
    }
}
