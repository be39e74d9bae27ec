//! Attention over a paged KV cache, for a batch that mixes prefill chunks and single-token decodes.
//!
//! The cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]`; a sequence's position `p`
//! lives in block `block_table[p / block_size]` at offset `p % block_size`. Each query token attends
//! causally to its own sequence's positions, optionally limited to a sliding window, with grouped-query
//! attention mapping query head `h` to KV head `h / (num_heads / num_kv_heads)`.

use rayon::prelude::*;

use super::{elementwise::softmax_inplace, matmul::dot};

/// Geometry of an attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Multiplier of `q·k`, normally `1/sqrt(head_dim)`.
    pub scale: f32,
    /// A query at position `p` sees positions `j` with `p - j < window` (Mistral's convention).
    pub sliding_window: Option<usize>,
}

/// One sequence's share of a batched attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSeq<'a> {
    /// Row of this sequence's first query token in the batch.
    pub q_start: usize,
    /// Number of query tokens (1 for a decode, the chunk length for prefill).
    pub q_len: usize,
    /// Position of the first query token. The cache already holds positions `0..pos0 + q_len`.
    pub pos0: usize,
    /// Cache blocks holding the sequence, in position order.
    pub block_table: &'a [u32],
}

/// Slot (row of the flattened `[num_blocks * block_size]` cache) of position `pos` of a sequence.
#[inline]
pub fn slot(block_table: &[u32], block_size: usize, pos: usize) -> usize {
    block_table[pos / block_size] as usize * block_size + pos % block_size
}

/// Stores new keys and values (`[tokens, num_kv_heads, head_dim]`) at the given cache slots.
pub fn write_kv(k: &[f32], v: &[f32], k_cache: &mut [f32], v_cache: &mut [f32], slots: &[usize], row: usize) {
    for (t, &s) in slots.iter().enumerate() {
        k_cache[s * row..(s + 1) * row].copy_from_slice(&k[t * row..(t + 1) * row]);
        v_cache[s * row..(s + 1) * row].copy_from_slice(&v[t * row..(t + 1) * row]);
    }
}

/// `out[t, h] = softmax(q[t, h] · Kᵀ · scale) · V` over each token's visible positions.
/// `q` and `out` are `[tokens, num_heads, head_dim]`; inputs were validated by `ops::paged_attention`.
pub fn paged_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[AttentionSeq<'_>],
    s: &AttentionShape,
    out: &mut [f32],
) {
    let (hd, nh) = (s.head_dim, s.num_heads);
    let group = nh / s.num_kv_heads;
    let kv_row = s.num_kv_heads * hd;
    // (sequence, position) of every query row, so rows can be processed independently in parallel.
    let mut owner = vec![(0usize, 0usize); out.len() / (nh * hd)];
    for (si, seq) in seqs.iter().enumerate() {
        for i in 0..seq.q_len {
            owner[seq.q_start + i] = (si, seq.pos0 + i);
        }
    }
    out.par_chunks_mut(nh * hd).zip(q.par_chunks(nh * hd)).zip(owner.par_iter()).for_each(
        |((o_tok, q_tok), &(si, pos))| {
            let seq = &seqs[si];
            let first = match s.sliding_window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let mut scores = vec![0f32; pos + 1 - first];
            for h in 0..nh {
                let kvh = h / group;
                let qh = &q_tok[h * hd..(h + 1) * hd];
                for (j, sc) in (first..=pos).zip(scores.iter_mut()) {
                    let base = slot(seq.block_table, s.block_size, j) * kv_row + kvh * hd;
                    *sc = dot(qh, &k_cache[base..base + hd]) * s.scale;
                }
                softmax_inplace(&mut scores);
                let oh = &mut o_tok[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                for (j, &p) in (first..=pos).zip(scores.iter()) {
                    let base = slot(seq.block_table, s.block_size, j) * kv_row + kvh * hd;
                    for (ov, &vv) in oh.iter_mut().zip(&v_cache[base..base + hd]) {
                        *ov += p * vv;
                    }
                }
            }
        },
    );
}
