//! `tessera bench` (no subcommand): decode and prefill throughput of the in-process engine, measured against the
//! machine's memory-read bandwidth (decode at small batch is bound by reading every weight once per
//! step, so `weight bytes per token × tokens/s ÷ bandwidth` is the fraction of the roofline reached).
//!
//! Figures are printed as a table (or JSON); `BENCHMARKS.md` records them with the machine.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use rayon::prelude::*;
use serde::Serialize;
use tessera_worker::{Engine, Model, SamplingParams, Shard, StepSeq, collective::Single, kv_cache::KvCache};

use crate::{host::Host, synth};

/// The options of `tessera bench` without a subcommand.
#[derive(Args, Debug)]
pub struct CpuBenchArgs {
    /// Models to measure: `default` (stories260K), `synthetic` (the 124.7M-parameter benchmark shape,
    /// random f32 weights), a model directory or a GGUF file. Comma-separated.
    #[arg(long, default_value = "default,synthetic", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Decode batch sizes.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Tokens of context each decoding sequence has before the timed steps.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Quantize the model directories' matrices as they load: q8_0, q4_0 or q4_k (as `serve --quantize`).
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<tessera_worker::quantize::QuantizeTo>,
    /// Keep the synthetic model in this directory (for side-by-side runs of other engines on the same
    /// weights) instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    pub save_synthetic: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
pub struct ModelReport {
    pub model: String,
    pub parameters: usize,
    pub weight_bytes_per_token: usize,
    pub decode: Vec<DecodeReport>,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
}

#[derive(Serialize, Debug)]
pub struct DecodeReport {
    pub batch: usize,
    pub tokens_per_s: f64,
    pub ms_per_step: f64,
    /// Weight bytes per step × steps/s ÷ bandwidth.
    pub roofline_fraction: f64,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub threads: usize,
    pub read_bandwidth_gb_s: f64,
    pub models: Vec<ModelReport>,
}

/// Memory-read bandwidth with the current rayon pool: sum a buffer much larger than any cache.
pub fn read_bandwidth() -> f64 {
    const BYTES: usize = 1 << 30;
    let buf: Vec<f32> = (0..BYTES / 4).into_par_iter().map(|i| (i % 7) as f32).collect();
    let chunk = BYTES / 4 / (rayon::current_num_threads() * 8);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(chunk).map(lane_sum).sum();
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.min(dt);
    }
    BYTES as f64 / best / 1e9
}

/// Sum with independent lanes (vectorisable), so the loop is limited by memory, not by the FP add chain.
fn lane_sum(c: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let it = c.chunks_exact(16);
    let tail: f32 = it.remainder().iter().sum();
    for x in it {
        for l in 0..16 {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % (vocab as u64 - 3) + 3) as u32
        })
        .collect()
}

fn bench_model(name: &str, dir: &std::path::Path, a: &CpuBenchArgs, bandwidth: f64) -> Result<ModelReport> {
    let quantize = a.quantize.filter(|_| dir.is_dir());
    let model = Model::load_with(dir, Shard::WHOLE, tessera_kernels::Device::Cpu, quantize)
        .with_context(|| format!("loading {}", dir.display()))?;
    let name = match quantize {
        Some(q) => format!("{name} {q}"),
        None => name.to_string(),
    };
    let c = model.config.clone();
    let plan = Plan::new(&c, &a.batch, a.context, a.steps, a.prefill)?;
    let cache = KvCache::new(&model.kv_geometry(), plan.blocks(), plan.block_size)?;
    let bytes = model.weight_bytes_per_token();
    let mut engine = Engine::new(model, cache, Box::new(Single));
    let (steps, prefill_tokens_per_s) = plan.run(&mut engine)?;
    let decode = steps
        .into_iter()
        .map(|(batch, seconds_per_step)| DecodeReport {
            batch,
            tokens_per_s: batch as f64 / seconds_per_step,
            ms_per_step: seconds_per_step * 1e3,
            roofline_fraction: bytes as f64 / seconds_per_step / (bandwidth * 1e9),
        })
        .collect();
    Ok(ModelReport {
        model: name,
        parameters: c.num_parameters(),
        weight_bytes_per_token: bytes,
        decode,
        prefill_tokens: plan.prefill,
        prefill_tokens_per_s,
    })
}

/// What one benchmark run measures: greedy decode steps at each batch size after `context` tokens of
/// prefill per sequence, and one prefill of `prefill` tokens. Shared by the CPU and GPU benchmarks.
pub(crate) struct Plan {
    pub batches: Vec<usize>,
    pub context: usize,
    pub steps: usize,
    pub prefill: usize,
    pub block_size: usize,
    per_seq: usize,
    vocab: usize,
}

impl Plan {
    pub fn new(
        c: &tessera_worker::ModelConfig,
        batches: &[usize],
        context: usize,
        steps: usize,
        prefill: usize,
    ) -> Result<Plan> {
        if batches.contains(&0) {
            bail!("--batch sizes must be at least 1");
        }
        let context = context.min(c.max_position_embeddings.saturating_sub(steps + 1)).max(1);
        let prefill = prefill.clamp(1, c.max_position_embeddings);
        let block_size = tessera_worker::kv_cache::DEFAULT_BLOCK_SIZE;
        let per_seq = (context + steps + 1).max(prefill).div_ceil(block_size);
        Ok(Plan { batches: batches.to_vec(), context, steps, prefill, block_size, per_seq, vocab: c.vocab_size })
    }

