//! `tessera generate`: one prompt's completion, streamed to stdout as text or printed as one JSON object.
//!
//! It runs through the same engine loop and scheduler as `tessera serve`, as a server with one request:
//! chunked prefill, sampling, EOS and the context's end live there, in one place. This side validates the
//! prompt against the model before anything runs and turns the engine's events into text.

use std::{io::Write, sync::Arc};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tessera_coordinator::{
    engine::contract::{Event, FinishReason, GenRequest},
    metrics::Metrics,
    replicas::Replicas,
    scheduler::SchedulerConfig,
    tokenizer::{IncrementalDecoder, Tokenizer},
};
use tessera_proto::step::SamplingParams;

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

/// Longest prefill chunk sent in one step (the scheduler's token budget): bounds a step's activation
/// memory whatever the prompt.
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

/// Runs `req` on `runner`'s model the way `tessera serve` runs a request: one replica with its engine loop
/// and scheduler, one request. Chunked prefill, EOS, sampling and the context's end are theirs; this side
/// only checks the request up front and turns the events into text. `on_text` gets each piece as it is
/// decoded.
pub fn generate(
    runner: Runner,
    tok: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput> {
    let (backend, cluster) = runner.into_parts();
    let info = backend.info();
    validate_prompt(&req.prompt_ids, info.vocab_size, info.max_position_embeddings)?;
    if req.max_tokens == 0 {
        bail!("max_tokens must be at least 1");
    }
    // The sequence may grow to the context's end; that is also where a too-large max_tokens stops.
    let limit = (req.prompt_ids.len() + req.max_tokens).min(info.max_position_embeddings);
    let need = limit.div_ceil(info.block_size);
    if need > info.num_blocks {
        bail!("the KV cache holds {} blocks of {} tokens; this request needs {need}", info.num_blocks, info.block_size);
    }
    let replicas = Replicas::new(info, Arc::new(Metrics::new("generate")));
    let cfg = SchedulerConfig {
        max_num_seqs: 1,
        max_batched_tokens: PREFILL_CHUNK,
        max_model_len: info.max_position_embeddings,
        // One sequence: nothing to plan while its step runs.
        overlap: false,
    };
    replicas.add(backend, cfg, tok.eos_token_ids.clone(), "local", vec![], Box::new(cluster));
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let id = replicas.next_request_id();
    let submitted = replicas.submit(GenRequest {
        ignore_eos: req.ignore_eos,
        ..GenRequest::one(id, req.prompt_ids.clone(), req.params.clone(), req.max_tokens, events)
    });
    if !submitted {
        bail!("the engine stopped before the request could run");
    }
    let mut out = Collect::new(req);
    loop {
        match rx.blocking_recv() {
            Some(Event::Token { token, top_logprobs, .. }) => out.token(tok, token, top_logprobs, &mut on_text)?,
            Some(Event::Finished { reason, .. }) => return out.finish(tok, reason, &mut on_text),
            Some(Event::Error { message, .. }) => bail!("{message}"),
            // `generate` never asks for prompt logprobs.
            Some(Event::Prompt { .. }) => {}
            None => bail!("the engine stopped without finishing the request"),
        }
    }
}

/// The output as events arrive. Each token is held until the next event: the end-of-sequence token that
/// ends a choice is reported like any other, but it is not part of the output.
struct Collect {
    prompt: Vec<u32>,
    ignore_eos: bool,
    want_top: bool,
    decoder: IncrementalDecoder,
    held: Option<(u32, Vec<(u32, f32)>)>,
    tokens: Vec<u32>,
    top: Vec<Vec<TokenLogprob>>,
    text: String,
}

impl Collect {
    fn new(req: &GenerateRequest) -> Self {
        Collect {
            prompt: req.prompt_ids.clone(),
            ignore_eos: req.ignore_eos,
            want_top: req.params.top_logprobs > 0,
            decoder: IncrementalDecoder::new(&req.prompt_ids),
            held: None,
            tokens: Vec::new(),
            top: Vec::new(),
            text: String::new(),
        }
    }

    fn token(&mut self, tok: &Tokenizer, id: u32, top: Vec<(u32, f32)>, on_text: &mut dyn FnMut(&str)) -> Result<()> {
        self.release(tok, on_text)?;
        self.held = Some((id, top));
        Ok(())
    }

    /// The held token is output.
    fn release(&mut self, tok: &Tokenizer, on_text: &mut dyn FnMut(&str)) -> Result<()> {
        let Some((id, top)) = self.held.take() else { return Ok(()) };
        self.tokens.push(id);
        if self.want_top {
            self.top.push(top.into_iter().map(|(token_id, logprob)| TokenLogprob { token_id, logprob }).collect());
        }
        let piece = self.decoder.push(tok, id)?;
        self.text.push_str(&piece);
        on_text(&piece);
        Ok(())
    }

    fn finish(
        mut self,
        tok: &Tokenizer,
        reason: FinishReason,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerateOutput> {
        let ended_by_eos = reason == FinishReason::Stop
            && !self.ignore_eos
            && self.held.as_ref().is_some_and(|(id, _)| tok.is_eos(*id));
        if ended_by_eos {
            self.held = None;
        }
        self.release(tok, on_text)?;
        let rest = self.decoder.finish(tok)?;
        self.text.push_str(&rest);
        on_text(&rest);
        Ok(GenerateOutput {
            prompt_token_ids: self.prompt,
            token_ids: self.tokens,
            text: self.text,
            finish_reason: reason,
            top_logprobs: self.want_top.then_some(self.top),
        })
    }
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
        prompt_logprobs: None,
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let dir = a.model.dir()?;
    if !(dir.is_dir() || dir.is_file()) {
        return Err(tessera_worker::ModelError::NoModel(dir).into());
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
    let runner = Runner::start(&a.model, &dir)?;
    let req = GenerateRequest { prompt_ids, params, max_tokens: a.max_tokens, ignore_eos: a.ignore_eos };
    let stdout = std::io::stdout();
    if a.json {
        let out = generate(runner, &tok, &req, |_| {})?;
        let mut lock = stdout.lock();
        serde_json::to_writer(&mut lock, &out)?;
        writeln!(lock)?;
    } else {
        let mut lock = stdout.lock();
        let mut io_err = None;
        generate(runner, &tok, &req, |piece| {
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
