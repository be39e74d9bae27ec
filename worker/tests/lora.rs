//! LoRA adapters against `peft` + `transformers` (testdata/lora/golden.json, made by
//! scripts/make_lora_fixtures.py): greedy ids exactly and logits to 1e-4, for each adapter alone, in a
//! batch that mixes every adapter with the base model, under chunked prefill, at tp = 2, and after an
//! unload and a reload. Bad adapters are refused at load with the file and field or tensor named.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use tessera_worker::{
    Engine, Model, SamplingParams, Shard, kv_cache::KvCache, lora::AdapterLimits, tcp_collective::loopback_ring,
};

const LIMITS: AdapterLimits = AdapterLimits { max_rank: 64 };

fn lora_dir() -> PathBuf {
    repo().join("testdata/lora")
}

/// An adapter's golden cases: (prompt ids, greedy ids, last prompt logits).
struct Adapter {
    name: String,
    dir: PathBuf,
    cases: Vec<GoldenCase>,
}

fn adapters(model: &str) -> Vec<Adapter> {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(lora_dir().join("golden.json")).unwrap()).unwrap();
    let models = g["models"][model].as_object().unwrap();
    assert!(!models.is_empty());
    models
        .iter()
        .map(|(name, cases)| Adapter {
            name: name.clone(),
            dir: lora_dir().join(model).join(name),
            cases: golden_cases(cases),
        })
        .collect()
}

fn model_dir(model: &str) -> PathBuf {
    repo().join("testdata/models").join(model)
}

fn check(what: &str, ids: &[u32], logits: &[f32], want: &GoldenCase) {
    assert_eq!(ids, want.greedy_ids, "{what}: greedy ids");
    let worst = logits.iter().zip(&want.logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4, "{what}: logits differ by up to {worst}");
}

/// Every adapter of `model` loaded on `engine` under ids 1, 2, …
fn load_all(engine: &mut Engine, list: &[Adapter]) {
    for (i, a) in list.iter().enumerate() {
        engine.load_adapter(i as u32 + 1, &a.name, &a.dir, LIMITS).unwrap();
    }
}

#[test]
fn each_adapter_alone_reproduces_peft() {
    for model in ["tiny-llama3", "tiny-qwen2"] {
        let list = adapters(model);
        let mut e = engine(&model_dir(model), 4);
        load_all(&mut e, &list);
        for (i, a) in list.iter().enumerate() {
            for (c, case) in a.cases.iter().enumerate() {
                let n = case.greedy_ids.len();
                let (ids, logits) = run_batch_with(
                    &mut e,
                    std::slice::from_ref(&case.prompt_ids),
                    &[i as u32 + 1],
                    n,
                    None,
                    &SamplingParams::greedy(),
                );
                check(&format!("{model}/{} case {c}", a.name), &ids[0], &logits[0], case);
            }
        }
    }
}

/// Every adapter's cases and the base model's in one continuously batched run, prompts chunked.
fn mixed(stepper: &mut dyn Stepper, model: &str, chunk: Option<usize>) {
    let list = adapters(model);
    let base = golden(&model_dir(model));
    let mut prompts = Vec::new();
    let mut ids = Vec::new();
    let mut want = Vec::new();
    for (i, a) in list.iter().enumerate() {
        for case in &a.cases {
            prompts.push(case.prompt_ids.clone());
            ids.push(i as u32 + 1);
            want.push((a.name.as_str(), case));
        }
    }
    for case in base.iter().take(2) {
        prompts.push(case.prompt_ids.clone());
        ids.push(0);
        want.push(("base", case));
    }
    // The base golden files generate more tokens than the adapters' (same prefix either way).
    let n = want.iter().map(|(_, c)| c.greedy_ids.len()).min().unwrap();
    let (got, logits) = run_batch_with(stepper, &prompts, &ids, n, chunk, &SamplingParams::greedy());
    for (k, (name, case)) in want.iter().enumerate() {
        let trimmed =
            GoldenCase { prompt_ids: vec![], greedy_ids: case.greedy_ids[..n].to_vec(), logits: case.logits.clone() };
        check(&format!("{model}/{name} in a mixed batch (chunk {chunk:?})"), &got[k], &logits[k], &trimmed);
    }
}

