//! Prompt logprobs: the logits of every position of a prefill chunk that asked for them, each turned into
//! the logprob of the prompt token that follows it (and the most likely alternatives), as a sampled
//! token's are. The vocabulary projection runs over tiles of [`TILE`] positions, so a long chunk never
//! holds more than a tile's logits; under tensor parallelism every rank projects its vocabulary rows of
//! the same tiles and the all-gather joins them, as for sampled rows. The projection is the model's; this
//! module only chooses the rows and scores what comes back.

use tessera_kernels::Tensor;
use tessera_proto::step::ScorePrompt;

use crate::{error::ModelError, sampling};

/// Positions projected at once: with a 152k vocabulary, 19 MB of f32 logits.
const TILE: usize = 32;

/// A chunk to score: its place in the batch, its rows of the pass, its tokens and first position.
pub struct Chunk<'a> {
    pub index: usize,
    /// Row of `tokens[0]` in the pass.
    pub first_row: usize,
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub score: ScorePrompt,
}

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

/// Scores `chunks`; `project(rows)` gives the logits `[rows.len(), vocab]` of those rows of the pass.
pub fn score(
    chunks: &[Chunk<'_>],
    vocab: usize,
    mut project: impl FnMut(&[u32]) -> Result<Tensor, ModelError>,
) -> Result<Vec<ScoredChunk>, ModelError> {
    let mut out = Vec::with_capacity(chunks.len());
    for c in chunks {
        // Row j's logits predict the token after it: the chunk's own next token, or the prompt's next.
        let targets: Vec<(u32, u32)> = (0..c.tokens.len())
            .filter_map(|j| {
                let next = if j + 1 < c.tokens.len() { Some(c.tokens[j + 1]) } else { c.score.next_token };
                next.map(|t| ((c.first_row + j) as u32, t))
            })
            .collect();
        let mut tokens = Vec::with_capacity(targets.len());
        let mut ranks = Vec::with_capacity(targets.len());
        for tile in targets.chunks(TILE) {
            let rows: Vec<u32> = tile.iter().map(|&(r, _)| r).collect();
            let projected = project(&rows)?;
            let logits = projected.host_f32()?;
            for (i, &(_, t)) in tile.iter().enumerate() {
                let (scored, rank) = sampling::score(&logits[i * vocab..(i + 1) * vocab], t, c.score.top);
                tokens.push(scored);
                ranks.push(rank);
            }
        }
        out.push(ScoredChunk { index: c.index, first_position: c.start_pos + 1, tokens, ranks });
    }
    Ok(out)
}
