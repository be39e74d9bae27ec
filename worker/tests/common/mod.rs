//! Helpers shared by the worker's integration tests: model paths, golden files, a greedy batch driver.

#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;
use tessera_kernels::Tensor;
use tessera_worker::{
    Engine, Model, SamplingParams, SeqSampled, Shard, StepSeq, collective::Single, kv_cache::KvCache,
};

/// The repository root: `TESSERA_REPO` when set (test binaries carried to another machine), else where
/// this crate was built.
pub fn repo() -> PathBuf {
    std::env::var_os("TESSERA_REPO").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."), PathBuf::from)
}

/// Every model with a golden file: the default model and the test models.
pub fn golden_models() -> Vec<PathBuf> {
    let mut v = vec![repo().join("models/stories260K")];
    for m in ["tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-llama-bf16-sharded"] {
        v.push(repo().join("testdata/models").join(m));
    }
    v
}

pub struct GoldenCase {
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub logits: Vec<f32>,
}

pub fn golden(dir: &std::path::Path) -> Vec<GoldenCase> {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    golden_cases(&g["cases"])
}

/// A golden file's list of cases (`prompt_ids`, `greedy_ids`, `last_prompt_logits` each).
pub fn golden_cases(cases: &Value) -> Vec<GoldenCase> {
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    cases
        .as_array()
        .unwrap()
        .iter()
        .map(|c| GoldenCase {
            prompt_ids: ids(&c["prompt_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            logits: c["last_prompt_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect(),
        })
        .collect()
}

pub const BLOCK: usize = 16;
/// Blocks reserved per sequence in these tests (each sequence gets its own disjoint range).
pub const BLOCKS_PER_SEQ: usize = 8;

pub fn engine(dir: &std::path::Path, max_seqs: usize) -> Engine {
    engine_on(dir, max_seqs, tessera_kernels::Device::Cpu)
}

pub fn engine_on(dir: &std::path::Path, max_seqs: usize, device: tessera_kernels::Device) -> Engine {
    let model = Model::load_on(dir, Shard::WHOLE, device).unwrap();
    let cache = KvCache::new(&model.kv_geometry(), max_seqs * BLOCKS_PER_SEQ, BLOCK).unwrap();
    Engine::new(model, cache, Box::new(Single))
}

/// A table of blocks for sequence slot `i`, deliberately in reverse order so that block order matters.
pub fn table(i: usize) -> Vec<u32> {
    (0..BLOCKS_PER_SEQ).rev().map(|b| (i * BLOCKS_PER_SEQ + b) as u32).collect()
}

/// Greedy-generates `n_new` tokens for every prompt as one continuously batched run: prompts are fed in
/// chunks of `chunk` tokens (all at once when `None`), then one token per step. Returns the new ids and
/// the logits at each prompt's last position.
pub fn greedy_batch(
    engine: &mut Engine,
    prompts: &[Vec<u32>],
    n_new: usize,
    chunk: Option<usize>,
) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    run_batch(engine, prompts, n_new, chunk, &SamplingParams::greedy())
}

/// [`greedy_batch`] with any sampling parameters.
pub fn run_batch(
    engine: &mut Engine,
    prompts: &[Vec<u32>],
    n_new: usize,
    chunk: Option<usize>,
    greedy: &SamplingParams,
) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    run_batch_with(engine, prompts, &vec![0; prompts.len()], n_new, chunk, greedy)
}

/// What runs a test's steps: one engine, or a tensor-parallel group of engines in this process.
pub trait Stepper {
    /// Rank 0's sampled tokens and logits.
    fn step(&mut self, batch: &[StepSeq<'_>]) -> (Vec<SeqSampled>, Option<Tensor>);
    fn release(&mut self, id: u64);
}

impl Stepper for Engine {
    fn step(&mut self, batch: &[StepSeq<'_>]) -> (Vec<SeqSampled>, Option<Tensor>) {
        self.step_with_logits(batch).unwrap()
    }
    fn release(&mut self, id: u64) {
        Engine::release(self, id)
    }
}

/// A group's ranks step together (each on its own thread: their collectives meet); rank 0 answers. Each
/// rank computes in a pool of its own, as a worker process does: ranks blocked in a collective inside one
/// shared pool could wait on each other's stolen work.
impl Stepper for Vec<Engine> {
    fn step(&mut self, batch: &[StepSeq<'_>]) -> (Vec<SeqSampled>, Option<Tensor>) {
        std::thread::scope(|sc| {
            let handles: Vec<_> = self
                .iter_mut()
                .map(|e| {
                    sc.spawn(|| {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
                        pool.install(|| e.step_with_logits(batch).unwrap())
                    })
                })
                .collect();
            let mut out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            out.swap_remove(0)
        })
    }
    fn release(&mut self, id: u64) {
        self.iter_mut().for_each(|e| e.release(id))
    }
}

/// [`run_batch`] with a LoRA adapter id per prompt (0: the base model).
pub fn run_batch_with(
    engine: &mut dyn Stepper,
    prompts: &[Vec<u32>],
    adapters: &[u32],
    n_new: usize,
    chunk: Option<usize>,
    greedy: &SamplingParams,
) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let tables: Vec<Vec<u32>> = (0..prompts.len()).map(table).collect();
    let mut fed = vec![0usize; prompts.len()];
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut first_logits: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
    let mut seqs_tokens: Vec<Vec<u32>> = prompts.to_vec();
    let base = 1000;
    loop {
        let mut batch = Vec::new();
        let mut owners = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            if out[i].len() >= n_new {
                continue;
            }
            let (start, end) = if fed[i] < p.len() {
                let end = chunk.map_or(p.len(), |c| (fed[i] + c).min(p.len()));
                (fed[i], end)
            } else {
                (seqs_tokens[i].len() - 1, seqs_tokens[i].len())
            };
            owners.push((i, start, end));
        }
        if owners.is_empty() {
            break;
        }
        for &(i, start, end) in &owners {
            let samples = end >= prompts[i].len();
            batch.push(StepSeq {
                id: base + i as u64,
                tokens: &seqs_tokens[i][start..end],
                start_pos: start,
                block_table: &tables[i],
                sample: samples.then_some(greedy),
                penalty_context: if start == 0 { &prompts[i] } else { &[] },
                output_context: &[],
                starts: false,
                score_prompt: None,
                allowed: None,
                adapter: adapters[i],
            });
        }
        let (sampled, logits) = engine.step(&batch);
        if let Some(l) = logits {
            let vocab = l.shape()[1];
            for (row, s) in sampled.iter().enumerate() {
                let i = (s.id - base) as usize;
                if out[i].is_empty() {
                    first_logits[i] = l.host_f32().unwrap()[row * vocab..(row + 1) * vocab].to_vec();
                }
            }
        }
        for &(i, _, end) in &owners {
            fed[i] = fed[i].max(end);
        }
        for s in sampled {
            let i = (s.id - base) as usize;
            out[i].push(s.sampled.token);
            seqs_tokens[i].push(s.sampled.token);
        }
    }
    for i in 0..prompts.len() {
        engine.release(base + i as u64);
    }
    (out, first_logits)
}
