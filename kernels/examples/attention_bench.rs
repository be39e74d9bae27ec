//! Paged attention on the CPU, side by side with the straightforward version it replaced (one head at a
//! time, a position at a time, the cache slot found by division, the 64-lane `dot`), for decode batches of
//! three shapes: stories260K's heads of 8, the synthetic 124.7M model's of 64, and Llama 3 8B's of 128.
//! Run: `cargo run --release -p tessera-kernels --example attention_bench`. Figures are in BENCHMARKS.md.
//!
//! Bytes: every decoding token reads its sequence's keys and values once per KV head (the heads that share
//! it find them in cache), so a step reads `sequences * context * kv_heads * head_dim * 4 * 2` bytes.

#[path = "common/timing.rs"]
mod timing;

use rayon::prelude::*;
use tessera_kernels::cpu::{
    attention::{AttentionSeq, AttentionShape, paged_attention, slot},
    elementwise::softmax_inplace,
    matmul::dot,
};
use timing::time;

/// The first version of the kernel, kept here as the baseline.
fn straightforward(q: &[f32], kc: &[f32], vc: &[f32], seqs: &[AttentionSeq<'_>], s: &AttentionShape, out: &mut [f32]) {
    let (hd, nh) = (s.head_dim, s.num_heads);
    let group = nh / s.num_kv_heads;
    let kv_row = s.num_kv_heads * hd;
    let owner: Vec<(usize, usize)> =
        seqs.iter().enumerate().flat_map(|(i, seq)| (0..seq.q_len).map(move |t| (i, seq.pos0 + t))).collect();
    out.par_chunks_mut(nh * hd).zip(q.par_chunks(nh * hd)).zip(owner.par_iter()).for_each(
        |((o_tok, q_tok), &(si, pos))| {
            let table = seqs[si].block_table;
            let mut scores = vec![0f32; pos + 1];
            for h in 0..nh {
                let kv = (h / group) * hd;
                let qh = &q_tok[h * hd..(h + 1) * hd];
                for (j, sc) in scores.iter_mut().enumerate() {
                    let base = slot(table, s.block_size, j) * kv_row + kv;
                    *sc = dot(qh, &kc[base..base + hd]) * s.scale;
                }
                softmax_inplace(&mut scores);
                let oh = &mut o_tok[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    let base = slot(table, s.block_size, j) * kv_row + kv;
                    for (o, &v) in oh.iter_mut().zip(&vc[base..base + hd]) {
                        *o += p * v;
                    }
                }
            }
        },
    );
}

fn random(n: usize, state: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn main() {
    let (block_size, context, batch) = (16usize, 160usize, 64usize);
    println!(
        "decode batch {batch}, context {context}, block size {block_size}, {} threads",
        rayon::current_num_threads()
    );
    println!("{:<22} {:>14} {:>10} {:>10} {:>8}", "heads (q/kv x dim)", "baseline ms", "now ms", "now GB/s", "speedup");
    for (name, nh, nkv, hd) in
        [("stories260K 8/4 x 8", 8, 4, 8), ("124.7M 12/4 x 64", 12, 4, 64), ("Llama3-8B 32/8 x 128", 32, 8, 128)]
    {
        let per_seq = context.div_ceil(block_size);
        let num_blocks = per_seq * batch;
        let row = nkv * hd;
        let mut state = 7;
        let (kc, vc) =
            (random(num_blocks * block_size * row, &mut state), random(num_blocks * block_size * row, &mut state));
        let q = random(batch * nh * hd, &mut state);
        // Sequences' blocks interleaved through the pool, as on a busy server.
        let tables: Vec<Vec<u32>> =
            (0..batch).map(|s| (0..per_seq).map(|b| (b * batch + s) as u32).collect()).collect();
        let seqs: Vec<AttentionSeq> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| AttentionSeq { q_start: i, q_len: 1, pos0: context - 1, block_table: t })
            .collect();
        let shape = AttentionShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size,
            scale: 1.0 / (hd as f32).sqrt(),
            sliding_window: None,
        };
        let (mut want, mut got) = (vec![0f32; batch * nh * hd], vec![0f32; batch * nh * hd]);
        let reps = (2_000_000 / (batch * context * nh * hd)).clamp(5, 200);
        let base = time(reps, || straightforward(&q, &kc, &vc, &seqs, &shape, &mut want));
        let now = time(reps, || paged_attention(&q, &kc, &vc, &seqs, &shape, &mut got));
        let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{name}: the two versions differ by {worst}");
        let bytes = (batch * context * row * 4 * 2) as f64;
        println!(
            "{name:<22} {:>14.3} {:>10.3} {:>10.1} {:>7.2}x",
            base * 1e3,
            now * 1e3,
            bytes / now / 1e9,
            base / now
        );
    }
}
