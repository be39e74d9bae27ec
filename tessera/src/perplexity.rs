//! `tessera perplexity`: a model's perplexity on a text file, as llama.cpp's `llama-perplexity` computes
//! it, so users can check what a quantization or a fine-tune cost and compare with llama.cpp's figures.
//!
//! The text is tokenized whole (with BOS when the model adds one) and cut into `len / n_ctx` chunks of
//! `n_ctx` tokens. Each chunk starts over with BOS in place of its first token; the tokens of its second
//! half (positions `n_ctx/2 + 1 .. n_ctx`) are scored by the log-softmax of the logits before them. The
//! perplexity is `exp` of the mean negative log-likelihood over every scored token, printed after each
//! chunk as llama.cpp prints it, with its error estimate at the end.
//!
//! Chunks are requests to the same engine loop and scheduler `tessera serve` runs (prompt logprobs, one
//! token generated and thrown away), several at once.

use std::{collections::BTreeMap, io::Write, path::PathBuf, sync::Arc};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tessera_coordinator::{
    engine::contract::{Event, GenRequest},
    metrics::Metrics,
    replicas::Replicas,
    scheduler::SchedulerConfig,
    tokenizer::Tokenizer,
};
use tessera_proto::step::SamplingParams;

use crate::{
    generate::PREFILL_CHUNK,
    runner::{ModelArgs, Runner},
};

/// Largest text file read: a few times wikitext-2's test set (1.3 MB).
const MAX_TEXT_BYTES: u64 = 64 << 20;

/// Chunks in flight at once.
const CHUNKS_AT_ONCE: usize = 8;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score (UTF-8), e.g. wikitext-2's `wiki.test.raw`.
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Tokens per chunk (llama-perplexity's `-c`); at most the model's context less one.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub context: usize,
    /// Score only the first N chunks (default: all the text holds).
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Print one JSON object instead of llama.cpp's lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct PerplexityReport {
    pub context: usize,
    pub chunks: usize,
    pub tokens: usize,
    pub scored_tokens: usize,
    pub ppl: f64,
    /// llama.cpp's error estimate: `sqrt((mean(nll²) − mean(nll)²) / (count − 1)) · ppl`.
    pub ppl_error: f64,
    /// The perplexity over the chunks so far, after each chunk.
    pub running_ppl: Vec<f64>,
}

/// The perplexity of `runner`'s model on `tokens` (the whole text, tokenized with BOS if the model adds
/// one) in chunks of `n_ctx`; `on_chunk(k, ppl)` hears the running value after chunk k (from 1), in order.
pub fn perplexity(
    runner: Runner,
    tok: &Tokenizer,
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: Option<usize>,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<PerplexityReport> {
    let (backend, cluster) = runner.into_parts();
    let info = backend.info();
    let n_chunks = chunks(&info, tokens.len(), n_ctx, max_chunks)?;
    let bos = tok.bos_token_id.filter(|&b| tokens.first() == Some(&b));
    let replicas = Replicas::new(info, Arc::new(Metrics::new("perplexity")));
    let cfg = SchedulerConfig {
        max_num_seqs: CHUNKS_AT_ONCE,
        max_batched_tokens: PREFILL_CHUNK.max(CHUNKS_AT_ONCE),
        max_model_len: info.max_position_embeddings,
        // Prefill chunks of a few sequences: planning them ahead saves nothing worth the cores.
        overlap: false,
    };
    replicas.add(backend, cfg, tok.eos_token_ids.clone(), "local", vec![], Box::new(cluster));
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let params = SamplingParams { prompt_logprobs: Some(0), ..SamplingParams::greedy() };
    let first = n_ctx / 2;
    let submit = |c: usize| {
        let mut prompt = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            prompt[0] = b;
        }
        let id = replicas.next_request_id();
        replicas.submit(GenRequest {
            ignore_eos: true,
            first_choice: c,
            ..GenRequest::one(id, prompt, params.clone(), 1, events.clone())
        })
    };
    // Each chunk's scored tokens' negative log-likelihoods, by position (a prefill recomputed after a
    // preemption sends positions again: the same values).
    let mut scored: Vec<BTreeMap<usize, f64>> = vec![BTreeMap::new(); n_chunks];
    let mut done = vec![false; n_chunks];
    let mut next = 0;
    while next < n_chunks.min(CHUNKS_AT_ONCE) {
        if !submit(next) {
            bail!("the engine stopped before the text could be scored");
        }
        next += 1;
    }
    let mut tally = Tally::default();
    let mut reported = 0;
    while reported < n_chunks {
        match rx.blocking_recv() {
            Some(Event::Prompt { choice, first_position, tokens: t, .. }) => {
                for (i, s) in t.iter().enumerate() {
                    let pos = first_position + i;
                    if pos > first {
                        let lp = s.logprob.context("the engine returned a prompt token without its logprob")?;
                        scored[choice].insert(pos, -(lp as f64));
                    }
                }
            }
            Some(Event::Finished { choice, .. }) => {
                if scored[choice].len() != n_ctx - 1 - first {
                    bail!("chunk {}: {} of {} tokens scored", choice + 1, scored[choice].len(), n_ctx - 1 - first);
                }
                done[choice] = true;
                if next < n_chunks {
                    if !submit(next) {
                        bail!("the engine stopped before the text could be scored");
                    }
                    next += 1;
                }
                while reported < n_chunks && done[reported] {
                    let ppl = tally.add(scored[reported].values().copied());
                    reported += 1;
                    on_chunk(reported, ppl);
                }
            }
            Some(Event::Token { .. }) => {}
            Some(Event::Error { choice, message }) => bail!("chunk {}: {message}", choice + 1),
            None => bail!("the engine stopped before the text was scored"),
        }
    }
    Ok(tally.report(n_ctx, n_chunks, tokens.len()))
}