#[test]
fn a_batch_mixing_three_adapters_and_the_base_reproduces_each() {
    let model = "tiny-llama3";
    let list = adapters(model);
    assert!(list.len() >= 3, "the fixtures have three adapters of {model}");
    let mut e = engine(&model_dir(model), 16);
    load_all(&mut e, &list);
    mixed(&mut e, model, None);
    mixed(&mut e, model, Some(3));
}

#[test]
fn a_tensor_parallel_pair_reproduces_peft_in_a_mixed_batch() {
    for model in ["tiny-llama3", "tiny-qwen2"] {
        let list = adapters(model);
        let ring = loopback_ring(2, std::time::Duration::from_secs(20)).unwrap();
        let mut group: Vec<Engine> = ring
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let model = Model::load(&model_dir(model), Shard { rank, world: 2 }).unwrap();
                let cache = KvCache::new(&model.kv_geometry(), 16 * BLOCKS_PER_SEQ, BLOCK).unwrap();
                let mut e = Engine::new(model, cache, Box::new(comm));
                load_all(&mut e, &list);
                e
            })
            .collect();
        mixed(&mut group, model, Some(4));
    }
}

#[test]
fn an_unloaded_adapter_is_refused_and_a_reload_serves_it_again() {
    let model = "tiny-llama3";
    let list = adapters(model);
    let mut e = engine(&model_dir(model), 4);
    load_all(&mut e, &list);
    assert!(e.unload_adapter(2).unwrap());
    assert!(!e.unload_adapter(2).unwrap(), "already gone");
    let case = &list[1].cases[0];
    let table = table(0);
    let greedy = SamplingParams::greedy();
    let step = prompt_step(5, &case.prompt_ids, &table, &greedy, 2);
    let err = e.step(&[step]).unwrap_err().to_string();
    assert!(err.contains("LoRA adapter 2 is not loaded"), "{err}");
    // Under a new id, as the coordinator reloads it; the others were not disturbed.
    e.load_adapter(7, &list[1].name, &list[1].dir, LIMITS).unwrap();
    assert!(e.load_adapter(7, "again", &list[1].dir, LIMITS).is_err(), "an id is never taken twice");
    let n = case.greedy_ids.len();
    let (ids, logits) = run_batch_with(&mut e, std::slice::from_ref(&case.prompt_ids), &[7], n, None, &greedy);
    check("reloaded", &ids[0], &logits[0], case);
    let other = &list[0].cases[0];
    let (ids, logits) = run_batch_with(&mut e, std::slice::from_ref(&other.prompt_ids), &[1], n, None, &greedy);
    check("untouched", &ids[0], &logits[0], other);
    assert_eq!(e.adapters().iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 3, 7]);
}

/// A greedy step of a whole prompt that begins sequence `id` under `adapter`.
fn prompt_step<'a>(
    id: u64,
    prompt: &'a [u32],
    table: &'a [u32],
    greedy: &'a SamplingParams,
    adapter: u32,
) -> tessera_worker::StepSeq<'a> {
    tessera_worker::StepSeq {
        id,
        tokens: prompt,
        start_pos: 0,
        block_table: table,
        sample: Some(greedy),
        penalty_context: &[],
        output_context: &[],
        starts: true,
        score_prompt: None,
        allowed: None,
        adapter,
    }
}

