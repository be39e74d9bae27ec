//! `tessera bench cluster`: what the distributed path costs. The same decode steps run on the in-process
//! engine and on local clusters of worker processes (gRPC + TCP collectives), side by side; the difference
//! per step is the overhead. Then the same through the engine loop, where a group's steps overlap the
//! loop's planning (and without, `--no-overlap`'s way). Also the TCP all-reduce's bandwidth on loopback.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Args;
use tessera_coordinator::{
    engine::{
        backend::{Backend, ModelInfo, StepFailure, WorkerTiming},
        contract::{Event, GenRequest},
        step_delta::Sent,
    },
    metrics::Metrics,
    replicas::Replicas,
    scheduler::SchedulerConfig,
};
use tessera_proto::{
    step::{SamplingParams, SeqSampled, StepSeq},
    v1::StepRequest,
};
use tessera_worker::{Collective, tcp_collective};

use crate::{
    cpu::greedy_step,
    host::{Host, Running},
};

#[derive(Args, Debug)]
pub struct ClusterBenchArgs {
    /// Model directory (default: the built-in stories260K).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Decode batch sizes.
    #[arg(long, default_value = "1,32", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Tensor-parallel degrees of the distributed runs.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub tp: Vec<usize>,
    /// Timed decode steps per configuration.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Tokens each sequence generates in the engine-loop runs.
    #[arg(long, default_value_t = 64)]
    pub engine_tokens: usize,
    /// All-reduce buffer sizes in bytes.
    #[arg(long, default_value = "1048576,16777216", value_delimiter = ',')]
    pub allreduce_bytes: Vec<usize>,
}

/// Mean seconds per decode step of `batch` sequences with 32 tokens of context.
fn time_decode(backend: &mut dyn Backend, batch: usize, steps: usize) -> Result<f64> {
    let info = backend.info();
    let per_seq = (32 + steps + 4).div_ceil(info.block_size);
    anyhow::ensure!(per_seq * batch <= info.num_blocks, "KV cache too small for batch {batch}; raise --kv-cache-mib");
    let greedy = SamplingParams::greedy();
    let tables: Vec<Vec<u32>> =
        (0..batch).map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect()).collect();
    let mut seqs: Vec<Vec<u32>> =
        (0..batch).map(|i| (0..32).map(|t| 3 + ((t * 7 + i * 13) % 200) as u32).collect()).collect();
    let base = 10_000 * batch as u64;
    let mut run_step = |seqs: &mut Vec<Vec<u32>>, first: bool| -> Result<()> {
        let b: Vec<StepSeq> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let start = if first { 0 } else { s.len() - 1 };
                StepSeq {
                    id: base + i as u64,
                    tokens: &s[start..],
                    start_pos: start,
                    block_table: &tables[i],
                    sample: Some(&greedy),
                    penalty_context: &[],
                    output_context: &[],
                    starts: false,
                    score_prompt: None,
                    allowed: None,
                    adapter: 0,
                }
            })
            .collect();
        for o in backend.step(&b)? {
            seqs[(o.id - base) as usize].push(o.sampled.token);
        }
        Ok(())
    };
    run_step(&mut seqs, true)?;
    run_step(&mut seqs, false)?;
    let t = Instant::now();
    for _ in 0..steps {
        run_step(&mut seqs, false)?;
    }
    let dt = t.elapsed().as_secs_f64() / steps as f64;
    backend.release(&(0..batch as u64).map(|i| base + i).collect::<Vec<_>>());
    Ok(dt)
}

/// A backend that counts the steps it runs.
struct Counted {
    inner: Box<dyn Backend>,
    steps: Arc<AtomicUsize>,
}