/// How many chunks of `n_ctx` of a text of `len` tokens to score: refused where the model's context,
/// the text or the KV cache cannot hold them.
fn chunks(
    info: &tessera_coordinator::engine::backend::ModelInfo,
    len: usize,
    n_ctx: usize,
    max_chunks: Option<usize>,
) -> Result<usize> {
    if n_ctx < 4 || n_ctx + 1 > info.max_position_embeddings {
        bail!(
            "--context {n_ctx}: must be at least 4 and at most {} (the model's context less the one token each \
             chunk generates)",
            info.max_position_embeddings.saturating_sub(1)
        );
    }
    if len < 2 * n_ctx {
        bail!("the text tokenizes to {len} tokens; a context of {n_ctx} needs at least {} (two chunks)", 2 * n_ctx);
    }
    let need = (n_ctx + 1).div_ceil(info.block_size);
    if need > info.num_blocks {
        bail!("the KV cache holds {} blocks of {} tokens; a chunk needs {need}", info.num_blocks, info.block_size);
    }
    let n_chunks = (len / n_ctx).min(max_chunks.unwrap_or(usize::MAX));
    if n_chunks == 0 {
        bail!("--chunks must be at least 1");
    }
    Ok(n_chunks)
}

/// The negative log-likelihoods so far: their sum, the sum of their squares, their count, and the
/// perplexity after each chunk.
#[derive(Default)]
struct Tally {
    nll: f64,
    nll2: f64,
    count: usize,
    running: Vec<f64>,
}

impl Tally {
    /// Adds a chunk's values; returns the perplexity over every chunk so far.
    fn add(&mut self, values: impl Iterator<Item = f64>) -> f64 {
        for v in values {
            self.nll += v;
            self.nll2 += v * v;
            self.count += 1;
        }
        let ppl = (self.nll / self.count as f64).exp();
        self.running.push(ppl);
        ppl
    }

    fn report(self, context: usize, chunks: usize, tokens: usize) -> PerplexityReport {
        let mean = self.nll / self.count as f64;
        let ppl = mean.exp();
        let var = (self.nll2 / self.count as f64 - mean * mean).max(0.0);
        PerplexityReport {
            context,
            chunks,
            tokens,
            scored_tokens: self.count,
            ppl,
            ppl_error: (var / (self.count.max(2) - 1) as f64).sqrt() * ppl,
            running_ppl: self.running,
        }
    }
}

/// `tessera perplexity`.
pub fn execute(a: PerplexityArgs) -> Result<()> {
    let meta = std::fs::metadata(&a.file).with_context(|| format!("--file {}", a.file.display()))?;
    if !meta.is_file() || meta.len() > MAX_TEXT_BYTES {
        bail!("--file {}: not a file of at most {MAX_TEXT_BYTES} bytes", a.file.display());
    }
    let text =
        std::fs::read_to_string(&a.file).with_context(|| format!("--file {}: not UTF-8 text", a.file.display()))?;
    let dir = a.model.dir()?;
    let tok = Tokenizer::load(&dir)?;
    let tokens = tok.encode_prompt(&text)?;
    let runner = Runner::start(&a.model, &dir)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let report = perplexity(runner, &tok, &tokens, a.context, a.chunks, |k, ppl| {
        if !a.json {
            let _ = write!(out, "[{k}]{ppl:.4},");
            let _ = out.flush();
        }
    })?;
    if a.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        writeln!(out)?;
        writeln!(out, "Final estimate: PPL = {:.4} +/- {:.5}", report.ppl, report.ppl_error)?;
    }
    Ok(())
}
