//! The models on `cuda:0` against the same golden values from Hugging Face `transformers` (computed in
//! f32) that the CPU reproduces exactly.
//!
//! The GPU computes in bf16 (weights, activations and KV cache) with f32 accumulation, as transformers does
//! with `torch_dtype=bfloat16`, so logits are compared by relative error and greedy continuations by how
//! far they follow the golden one: bf16 rounding can flip a near-tie later in a continuation. Needs a GPU:
//! `#[ignore]`d here, run by `scripts/gpu-check.sh`.

mod common;

use common::*;
use tessera_kernels::Device;

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn every_model_follows_its_golden_file_on_cuda() {
    for dir in golden_models() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let cases = golden(&dir);
        let mut engine = engine_on(&dir, cases.len(), Device::Cuda(0));
        assert_eq!(engine.model.device, Device::Cuda(0));
        let n_new = cases[0].greedy_ids.len();
        for c in &cases {
            let (ids, logits) = greedy_batch(&mut engine, std::slice::from_ref(&c.prompt_ids), n_new, None);
            let norm: f32 = c.logits.iter().map(|v| v * v).sum::<f32>().sqrt();
            let diff: f32 = logits[0].iter().zip(&c.logits).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            let agree = ids[0].iter().zip(&c.greedy_ids).take_while(|(a, b)| a == b).count();
            println!("{name}: logits rel err {:.2e}, greedy ids agree for {agree}/{n_new}", diff / norm);
            assert!(diff / norm < 3e-2, "{name}: last-prompt logits rel err {}", diff / norm);
            if name == "stories260K" {
                // A trained model has clear margins: bf16 must not change its greedy text.
                assert_eq!(agree, n_new, "{name}: greedy ids {:?} vs golden {:?}", ids[0], c.greedy_ids);
            } else {
                // The random test models have near-ties everywhere: the first pick must be the golden top
                // token, or one within four RMS logit errors of it (a tie under bf16 noise).
                let rms = diff / (c.logits.len() as f32).sqrt();
                let top = c.logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let picked = c.logits[ids[0][0] as usize];
                assert!(
                    top - picked <= 4.0 * rms,
                    "{name}: first token {} is {} below the top logit (rms {rms})",
                    ids[0][0],
                    top - picked
                );
            }
        }
    }
}

/// Chunked prefill and batching use different kernels (prefill tiles vs the decode kernel) and GEMM
/// shapes; the greedy text must not depend on them for the default model.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn stories_greedy_text_is_the_same_alone_batched_and_chunked_on_cuda() {
    let dir = repo().join("models/stories260K");
    let cases = golden(&dir);
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let mut engine = engine_on(&dir, prompts.len(), Device::Cuda(0));
    let (batched, _) = greedy_batch(&mut engine, &prompts, 20, None);
    let (chunked, _) = greedy_batch(&mut engine, &prompts, 20, Some(3));
    for (i, p) in prompts.iter().enumerate() {
        let (alone, _) = greedy_batch(&mut engine, std::slice::from_ref(p), 20, None);
        assert_eq!(alone[0], batched[i], "prompt {i}: alone vs batched");
        assert_eq!(alone[0], chunked[i], "prompt {i}: alone vs chunked prefill");
    }
}

/// Constrained decoding on the GPU: a masked row is sampled on the host (as rows with penalties are), so
/// the token is always an allowed one, greedy or drawn, batched with an unmasked row that stays on the
/// device.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn a_mask_holds_on_cuda_beside_a_row_sampled_on_the_device() {
    let dir = repo().join("models/stories260K");
    let mut engine = engine_on(&dir, 2, Device::Cuda(0));
    let prompt = [1u32, 403, 407, 261, 378];
    let mut words = vec![0u32; 16];
    for id in 400..=410u32 {
        words[id as usize / 32] |= 1 << (id % 32);
    }
    let greedy = tessera_worker::SamplingParams::greedy();
    let drawn = tessera_worker::SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
    for p in [&greedy, &drawn] {
        let (t0, t1) = (table(0), table(1));
        let masked = tessera_worker::StepSeq {
            id: 1,
            tokens: &prompt,
            start_pos: 0,
            block_table: &t0,
            sample: Some(p),
            penalty_context: &prompt,
            output_context: &[],
            starts: true,
            score_prompt: None,
            allowed: Some(&words),
            adapter: 0,
        };
        let free = tessera_worker::StepSeq { id: 2, block_table: &t1, allowed: None, ..masked.clone() };
        let out = engine.step(&[masked, free]).unwrap();
        assert!((400..=410).contains(&out[0].sampled.token), "{p:?}: {}", out[0].sampled.token);
        engine.release(1);
        engine.release(2);
    }
}

/// LoRA adapters on `cuda:0` (bf16) against peft's float32 logits (testdata/lora/golden.json), each in a
/// batch mixing every adapter of tiny-llama3 with the base model: the gather, the two small GEMMs and the
/// scaled add run on the device.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn lora_adapters_in_a_mixed_batch_follow_peft_on_cuda() {
    let dir = repo().join("testdata/models/tiny-llama3");
    let fixtures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("testdata/lora/golden.json")).unwrap()).unwrap();
    let adapters = fixtures["models"]["tiny-llama3"].as_object().unwrap();
    let mut engine = engine_on(&dir, 16, Device::Cuda(0));
    let (mut prompts, mut which, mut want) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (name, cases)) in adapters.iter().enumerate() {
        let limits = tessera_worker::lora::AdapterLimits { max_rank: 64 };
        engine.load_adapter(i as u32 + 1, name, &repo().join("testdata/lora/tiny-llama3").join(name), limits).unwrap();
        for c in golden_cases(cases) {
            prompts.push(c.prompt_ids);
            which.push(i as u32 + 1);
            want.push((name.clone(), c.logits));
        }
    }
    prompts.push(golden(&dir)[0].prompt_ids.clone());
    which.push(0);
    let (_, logits) =
        run_batch_with(&mut engine, &prompts, &which, 1, Some(4), &tessera_worker::SamplingParams::greedy());
    for (k, (name, w)) in want.iter().enumerate() {
        let norm: f32 = w.iter().map(|v| v * v).sum::<f32>().sqrt();
        let diff: f32 = logits[k].iter().zip(w).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        println!("{name}: logits rel err {:.2e}", diff / norm);
        assert!(diff / norm < 3e-2, "{name}: last-prompt logits rel err {}", diff / norm);
    }
}

