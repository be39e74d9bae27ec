//! Prompt logprobs: the logits of every position of a prefill chunk that asked for them, each turned into
//! the logprob of the prompt token that follows it (and the most likely alternatives), as a sampled
//! token's are. The vocabulary projection runs over tiles of [`TILE`] positions, so a long chunk never
//! holds more than a tile's logits; under tensor parallelism every rank projects its vocabulary rows of
//! the same tiles and the all-gather joins them, as for sampled rows.

use std::time::Instant;

use tessera_kernels::{Tensor, ops::AttentionSeq};

use super::{Model, SeqInput};
use crate::{collective::Collective, error::ModelError, sampling};

/// Positions projected at once: with a 152k vocabulary, 19 MB of f32 logits.
const TILE: usize = 32;

/// One sequence's scored tokens, by its place in the batch.
pub struct ScoredChunk {
    pub index: usize,
    /// Position of `tokens[0]`: the chunk's second position (its first token has no logits before it in
    /// this chunk; the previous chunk's `next_token` scored it).
    pub first_position: usize,
    pub tokens: Vec<sampling::Sampled>,
    /// Each token's rank among the vocabulary at its position (1: the most likely).
    pub ranks: Vec<u32>,
}

pub(super) fn score_prompts(
    model: &Model,
    x: &Tensor,
    seqs: &[SeqInput<'_>],
    attn_seqs: &[AttentionSeq<'_>],
    comm: &dyn Collective,
    at: &mut Instant,
) -> Result<Vec<ScoredChunk>, ModelError> {
    let vocab = model.config.vocab_size;
    let mut out = Vec::new();
    for (index, (s, a)) in seqs.iter().zip(attn_seqs).enumerate() {
        let Some(score) = s.score else { continue };
        // Row j's logits predict the token after it: the chunk's own next token, or the prompt's next.
        let targets: Vec<(u32, u32)> = (0..a.q_len)
            .filter_map(|j| {
                let next = if j + 1 < a.q_len { Some(s.tokens[j + 1]) } else { score.next_token };
                next.map(|t| ((a.q_start + j) as u32, t))
            })
            .collect();
        let mut tokens = Vec::with_capacity(targets.len());
        let mut ranks = Vec::with_capacity(targets.len());
        for tile in targets.chunks(TILE) {
            let rows: Vec<u32> = tile.iter().map(|&(r, _)| r).collect();
            let projected = model.vocab_rows(x, &rows, comm, at)?;
            let logits = projected.host_f32()?;
            for (i, &(_, t)) in tile.iter().enumerate() {
                let (scored, rank) = sampling::score(&logits[i * vocab..(i + 1) * vocab], t, score.top);
                tokens.push(scored);
                ranks.push(rank);
            }
        }
        out.push(ScoredChunk { index, first_position: s.start_pos + 1, tokens, ranks });
    }
    Ok(out)
}
