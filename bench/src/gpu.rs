//! `tessera bench gpu`: a random model of a large shape (Llama 3 8B by default) built directly on the
//! device (nothing to download, nothing on disk), timed for decode at several batch sizes and for one
//! long prefill, against two ceilings measured in the same run: device-to-device copy bandwidth (bytes
//! read plus written) and the dense bf16 GEMM rate of cuBLAS.
//!
//! Batch-1 decode reads every weight once per token, so `weight bytes × tokens/s ÷ copy bandwidth` is its
//! fraction of the bandwidth roofline; prefill is compared by its useful FLOPs per second with the GEMM
//! rate. With `--device cpu --shape small` the same code runs on the CPU (a dry run of the GPU script).

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tessera_kernels::{DType, Device, Tensor, ops};
use tessera_worker::{Engine, Model, ModelConfig, Shard, collective::Single, kv_cache::KvCache};

use crate::{cpu::Plan, synth};

#[derive(Args, Debug)]
pub struct GpuBenchArgs {
    /// Device to measure.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Model shape: `llama3-8b`, or `small` (124.7M parameters, for dry runs on the CPU).
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    /// Decode batch sizes.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Tokens of context per decoding sequence.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Decode steps per batch size (two of them untimed warm-up).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 2048)]
    pub prefill: usize,
    /// Keep the matrices in a block format, as a GGUF file of this quantization holds them: q8_0, q4_0 or
    /// q4_k (`Q4_K_M`-like: the output projection in Q6_K). Random blocks, not a quantized model.
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<tessera_worker::quantize::QuantizeTo>,
    /// Write the report as JSON to this file as well.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Serialize, Debug)]
pub struct GpuDecode {
    pub batch: usize,
    pub tokens_per_s: f64,
    pub ms_per_step: f64,
    /// Weight (and KV) bytes read per step over the copy bandwidth, as a fraction of the step time.
    pub roofline_fraction: f64,
}

#[derive(Serialize, Debug)]
pub struct GpuReport {
    pub device: String,
    pub shape: String,
    pub parameters: usize,
    pub weight_bytes_per_token: usize,
    /// Device-to-device copy, bytes read plus written per second, in GB/s.
    pub copy_gb_per_s: f64,
    /// bf16 GEMM (n × n × n) through the same path as the model's projections, in TFLOP/s.
    pub gemm_tflop_per_s: f64,
    pub gemm_n: usize,
    pub context: usize,
    pub decode: Vec<GpuDecode>,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    /// Useful prefill FLOPs per second (projections and attention) in TFLOP/s.
    pub prefill_tflop_per_s: f64,
    pub prefill_fraction_of_gemm: f64,
    /// One batch-1 forward pass: milliseconds until the host has queued every kernel, and until the device
    /// has run them. When the two are close, the step is bound by launching, not by the GPU.
    pub decode_host_ms: f64,
    pub decode_device_ms: f64,
    /// A single-token projection (1 × 4096 × 14336, bf16) alone: weight bytes over its time, in GB/s.
    pub gemv_gb_per_s: f64,
    /// Device milliseconds per op kind in one batch-1 forward pass (measured with a synchronisation after
    /// every op, so the sum exceeds `decode_device_ms` by the launch gaps).
    pub decode_ops_ms: Vec<(String, f64)>,
}

fn shape(name: &str) -> Result<synth::Shape> {
    match name {
        "llama3-8b" => Ok(synth::LLAMA3_8B),
        "small" => Ok(synth::BENCH_SHAPE),
        other => bail!("unknown --shape {other:?}: expected llama3-8b or small"),
    }
}

/// Bytes per second of a device-to-device copy of a `bytes`-sized buffer (read + written).
fn copy_bandwidth(device: Device, bytes: usize) -> Result<f64> {
    let n = bytes / 2;
    let src = Tensor::uniform(&[n, 1], DType::BF16, device, 1, 1.0)?;
    for _ in 0..2 {
        drop(src.narrow_rows(0, n)?);
    }
    tessera_kernels::synchronize(device)?;
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        drop(src.narrow_rows(0, n)?);
    }
    tessera_kernels::synchronize(device)?;
    Ok((2 * n * 2 * reps) as f64 / t.elapsed().as_secs_f64())
}

