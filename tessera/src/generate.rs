//! `tessera generate`: one request, end to end: validate the prompt against the model, prefill it in chunks,
//! decode token by token, stream text pieces, stop on EOS, a length limit or the context's end.

use std::io::Write;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tessera_coordinator::{
    engine::{backend::Backend, contract::FinishReason},
    scheduler::blocks::BlockManager,
    tokenizer::{IncrementalDecoder, Tokenizer},
};
use tessera_proto::step::{SamplingParams, StepSeq};

use crate::runner::{ModelArgs, Runner};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (tokenized with the model's tokenizer, BOS added as the model expects).
    #[arg(long, conflicts_with = "prompt_ids", value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, used as given.
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Option<String>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0, value_name = "T")]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub min_p: f32,
    /// Divide logits of tokens already present by this (>1 discourages repetition).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repetition_penalty: f32,
    /// Subtract from logits of tokens already generated (OpenAI semantics).
    #[arg(long, default_value_t = 0.0, value_name = "X", allow_hyphen_values = true)]
    pub presence_penalty: f32,
    /// Subtract per occurrence of tokens already generated (OpenAI semantics).
    #[arg(long, default_value_t = 0.0, value_name = "X", allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    /// Seed for sampling: the same seed gives the same output.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Report the K most likely tokens and their logprobs at each position (with --json).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_logprobs: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Longest prefill chunk sent in one step: bounds a step's activation memory whatever the prompt.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub ignore_eos: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerateOutput {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<Vec<TokenLogprob>>>,
}

/// Checks a prompt against the model before anything runs.
pub fn validate_prompt(prompt: &[u32], vocab: usize, context: usize) -> Result<()> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
        bail!("prompt token id {t} is outside the model's vocabulary of {vocab}");
    }
    if prompt.len() >= context {
        bail!(
            "the prompt has {} tokens but the model's context is {context} tokens (max_position_embeddings), leaving no room to generate",
            prompt.len()
        );
    }
    Ok(())
}

/// Runs `req` to completion on `backend`, calling `on_text` with each new piece of text as it is decoded.
pub fn generate(
    backend: &mut dyn Backend,
    tok: &Tokenizer,
    req: &GenerateRequest,
    seq_id: u64,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput> {
    let info = backend.info();
    validate_prompt(&req.prompt_ids, info.vocab_size, info.max_position_embeddings)?;
    if req.max_tokens == 0 {
        bail!("max_tokens must be at least 1");
    }
    // The sequence may grow to the context's end; that is also where a too-large max_tokens stops.
    let limit = (req.prompt_ids.len() + req.max_tokens).min(info.max_position_embeddings);
    let mut alloc = BlockManager::new(info.num_blocks, info.block_size);
    let Some(table) = alloc.allocate_n(limit.div_ceil(info.block_size)) else {
        bail!(
            "the KV cache holds {} blocks of {} tokens; this request needs {}",
            info.num_blocks,
            info.block_size,
            limit.div_ceil(info.block_size)
        );
    };
    let result = run(backend, tok, req, seq_id, limit, &table, &mut on_text);
    backend.release(&[seq_id]);
    alloc.release(&table);
    result
}

fn run(
    backend: &mut dyn Backend,
    tok: &Tokenizer,
    req: &GenerateRequest,
    seq_id: u64,
    limit: usize,
    table: &[u32],
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    let prompt = &req.prompt_ids;
    let mut tokens = prompt.clone();
    let mut decoder = IncrementalDecoder::new(prompt);
    let want_top = req.params.top_logprobs > 0;
    let mut top = Vec::new();
    let mut text = String::new();
    let mut pos = 0;
    let finish = loop {
        let end = if pos < prompt.len() { (pos + PREFILL_CHUNK).min(prompt.len()) } else { pos + 1 };
        let last_chunk = end >= prompt.len();
        let step = StepSeq {
            id: seq_id,
            tokens: &tokens[pos..end],
            start_pos: pos,
            block_table: table,
            sample: last_chunk.then_some(&req.params),
            penalty_context: if pos == 0 { prompt } else { &[] },
            output_context: &[],
            starts: false,
        };
        let sampled = backend.step(&[step])?;
        pos = end;
        let Some(s) = sampled.into_iter().find(|s| s.id == seq_id) else {
            if last_chunk {
                bail!("the backend returned no token for sequence {seq_id}");
            }
            continue;
        };
        let id = s.sampled.token;
        if !req.ignore_eos && tok.is_eos(id) {
            break FinishReason::Stop;
        }
        tokens.push(id);
        if want_top {
            top.push(
                s.sampled.top_logprobs.iter().map(|&(token_id, logprob)| TokenLogprob { token_id, logprob }).collect(),
            );
        }
        let piece = decoder.push(tok, id)?;
        text.push_str(&piece);
        on_text(&piece);
        if tokens.len() >= limit {
            break FinishReason::Length;
        }
    };
    let rest = decoder.finish(tok)?;
    text.push_str(&rest);
    on_text(&rest);
    Ok(GenerateOutput {
        prompt_token_ids: prompt.clone(),
        token_ids: tokens[prompt.len()..].to_vec(),
        text,
        finish_reason: finish,
        top_logprobs: want_top.then_some(top),
    })
}

pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().with_context(|| format!("--prompt-ids: {p:?} is not a token id")))
        .collect()
}

/// `tessera generate`: one prompt, its completion streamed to stdout (or printed as JSON).
pub fn execute(a: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
        logprobs: a.top_logprobs > 0,
        top_logprobs: a.top_logprobs,
        logit_bias: Vec::new(),
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let dir = a.model.dir()?;
    if !dir.is_dir() {
        return Err(tessera_worker::ModelError::NoDirectory(dir).into());
    }
    let tok = Tokenizer::load(&dir)?;
    let prompt_ids = match (&a.prompt, &a.prompt_ids) {
        (Some(text), None) => {
            if text.is_empty() {
                bail!("--prompt is empty");
            }
            tok.encode_prompt(text)?
        }
        (None, Some(ids)) => parse_ids(ids)?,
        _ => bail!("give the prompt with --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let mut runner = Runner::start(&a.model, &dir)?;
    let backend = runner.backend.as_mut();
    let info = backend.info();
    validate_prompt(&prompt_ids, info.vocab_size, info.max_position_embeddings)?;
    let req = GenerateRequest { prompt_ids, params, max_tokens: a.max_tokens, ignore_eos: a.ignore_eos };
    let stdout = std::io::stdout();
    if a.json {
        let out = generate(backend, &tok, &req, 0, |_| {})?;
        let mut lock = stdout.lock();
        serde_json::to_writer(&mut lock, &out)?;
        writeln!(lock)?;
    } else {
        let mut lock = stdout.lock();
        let mut io_err = None;
        generate(backend, &tok, &req, 0, |piece| {
            if io_err.is_none() {
                io_err = lock.write_all(piece.as_bytes()).and_then(|_| lock.flush()).err();
            }
        })?;
        if let Some(e) = io_err {
            return Err(e).context("writing to stdout");
        }
        writeln!(lock)?;
    }
    Ok(())
}