/// llama.cpp's quantized files (`testdata/gguf-quant/`, and stories260K's Q8_0) on `cuda:0`: their
/// matrices stay blocks on the device, decoded where they are read, and the device follows the CPU on the
/// same file (itself checked against llama.cpp in `gguf_quantized.rs`). The CPU rounds activations to int8
/// for its dot products and the GPU to bf16, so logits are compared by relative error and greedy text as
/// the CPU is compared with llama.cpp (another int8 engine): the first four tokens of every prompt, all 16
/// of most, on the trained stories260K. The tolerances are first guesses until a device has run them.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn quantized_gguf_files_run_as_blocks_on_cuda_and_follow_the_cpu() {
    let repo = repo();
    let files = [
        repo.join("testdata/gguf-quant/quant-llama-q8_0.gguf"),
        repo.join("testdata/gguf-quant/quant-llama-q4_0.gguf"),
        repo.join("testdata/gguf-quant/quant-llama-q4_k_m.gguf"),
        repo.join("testdata/gguf-models/stories260K-q8_0.gguf"),
    ];
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("testdata/gguf-quant/reference.json")).unwrap())
            .unwrap();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // The prompts llama.cpp's references use for the file.
        let prompts: Vec<Vec<u32>> = reference["files"][&name]["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
            .collect();
        let mut gpu = engine_on(&path, prompts.len(), Device::Cuda(0));
        assert!(
            matches!(gpu.model.embedding_dtype(), tessera_kernels::DType::Quant(_)),
            "{name}: the embedding table was decoded at load instead of kept as blocks"
        );
        let mut cpu = engine(&path, prompts.len());
        let (g_ids, g_logits) = greedy_batch(&mut gpu, &prompts, 16, None);
        let (c_ids, c_logits) = greedy_batch(&mut cpu, &prompts, 16, None);
        let mut whole = 0;
        for (i, (g, c)) in g_logits.iter().zip(&c_logits).enumerate() {
            let norm: f32 = c.iter().map(|v| v * v).sum::<f32>().sqrt();
            let diff: f32 = g.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            let agree = g_ids[i].iter().zip(&c_ids[i]).take_while(|(a, b)| a == b).count();
            println!("{name} prompt {i}: logits rel err {:.2e}, greedy ids agree for {agree}/16", diff / norm);
            assert!(diff / norm < 1e-1, "{name}: last-prompt logits rel err {}", diff / norm);
            if name.starts_with("stories260K") {
                assert_eq!(g_ids[i][..4], c_ids[i][..4], "{name}: the first greedy tokens differ from the CPU's");
            }
            whole += (agree == 16) as usize;
        }
        if name.starts_with("stories260K") {
            assert!(
                whole * 4 >= prompts.len() * 3,
                "{name}: only {whole}/{} prompts agree on 16 tokens",
                prompts.len()
            );
        }
    }
}

/// `--quantize` on a GPU: a model directory's matrices, quantized as they load, go to the device as blocks
/// (stories260K's 64-value rows take Q8_0 and, for `q4_k`, llama.cpp's fallback Q5_0), and the logits and
/// first greedy tokens follow the same quantized model on the CPU.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn quantize_on_load_runs_as_blocks_on_cuda_and_follows_the_cpu() {
    use tessera_worker::{Engine, Model, Shard, collective::Single, kv_cache::KvCache, quantize::QuantizeTo};
    let dir = repo().join("models/stories260K");
    let prompts: Vec<Vec<u32>> = golden(&dir).iter().map(|c| c.prompt_ids.clone()).collect();
    for q in [QuantizeTo::Q8_0, QuantizeTo::Q4_K] {
        let load = |device| {
            let model = Model::load_with(&dir, Shard::WHOLE, device, Some(q)).unwrap();
            let cache = KvCache::new(&model.kv_geometry(), prompts.len() * BLOCKS_PER_SEQ, BLOCK).unwrap();
            Engine::new(model, cache, Box::new(Single))
        };
        let (mut gpu, mut cpu) = (load(Device::Cuda(0)), load(Device::Cpu));
        assert!(
            matches!(gpu.model.embedding_dtype(), tessera_kernels::DType::Quant(_)),
            "{q}: the embedding table is not blocks on the device"
        );
        let (g_ids, g_logits) = greedy_batch(&mut gpu, &prompts, 16, None);
        let (c_ids, c_logits) = greedy_batch(&mut cpu, &prompts, 16, None);
        for (i, (g, c)) in g_logits.iter().zip(&c_logits).enumerate() {
            let norm: f32 = c.iter().map(|v| v * v).sum::<f32>().sqrt();
            let diff: f32 = g.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            println!("--quantize {q} prompt {i}: logits rel err {:.2e}", diff / norm);
            assert!(diff / norm < 1e-1, "--quantize {q} prompt {i}: logits rel err {}", diff / norm);
            assert_eq!(g_ids[i][..4], c_ids[i][..4], "--quantize {q} prompt {i}: first greedy tokens");
        }
    }
}