/// Bytes per second of reading an `[n, k]` bf16 weight in a one-row projection.
fn gemv_bandwidth(device: Device, k: usize, n: usize) -> Result<f64> {
    let dtype = if device == Device::Cpu { DType::F32 } else { DType::BF16 };
    let x = Tensor::uniform(&[1, k], dtype, device, 4, 1.0)?;
    let w = Tensor::uniform(&[n, k], dtype, device, 5, 1.0)?;
    // Back-to-back launches, as in a forward pass: one projection takes tens of microseconds, so a
    // synchronisation around each would be timed too.
    for _ in 0..3 {
        drop(ops::linear(&x, &w, None)?);
    }
    tessera_kernels::synchronize(device)?;
    let reps = 50;
    let t = Instant::now();
    for _ in 0..reps {
        drop(ops::linear(&x, &w, None)?);
    }
    tessera_kernels::synchronize(device)?;
    Ok((w.size_in_bytes() * reps) as f64 / t.elapsed().as_secs_f64())
}

/// Median (host-submit, device-done) seconds of a batch-1 decode forward pass after `context` tokens.
fn host_and_device_time(engine: &mut Engine, plan: &Plan, device: Device, vocab: usize) -> Result<(f64, f64)> {
    let table: Vec<u32> = (0..plan.blocks_per_seq() as u32).collect();
    let prompt: Vec<u32> = (0..plan.context as u32).map(|i| (i * 7919) % vocab as u32).collect();
    let greedy = tessera_worker::SamplingParams::greedy();
    let seq = |tokens, start_pos| tessera_worker::StepSeq {
        id: 77_777,
        tokens,
        start_pos,
        block_table: &table,
        sample: Some(&greedy),
        penalty_context: &[],
        output_context: &[],
        starts: false,
        score_prompt: None,
        allowed: None,
        adapter: 0,
    };
    engine.step(&[seq(&prompt, 0)])?;
    let next = [1u32];
    let (mut host, mut total) = (Vec::new(), Vec::new());
    for _ in 0..12 {
        tessera_kernels::synchronize(device)?;
        let t = Instant::now();
        let logits = engine.forward(&[seq(&next, plan.context)])?;
        host.push(t.elapsed().as_secs_f64());
        tessera_kernels::synchronize(device)?;
        total.push(t.elapsed().as_secs_f64());
        drop(logits);
    }
    engine.model.profile_ops(true);
    engine.forward(&[seq(&next, plan.context)])?;
    engine.model.profile_ops(false);
    engine.release(77_777);
    host.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    Ok((host[host.len() / 2], total[total.len() / 2]))
}

/// FLOP/s of an `n × n × n` GEMM through `ops::linear` (bf16 on CUDA, f32 on the CPU), median of 10.
fn gemm_rate(device: Device, n: usize) -> Result<f64> {
    let dtype = if device == Device::Cpu { DType::F32 } else { DType::BF16 };
    let x = Tensor::uniform(&[n, n], dtype, device, 2, 1.0)?;
    let w = Tensor::uniform(&[n, n], dtype, device, 3, 1.0)?;
    for _ in 0..2 {
        drop(ops::linear(&x, &w, None)?);
    }
    let mut times = Vec::new();
    for _ in 0..10 {
        tessera_kernels::synchronize(device)?;
        let t = Instant::now();
        drop(ops::linear(&x, &w, None)?);
        tessera_kernels::synchronize(device)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (n as f64).powi(3) / times[times.len() / 2])
}