impl Backend for Counted {
    fn info(&self) -> ModelInfo {
        self.inner.info()
    }
    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, StepFailure> {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.inner.step(batch)
    }
    fn can_overlap(&self) -> bool {
        self.inner.can_overlap()
    }
    fn submit(&mut self, batch: &[StepSeq<'_>]) -> Result<(), StepFailure> {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.inner.submit(batch)
    }
    fn wait(&mut self) -> Result<Vec<SeqSampled>, StepFailure> {
        self.inner.wait()
    }
    fn release(&mut self, ids: &[u64]) {
        self.inner.release(ids)
    }
    fn computes_on_cpu(&self) -> bool {
        self.inner.computes_on_cpu()
    }
    fn last_timings(&self) -> Vec<WorkerTiming> {
        self.inner.last_timings()
    }
}

/// Mean wall seconds per step of an engine loop over `started` serving `batch` requests at once (prompts of
/// 32 tokens, `tokens` generated each), planning each step while the one before runs if `overlap`.
fn time_engine(started: Running, batch: usize, tokens: usize, overlap: bool) -> Result<f64> {
    let Running { backend, keep_alive } = started;
    let info = backend.info();
    let steps = Arc::new(AtomicUsize::new(0));
    let backend = Box::new(Counted { inner: backend, steps: steps.clone() });
    let replicas = Replicas::new(info, Arc::new(Metrics::new("bench")));
    let cfg = SchedulerConfig {
        max_num_seqs: batch,
        max_batched_tokens: (32 * batch).max(batch),
        max_model_len: info.max_position_embeddings,
        overlap,
    };
    replicas.add(backend, cfg, vec![], "bench", vec![], keep_alive);
    let t = Instant::now();
    let mut streams = Vec::new();
    for i in 0..batch {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt = (0..32).map(|t| 3 + ((t * 7 + i * 13) % 200) as u32).collect();
        let id = replicas.next_request_id();
        let req =
            GenRequest { ignore_eos: true, ..GenRequest::one(id, prompt, SamplingParams::greedy(), tokens, events) };
        anyhow::ensure!(replicas.submit(req), "the replica took no request");
        streams.push(rx);
    }
    for mut rx in streams {
        loop {
            match rx.blocking_recv() {
                Some(Event::Token { .. }) => {}
                Some(Event::Finished { .. }) => break,
                other => anyhow::bail!("a benchmark request ended with {other:?}"),
            }
        }
    }
    Ok(t.elapsed().as_secs_f64() / steps.load(Ordering::Relaxed).max(1) as f64)
}

/// Seconds per all-reduce of `bytes` over a 2-rank loopback ring (best of several).
pub fn time_all_reduce(bytes: usize, reps: usize) -> Result<f64> {
    let ranks = tcp_collective::loopback_ring(2, Duration::from_secs(30))?;
    let n = bytes / 4;
    let times: Vec<Result<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .iter()
            .map(|c| {
                s.spawn(move || -> Result<f64> {
                    let mut buf: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
                    c.all_reduce_sum(&mut buf)?;
                    let mut best = f64::MAX;
                    for _ in 0..reps {
                        let t = Instant::now();
                        c.all_reduce_sum(&mut buf)?;
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    Ok(best)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("all-reduce thread panicked"))?).collect()
    });
    let mut worst = 0f64;
    for t in times {
        worst = worst.max(t?);
    }
    Ok(worst)
}

/// The size of a decode step's `StepRequest` for `seqs` sequences of `context` tokens (16-token blocks,
/// sampling with a temperature, top-p and a seed): sent in full, and the next step carrying what changed.
pub fn step_bytes(seqs: usize, context: usize) -> (usize, usize) {
    use prost::Message;
    let params = SamplingParams { temperature: 0.7, top_p: 0.9, seed: Some(7), ..Default::default() };
    let blocks = context.div_ceil(16);
    let tables: Vec<Vec<u32>> = (0..seqs).map(|i| ((i * blocks) as u32..((i + 1) * blocks) as u32).collect()).collect();
    let mut sent = Sent::default();
    let mut request = |pos: usize| {
        let sequences =
            (0..seqs).map(|i| sent.encode(&greedy_step(i as u64, &[1], pos, &tables[i], &params))).collect();
        StepRequest { step_id: 1, sequences, group_id: "g".into(), ..Default::default() }.encoded_len()
    };
    let full = request(context - 2);
    (full, request(context - 1))
}

pub fn run(a: ClusterBenchArgs, host: &dyn Host) -> Result<()> {
    let (name, dir) = match &a.model {
        Some(d) => (d.display().to_string(), d.clone()),
        None => host.default_model()?,
    };
    let kv_mib = 64;
    let mut rows: Vec<(String, usize, f64)> = Vec::new();
    let mut configs: Vec<(String, usize)> = vec![("in-process".into(), 0)];
    configs.extend(a.tp.iter().map(|&tp| (format!("workers tp={tp}"), tp)));
    for (label, tp) in &configs {
        let mut runner = if *tp == 0 { host.in_process(&dir, kv_mib)? } else { host.workers(&dir, *tp, kv_mib)? };
        for &b in &a.batch {
            let dt = time_decode(runner.backend.as_mut(), b, a.steps).with_context(|| format!("{label}, batch {b}"))?;
            rows.push((label.clone(), b, dt));
        }
    }
    println!("model {name}: decode step time, {} timed steps each", a.steps);
    println!("{:<16} {:>6} {:>12} {:>14} {:>8}", "path", "batch", "µs/step", "overhead µs", "ratio");
    for (label, b, dt) in &rows {
        let base = rows.iter().find(|r| r.0 == "in-process" && r.1 == *b).map_or(*dt, |r| r.2);
        println!("{label:<16} {b:>6} {:>12.1} {:>14.1} {:>8.2}", dt * 1e6, (dt - base) * 1e6, dt / base);
    }
    println!(
        "engine loop, {} tokens generated per sequence (prompt 32), all sequences at once: mean µs per step",
        a.engine_tokens
    );
    println!("{:<16} {:>6} {:>12} {:>14} {:>14}", "path", "batch", "in process", "no overlap", "overlap");
    for &tp in &a.tp {
        for &b in &a.batch {
            let inner = time_engine(host.in_process(&dir, kv_mib)?, b, a.engine_tokens, true)?;
            let plain = time_engine(host.workers(&dir, tp, kv_mib)?, b, a.engine_tokens, false)?;
            let overlapped = time_engine(host.workers(&dir, tp, kv_mib)?, b, a.engine_tokens, true)?;
            println!(
                "{:<16} {b:>6} {:>12.1} {:>14} {:>14}",
                format!("workers tp={tp}"),
                inner * 1e6,
                format!("{:.1} (+{:.1})", plain * 1e6, (plain - inner) * 1e6),
                format!("{:.1} (+{:.1})", overlapped * 1e6, (overlapped - inner) * 1e6),
            );
        }
    }
    for &(seqs, context) in &[(32, 160), (256, 4096)] {
        let (full, incremental) = step_bytes(seqs, context);
        println!(
            "Step message, {seqs} decoding sequences of {context}-token contexts: {full} bytes in full, {incremental} \
             carrying what changed ({:.1}x smaller)",
            full as f64 / incremental as f64
        );
    }
    // With 2 ranks a ring all-reduce sends half the buffer each way twice, so buffer bytes / time is both the
    // algorithm and the bus bandwidth.
    println!("TCP all-reduce of f32 sums, 2 ranks on loopback (best of 20):");
    for &bytes in &a.allreduce_bytes {
        let t = time_all_reduce(bytes, 20)?;
        println!(
            "  {:>6.1} MiB: {:>9.1} µs  {:>6.2} GB/s",
            bytes as f64 / (1 << 20) as f64,
            t * 1e6,
            bytes as f64 / t / 1e9
        );
    }
    Ok(())
}