    /// KV blocks one sequence of the run may use.
    pub fn blocks_per_seq(&self) -> usize {
        self.per_seq
    }

    /// KV blocks the run needs.
    pub fn blocks(&self) -> usize {
        self.per_seq * self.batches.iter().copied().max().unwrap_or(1)
    }

    /// Seconds per decode step for each batch size, and prefill tokens per second (best of three).
    /// Every step ends with its sampled ids on the host, so wall-clock time covers the device's work.
    pub fn run(&self, engine: &mut Engine) -> Result<(Vec<(usize, f64)>, f64)> {
        let greedy = SamplingParams::greedy();
        let max_batch = self.batches.iter().copied().max().unwrap_or(1);
        let tables: Vec<Vec<u32>> =
            (0..max_batch).map(|i| ((i * self.per_seq) as u32..((i + 1) * self.per_seq) as u32).collect()).collect();
        let mut decode = Vec::new();
        for &b in &self.batches {
            let mut seqs: Vec<Vec<u32>> = (0..b).map(|i| random_ids(self.context, self.vocab, i as u64)).collect();
            // Untimed prefill of every sequence's context, then two warm-up steps. The token each prefill
            // samples is appended, so a decode step feeds the newest token at the next free position.
            for (i, s) in seqs.iter_mut().enumerate() {
                let out = engine.step(&[greedy_step(i as u64, s, 0, &tables[i], &greedy)])?;
                s.push(out[0].sampled.token);
            }
            let step = |seqs: &mut Vec<Vec<u32>>, engine: &mut Engine| -> Result<()> {
                let batch: Vec<StepSeq> = seqs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| greedy_step(i as u64, &s[s.len() - 1..], s.len() - 1, &tables[i], &greedy))
                    .collect();
                let out = engine.step(&batch)?;
                for o in out {
                    seqs[o.id as usize].push(o.sampled.token);
                }
                Ok(())
            };
            step(&mut seqs, engine)?;
            step(&mut seqs, engine)?;
            let timed = self.steps.saturating_sub(2).max(1);
            let t = Instant::now();
            for _ in 0..timed {
                step(&mut seqs, engine)?;
            }
            let dt = t.elapsed().as_secs_f64();
            for i in 0..b {
                engine.release(i as u64);
            }
            decode.push((b, dt / timed as f64));
        }

        let prompt = random_ids(self.prefill, self.vocab, 99);
        let mut best = f64::MAX;
        for rep in 0..3 {
            let id = 1_000 + rep;
            let t = Instant::now();
            engine.step(&[greedy_step(id, &prompt, 0, &tables[0], &greedy)])?;
            best = best.min(t.elapsed().as_secs_f64());
            engine.release(id);
        }
        Ok((decode, self.prefill as f64 / best))
    }
}

/// One sequence's greedy step of `tokens` from `start_pos`, with nothing else asked of it.
pub fn greedy_step<'a>(
    id: u64,
    tokens: &'a [u32],
    start_pos: usize,
    block_table: &'a [u32],
    greedy: &'a SamplingParams,
) -> StepSeq<'a> {
    StepSeq {
        id,
        tokens,
        start_pos,
        block_table,
        sample: Some(greedy),
        penalty_context: &[],
        output_context: &[],
        starts: false,
        score_prompt: None,
        allowed: None,
        adapter: 0,
    }
}

/// `tessera bench` with no subcommand: every model of `--models` on this machine's CPU.
pub fn run(a: CpuBenchArgs, host: &dyn Host) -> Result<()> {
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting the thread count")?;
    }
    let threads = rayon::current_num_threads();
    let bandwidth = read_bandwidth();
    let mut reports = Vec::new();
    for m in &a.models {
        let report = match m.as_str() {
            "default" => {
                let (name, dir) = host.default_model()?;
                bench_model(&name, &dir, &a, bandwidth)?
            }
            "synthetic" => {
                let tmp;
                let dir = match &a.save_synthetic {
                    Some(d) => d.clone(),
                    None => {
                        tmp = tempfile::tempdir()?;
                        tmp.path().to_path_buf()
                    }
                };
                if !dir.join("model.safetensors").exists() {
                    eprintln!("writing the synthetic benchmark model to {} ...", dir.display());
                    synth::write_model(&dir, synth::BENCH_SHAPE, 42)?;
                }
                bench_model("synthetic-124.7M-f32", &dir, &a, bandwidth)?
            }
            path => bench_model(path, std::path::Path::new(path), &a, bandwidth)?,
        };
        reports.push(report);
    }
    let report = Report { threads, read_bandwidth_gb_s: bandwidth, models: reports };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("threads: {threads}   memory read bandwidth: {bandwidth:.2} GB/s");
    println!(
        "{:<24} {:>10} {:>6} {:>12} {:>10} {:>10}",
        "model", "MB/token", "batch", "tokens/s", "ms/step", "roofline"
    );
    for m in &report.models {
        for d in &m.decode {
            println!(
                "{:<24} {:>10.1} {:>6} {:>12.1} {:>10.2} {:>9.1}%",
                m.model,
                m.weight_bytes_per_token as f64 / 1e6,
                d.batch,
                d.tokens_per_s,
                d.ms_per_step,
                d.roofline_fraction * 100.0
            );
        }
        println!("{:<24} prefill of {} tokens: {:.1} tokens/s", m.model, m.prefill_tokens, m.prefill_tokens_per_s);
    }
    Ok(())
}
