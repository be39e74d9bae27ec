//! `tessera bench lora`: what LoRA adapters cost the engine. Decode steps of one batch alternate, step by
//! step, between every sequence on the base model and the sequences spread over N random adapters (rank R
//! on all seven projections), so slow drifts of a shared machine fall on both alike; the report gives the
//! median step of each and their ratio, with how long loading one adapter takes beside a step.

use std::{path::Path, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use safetensors::{Dtype, tensor::TensorView};
use serde::Serialize;
use tessera_worker::{
    Engine, Model, SamplingParams, Shard, StepSeq, collective::Single, kv_cache::KvCache, lora::AdapterLimits,
};

use crate::{cpu::greedy_step, synth};

#[derive(Args, Debug)]
pub struct LoraBenchArgs {
    /// Model directory (default: the 124.7M-parameter synthetic benchmark shape, written to a temporary
    /// directory or kept in `--save-synthetic`).
    #[arg(long, value_name = "DIR")]
    pub model: Option<std::path::PathBuf>,
    /// Keep the synthetic model here.
    #[arg(long, value_name = "DIR")]
    pub save_synthetic: Option<std::path::PathBuf>,
    /// Sequences decoding together.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Adapters the batch is spread over (sequence i uses adapter i mod N).
    #[arg(long, default_value_t = 8)]
    pub adapters: usize,
    /// Rank of every adapter.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Timed steps of each kind.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Tokens of context each sequence has before the timed steps.
    #[arg(long, default_value_t = 64)]
    pub context: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
pub struct LoraReport {
    pub batch: usize,
    pub adapters: usize,
    pub rank: usize,
    pub base_ms_per_step: f64,
    pub lora_ms_per_step: f64,
    /// Base step time over adapter step time: the fraction of the base's throughput kept.
    pub throughput_fraction: f64,
    /// Loading one adapter (files read, sharded, in place), in ms.
    pub load_ms: f64,
}

/// A PEFT adapter of rank `rank` on all seven projections of the model in `model`, random, in `dir`.
fn write_adapter(model: &tessera_worker::ModelConfig, dir: &Path, rank: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let (h, i, hd) = (model.hidden_size, model.intermediate_size, model.head_dim);
    let (q, kv) = (model.num_heads * hd, model.num_kv_heads * hd);
    let shapes = [
        ("self_attn.q_proj", h, q),
        ("self_attn.k_proj", h, kv),
        ("self_attn.v_proj", h, kv),
        ("self_attn.o_proj", q, h),
        ("mlp.gate_proj", h, i),
        ("mlp.up_proj", h, i),
        ("mlp.down_proj", i, h),
    ];
    let mut rng = synth::Rng(seed);
    let mut random =
        |n: usize| -> Vec<u8> { (0..n).flat_map(|_| ((rng.next_f32() * 2.0 - 1.0) * 0.02).to_le_bytes()).collect() };
    let mut tensors = Vec::new();
    for l in 0..model.num_layers {
        for (m, fan_in, fan_out) in shapes {
            let p = format!("base_model.model.model.layers.{l}.{m}");
            tensors.push((format!("{p}.lora_A.weight"), vec![rank, fan_in], random(rank * fan_in)));
            tensors.push((format!("{p}.lora_B.weight"), vec![fan_out, rank], random(fan_out * rank)));
        }
    }
    let views = tensors
        .iter()
        .map(|(n, s, d)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), d)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))?;
    let modules: Vec<&str> = shapes.iter().map(|(m, ..)| m.rsplit('.').next().unwrap_or(m)).collect();
    let config = serde_json::json!({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": modules});
    std::fs::write(dir.join("adapter_config.json"), config.to_string())?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: LoraBenchArgs) -> Result<()> {
    if a.batch == 0 || a.adapters == 0 || a.rank == 0 || a.steps == 0 {
        bail!("--batch, --adapters, --rank and --steps must be at least 1");
    }
    let tmp = tempfile::tempdir()?;
    let dir = match (&a.model, &a.save_synthetic) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => tmp.path().join("model"),
    };
    if a.model.is_none() && !dir.join("model.safetensors").exists() {
        eprintln!("writing the synthetic benchmark model to {} ...", dir.display());
        synth::write_model(&dir, synth::BENCH_SHAPE, 42)?;
    }
    let model = Model::load(&dir, Shard::WHOLE).with_context(|| format!("loading {}", dir.display()))?;
    let config = model.config.clone();
    let block_size = tessera_worker::kv_cache::DEFAULT_BLOCK_SIZE;
    let per_seq = (a.context + 2 * a.steps + 4).div_ceil(block_size);
    let cache = KvCache::new(&model.kv_geometry(), per_seq * a.batch, block_size)?;
    let mut engine = Engine::new(model, cache, Box::new(Single));
    let load_ms = load_adapters(&mut engine, &config, tmp.path(), &a)?;

    let greedy = SamplingParams::greedy();
    let tables: Vec<Vec<u32>> =
        (0..a.batch).map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect()).collect();
    let mut seqs: Vec<Vec<u32>> = (0..a.batch)
        .map(|i| (0..a.context).map(|t| ((i * 7919 + t * 104_729) % config.vocab_size) as u32).collect())
        .collect();
    for (i, s) in seqs.iter_mut().enumerate() {
        let out = engine.step(&[greedy_step(i as u64, s, 0, &tables[i], &greedy)])?;
        s.push(out[0].sampled.token);
    }
    // Sequences keep their KV whichever adapter a step runs them with: only the step's cost matters here.
    let step = |seqs: &mut Vec<Vec<u32>>, engine: &mut Engine, lora: bool| -> Result<f64> {
        let batch: Vec<StepSeq> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| StepSeq {
                adapter: if lora { (i % a.adapters) as u32 + 1 } else { 0 },
                ..greedy_step(i as u64, &s[s.len() - 1..], s.len() - 1, &tables[i], &greedy)
            })
            .collect();
        let t = Instant::now();
        let out = engine.step(&batch)?;
        let dt = t.elapsed().as_secs_f64();
        for o in out {
            seqs[o.id as usize].push(o.sampled.token);
        }
        Ok(dt)
    };
    step(&mut seqs, &mut engine, false)?;
    step(&mut seqs, &mut engine, true)?;
    let (mut base, mut lora) = (Vec::new(), Vec::new());
    for _ in 0..a.steps {
        base.push(step(&mut seqs, &mut engine, false)?);
        lora.push(step(&mut seqs, &mut engine, true)?);
    }
    let (b, l) = (median(base) * 1e3, median(lora) * 1e3);
    let report = LoraReport {
        batch: a.batch,
        adapters: a.adapters,
        rank: a.rank,
        base_ms_per_step: b,
        lora_ms_per_step: l,
        throughput_fraction: b / l,
        load_ms: median(load_ms),
    };
    print_report(&report, a.json)
}

/// Writes `a.adapters` random adapters of rank `a.rank` under `dir` and loads them as ids 1..; returns
/// how long each load took, in ms.
fn load_adapters(
    engine: &mut Engine,
    config: &tessera_worker::ModelConfig,
    dir: &Path,
    a: &LoraBenchArgs,
) -> Result<Vec<f64>> {
    let limits = AdapterLimits { max_rank: a.rank };
    let mut load_ms = Vec::new();
    for n in 0..a.adapters {
        let adir = dir.join(format!("lora{n}"));
        write_adapter(config, &adir, a.rank, 1000 + n as u64)?;
        let t = Instant::now();
        engine.load_adapter(n as u32 + 1, &format!("lora{n}"), &adir, limits)?;
        load_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(load_ms)
}

fn print_report(report: &LoraReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        let (b, l) = (report.base_ms_per_step, report.lora_ms_per_step);
        println!(
            "batch {} over {} adapters of rank {}: base {:.2} ms/step, adapters {:.2} ms/step ({:.1}% of the \
             base's throughput); loading one adapter {:.1} ms",
            report.batch,
            report.adapters,
            report.rank,
            b,
            l,
            100.0 * b / l,
            report.load_ms
        );
    }
    Ok(())
}
