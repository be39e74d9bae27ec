//! Generation of one request, end to end: validate the prompt against the model, prefill it in chunks,
//! decode token by token, stream text pieces, stop on EOS, a length limit or the context's end.

use anyhow::{Result, bail};
use serde::Serialize;
use tessera_worker::{SamplingParams, StepSeq};

use crate::{
    backend::Backend,
    blocks::BlockManager,
    tokenizer::{IncrementalDecoder, Tokenizer},
};

/// Longest prefill chunk sent in one step: bounds a step's activation memory whatever the prompt.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
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