pub fn run(a: GpuBenchArgs) -> Result<()> {
    let device: Device = a.device.parse()?;
    tessera_kernels::ensure_available(device)?;
    let s = shape(&a.shape)?;
    let on_cpu = device == Device::Cpu;
    let copy = copy_bandwidth(device, if on_cpu { 256 << 20 } else { 4 << 30 })?;
    let gemm_n = if on_cpu { 1024 } else { 8192 };
    let gemm = gemm_rate(device, gemm_n)?;
    let gemv = gemv_bandwidth(device, 4096, if on_cpu { 2048 } else { 14336 })?;
    eprintln!("{device}: copy {:.0} GB/s, GEMM {:.1} TFLOP/s", copy / 1e9, gemm / 1e12);

    let config = ModelConfig::parse(&synth::config_json(s).to_string(), std::path::Path::new("<bench shape>"))?;
    let t = Instant::now();
    let model =
        Model::random_in(config.clone(), Shard::WHOLE, device, 42, a.quantize).context("building the random model")?;
    tessera_kernels::synchronize(device)?;
    eprintln!(
        "built a {:.2}B-parameter model in {:.1} s",
        config.num_parameters() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let plan = Plan::new(&config, &a.batch, a.context, a.steps, a.prefill)?;
    let cache = KvCache::new(&model.kv_geometry(), plan.blocks(), plan.block_size)?;
    let bytes = model.weight_bytes_per_token();
    let kv_per_token = KvCache::bytes_per_block(&model.kv_geometry(), 1);
    let mut engine = Engine::new(model, cache, Box::new(Single));
    let (steps, prefill_tps) = plan.run(&mut engine)?;
    let (host, device_time) = host_and_device_time(&mut engine, &plan, device, config.vocab_size)?;
    let ops_ms: Vec<(String, f64)> =
        engine.model.take_op_profile().into_iter().map(|(n, s, _)| (n.to_string(), s * 1e3)).collect();
    let decode = steps
        .into_iter()
        .map(|(batch, secs)| {
            let read = bytes + batch * (plan.context + plan.steps / 2) * kv_per_token;
            GpuDecode {
                batch,
                tokens_per_s: batch as f64 / secs,
                ms_per_step: secs * 1e3,
                roofline_fraction: read as f64 / copy / secs,
            }
        })
        .collect();
    let c = &config;
    let embed = c.vocab_size * c.hidden_size;
    let tokens = plan.prefill as f64;
    let attention = 2.0 * c.num_layers as f64 * tokens * tokens * (c.num_heads * c.head_dim) as f64;
    let flops = 2.0 * (c.num_parameters() - embed) as f64 * tokens + attention;
    let prefill_flops = flops * prefill_tps / tokens;
    let report = GpuReport {
        device: tessera_kernels::device_name(device),
        shape: a.quantize.map_or(a.shape.clone(), |q| format!("{} {q}", a.shape)),
        parameters: c.num_parameters(),
        weight_bytes_per_token: bytes,
        copy_gb_per_s: copy / 1e9,
        gemm_tflop_per_s: gemm / 1e12,
        gemm_n,
        context: plan.context,
        decode,
        prefill_tokens: plan.prefill,
        prefill_tokens_per_s: prefill_tps,
        prefill_tflop_per_s: prefill_flops / 1e12,
        prefill_fraction_of_gemm: prefill_flops / gemm,
        decode_host_ms: host * 1e3,
        decode_device_ms: device_time * 1e3,
        gemv_gb_per_s: gemv / 1e9,
        decode_ops_ms: ops_ms,
    };
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    print_report(&report);
    Ok(())
}

/// The report as a table on stdout.
fn print_report(report: &GpuReport) {
    println!("tessera bench gpu: {} ({}), {} context", report.device, report.shape, report.context);
    println!(
        "  copy bandwidth {:.0} GB/s, bf16 GEMM {:.1} TFLOP/s (n = {})",
        report.copy_gb_per_s, report.gemm_tflop_per_s, report.gemm_n
    );
    println!("  {:>6} {:>12} {:>10} {:>10}", "batch", "tokens/s", "ms/step", "roofline");
    for d in &report.decode {
        println!(
            "  {:>6} {:>12.1} {:>10.2} {:>9.1}%",
            d.batch,
            d.tokens_per_s,
            d.ms_per_step,
            d.roofline_fraction * 100.0
        );
    }
    println!(
        "  prefill {} tokens: {:.0} tokens/s, {:.1} TFLOP/s = {:.1}% of the GEMM rate",
        report.prefill_tokens,
        report.prefill_tokens_per_s,
        report.prefill_tflop_per_s,
        report.prefill_fraction_of_gemm * 100.0
    );
    println!(
        "  batch-1 forward: {:.2} ms to queue, {:.2} ms to finish; one-row projection reads {:.0} GB/s",
        report.decode_host_ms, report.decode_device_ms, report.gemv_gb_per_s
    );
    let ops: Vec<String> = report.decode_ops_ms.iter().map(|(n, ms)| format!("{n} {ms:.2}")).collect();
    println!("  batch-1 ms per op (synchronised): {}", ops.join(", "));
}