/// A copy of a fixture adapter in a temporary directory, changed by `edit(config, tensors)`.
fn broken(
    edit_config: impl FnOnce(&mut serde_json::Map<String, Value>),
    edit_tensors: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> tempfile::TempDir {
    let src = lora_dir().join("tiny-llama3/qv-r8");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit_config(&mut cfg);
    std::fs::write(dir.path().join("adapter_config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let data = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (n, v.shape().to_vec(), data)
        })
        .collect();
    edit_tensors(&mut tensors);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, s, d)| (n, s, d.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(n, s, d)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("adapter_model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &Path, limits: AdapterLimits) -> String {
    let mut e = engine(&model_dir("tiny-llama3"), 1);
    e.load_adapter(1, "bad", dir, limits).unwrap_err().to_string()
}

#[test]
fn bad_adapters_are_refused_with_the_file_and_field_or_tensor_named() {
    let keep = |_: &mut Vec<(String, Vec<usize>, Vec<f32>)>| {};
    let cases: Vec<(tempfile::TempDir, AdapterLimits, &[&str])> = vec![
        (broken(|_| {}, keep), AdapterLimits { max_rank: 4 }, &["adapter_config.json", "`r`", "rank 8 is above", "4"]),
        (
            broken(|c| drop(c.insert("target_modules".into(), serde_json::json!(["q_proj", "lm_head"]))), keep),
            LIMITS,
            &["adapter_config.json", "`target_modules`", "lm_head"],
        ),
        (
            broken(|c| drop(c.insert("use_dora".into(), Value::Bool(true))), keep),
            LIMITS,
            &["`use_dora`", "not supported"],
        ),
        (
            broken(|c| drop(c.insert("r".into(), serde_json::json!(4))), keep),
            LIMITS,
            &["lora_A.weight", "expected shape [4, 128]"],
        ),
        (
            broken(
                |_| {},
                |t| t.iter_mut().filter(|t| t.0.contains("lora_B")).for_each(|t| t.1 = vec![t.1[1], t.1[0]]),
            ),
            LIMITS,
            &["adapter_model.safetensors", "lora_B.weight", "expected shape"],
        ),
        (
            broken(|_| {}, |t| t.retain(|t| !t.0.contains("layers.1.self_attn.v_proj.lora_B"))),
            LIMITS,
            &["layers.1.self_attn.v_proj.lora_B.weight", "missing"],
        ),
        (
            broken(
                |_| {},
                |t| t.push(("base_model.model.lm_head.lora_A.weight".into(), vec![8, 128], vec![0.5; 1024])),
            ),
            LIMITS,
            &["lm_head.lora_A.weight", "not a LoRA pair"],
        ),
    ];
    for (dir, limits, want) in &cases {
        let err = load_error(dir.path(), *limits);
        for w in *want {
            assert!(err.contains(w), "{err:?} should contain {w:?}");
        }
    }
    let missing = tempfile::tempdir().unwrap();
    std::fs::copy(lora_dir().join("tiny-llama3/qv-r8/adapter_config.json"), missing.path().join("adapter_config.json"))
        .unwrap();
    let err = load_error(missing.path(), LIMITS);
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    let err = load_error(Path::new("/no/such/adapter"), LIMITS);
    assert!(err.contains("/no/such/adapter") && err.contains("no such LoRA adapter directory"), "{err}");
}

#[test]
fn an_adapter_in_a_paused_step_is_not_unloaded_until_the_step_finishes() {
    let model = "tiny-llama3";
    let list = adapters(model);
    let mut e = engine(&model_dir(model), 2);
    load_all(&mut e, &list);
    let case = &list[0].cases[0];
    let (table, greedy) = (table(0), SamplingParams::greedy());
    let step = prompt_step(3, &case.prompt_ids, &table, &greedy, 1);
    let paused = e.step_pausable(std::slice::from_ref(&step), &|| true).unwrap();
    assert_eq!(paused, tessera_worker::StepProgress::Paused);
    let err = e.unload_adapter(1).unwrap_err().to_string();
    assert!(err.contains("paused step"), "{err}");
    assert!(e.unload_adapter(2).unwrap(), "an adapter the paused step does not use goes");
    let done = e.resume(std::slice::from_ref(&step), &|| false).unwrap();
    let tessera_worker::StepProgress::Done(sampled) = done else { panic!("still paused") };
    assert_eq!(sampled[0].sampled.token, case.greedy_ids[0], "the paused step finished with its adapter");
    assert!(e.unload_adapter(1).unwrap());
}
