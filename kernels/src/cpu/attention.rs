//! Attention over a paged KV cache, for a batch that mixes prefill chunks and single-token decodes.
//!
//! The cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]`; a sequence's position `p`
//! lives in block `block_table[p / block_size]` at offset `p % block_size`. Each query token attends
//! causally to its own sequence's positions, optionally limited to a sliding window, with grouped-query
//! attention mapping query head `h` to KV head `h / (num_heads / num_kv_heads)`.

use rayon::prelude::*;

use super::matmul::dot;

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
    let width = s.num_heads * s.head_dim;
    // (sequence, position) of every query row, so rows can be processed independently in parallel.
    let mut owner = vec![(0usize, 0usize); out.len() / width];
    for (si, seq) in seqs.iter().enumerate() {
        for i in 0..seq.q_len {
            owner[seq.q_start + i] = (si, seq.pos0 + i);
        }
    }
    let (attend, whole_rows) = attend_fn(s);
    // Work items: a query row's heads that share a KV head (so a decode of one sequence still spreads over
    // the threads), or whole rows for the kernel that takes eight heads at a time.
    let heads = if whole_rows { s.num_heads } else { s.num_heads / s.num_kv_heads };
    let per_row = s.num_heads / heads;
    let item = heads * s.head_dim;
    out.par_chunks_mut(item).zip(q.par_chunks(item)).enumerate().for_each_init(
        Vec::new,
        |scores, (i, (o_part, q_part))| {
            let (si, pos) = owner[i / per_row];
            let h0 = i % per_row * heads;
            let row = Row { q: q_part, h0, k_cache, v_cache, block_table: seqs[si].block_table, pos, shape: s };
            attend(&row, scores, o_part)
        },
    );
}

/// One query token's inputs: its heads `h0..` (those `q` holds), which the output slice matches.
struct Row<'a> {
    q: &'a [f32],
    h0: usize,
    k_cache: &'a [f32],
    v_cache: &'a [f32],
    block_table: &'a [u32],
    pos: usize,
    shape: &'a AttentionShape,
}

/// The cache rows a query sees (its own sequence's positions up to its own, within the sliding window), as
/// runs inside one block: (first row, number of rows); and how many positions that is. Walking runs, not
/// positions, spares a division per position.
#[inline(always)]
fn visible_runs<'r>(row: &'r Row<'_>) -> (usize, impl Iterator<Item = (usize, usize)> + Clone + 'r) {
    let bs = row.shape.block_size;
    let first = match row.shape.sliding_window {
        Some(w) => (row.pos + 1).saturating_sub(w),
        None => 0,
    };
    let runs = (first / bs..=row.pos / bs).map(move |b| {
        let start = (b * bs).max(first);
        let end = ((b + 1) * bs).min(row.pos + 1);
        (row.block_table[b] as usize * bs + start - b * bs, end - start)
    });
    (row.pos + 1 - first, runs)
}

/// A version of [`attend`].
type Attend = fn(&Row<'_>, &mut Vec<f32>, &mut [f32]);

/// The fastest version of [`attend`] this CPU runs for heads of this shape, and whether it takes whole rows
/// (every head) rather than the heads of one KV head.
fn attend_fn(s: &AttentionShape) -> (Attend, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            if s.head_dim == HEAD_OF_8 {
                // SAFETY (of the call inside): the CPU supports AVX2 and FMA, checked just above.
                return (|row, scores, out| unsafe { heads_of_8::attend(row, scores, out) }, true);
            }
            // SAFETY (of the call inside): the CPU supports AVX2 and FMA, checked just above.
            return (|row, scores, out| unsafe { attend_avx2_fma(row, scores, out) }, false);
        }
    }
    let _ = s;
    (attend_plain, false)
}

/// Head dimension that [`heads_of_8`] handles: one AVX register per head.
const HEAD_OF_8: usize = 8;

/// Attention for heads of 8 values (stories260K's), eight heads at a time.
///
/// One head at a time, every score is a dot product of 8 values: one vector multiply, then a horizontal
/// sum of three dependent steps that costs more than the multiply, and the value pass is a chain of FMAs
/// into one register. Here a position's scores for eight heads come out of one transposed reduction
/// (eight multiplies, six `hadd`s, one cross-lane add: a vector of eight scores), the softmax runs across
/// the eight heads in the lanes of one register, and the value pass keeps eight independent accumulators.
/// Scores are laid out `[position][8 heads]`, one group of eight heads after another.
#[cfg(target_arch = "x86_64")]
mod heads_of_8 {
    use std::arch::x86_64::*;

    use super::{HEAD_OF_8, Row, exp_nonpositive, visible_runs};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend(row: &Row<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
        let s = row.shape;
        let nh = s.num_heads;
        let group = nh / s.num_kv_heads;
        let kv_row = s.num_kv_heads * HEAD_OF_8;
        let (n, runs) = visible_runs(row);
        scores.clear();
        scores.resize(n * 8, 0.0);
        for g in 0..nh.div_ceil(8) {
            // Heads past `nh` in a partial group get a zero query and KV head 0's rows, and are not stored.
            let heads = g * 8..(g * 8 + 8).min(nh);
            let mut offset = [0usize; 8];
            for (o, h) in offset.iter_mut().zip(heads.clone()) {
                *o = (h / group) * HEAD_OF_8;
            }
            // SAFETY: every pointer stays inside its slice. A head's query is `q[h * 8..][..8]` with `h < nh`;
            // cache rows come from the block table, which `ops::paged_attention` checked against the pool,
            // and `offset[i] + 8 <= kv_row`; `scores` holds one vector per position.
            unsafe {
                let mut q = [_mm256_setzero_ps(); 8];
                for (i, h) in heads.clone().enumerate() {
                    q[i] = _mm256_loadu_ps(row.q.as_ptr().add(h * HEAD_OF_8));
                }
                let scale = _mm256_set1_ps(s.scale);
                let sc = scores.as_mut_ptr();
                let mut j = 0;
                for (r0, len) in runs.clone() {
                    for r in r0..r0 + len {
                        let k = row.k_cache.as_ptr().add(r * kv_row);
                        let m = |i: usize| _mm256_mul_ps(q[i], _mm256_loadu_ps(k.add(offset[i])));
                        // Lanes: [sums of lanes 0-3 of m0 m1 m2 m3 | of lanes 4-7], the same for m4..m7; the
                        // two halves added across the 128-bit lanes leave head i's dot product in lane i.
                        let u0 = _mm256_hadd_ps(_mm256_hadd_ps(m(0), m(1)), _mm256_hadd_ps(m(2), m(3)));
                        let u1 = _mm256_hadd_ps(_mm256_hadd_ps(m(4), m(5)), _mm256_hadd_ps(m(6), m(7)));
                        let dots =
                            _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
                        _mm256_storeu_ps(sc.add(j * 8), _mm256_mul_ps(dots, scale));
                        j += 1;
                    }
                }
            }
            // Softmax over positions, a head per lane (the lane loops vectorise).
            let mut max = [f32::NEG_INFINITY; 8];
            for c in scores.chunks_exact(8) {
                for l in 0..8 {
                    max[l] = if c[l] > max[l] { c[l] } else { max[l] };
                }
            }
            let mut sum = [0f32; 8];
            for c in scores.chunks_exact_mut(8) {
                for l in 0..8 {
                    c[l] = exp_nonpositive(c[l] - max[l], |acc, x, y| x.mul_add(y, acc));
                    sum[l] += c[l];
                }
            }
            // SAFETY: as above; `out` holds `nh * 8` values and only heads `h < nh` are stored.
            unsafe {
                let p = scores.as_ptr();
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut j = 0;
                for (r0, len) in runs.clone() {
                    for r in r0..r0 + len {
                        let v = row.v_cache.as_ptr().add(r * kv_row);
                        for i in 0..8 {
                            let w = _mm256_broadcast_ss(&*p.add(j * 8 + i));
                            acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(offset[i])), acc[i]);
                        }
                        j += 1;
                    }
                }
                for (i, h) in heads.enumerate() {
                    let o = _mm256_mul_ps(acc[i], _mm256_set1_ps(1.0 / sum[i]));
                    _mm256_storeu_ps(out.as_mut_ptr().add(h * HEAD_OF_8), o);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2_fma(row: &Row<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let fma = |acc: f32, x: f32, y: f32| x.mul_add(y, acc);
    let hd = row.shape.head_dim;
    if hd >= 16 && hd.is_multiple_of(8) {
        let qk = |q: &[f32], k: &[f32], scale: f32, scores: &mut [f32]| {
            // SAFETY: this function runs only where the CPU has AVX2 and FMA (`attend_fn`).
            unsafe { scores_by_eight(q, k, row.shape.num_kv_heads * hd, scale, scores) }
        };
        attend(row, scores, out, fma, qk)
    } else {
        attend(row, scores, out, fma, |q, k, scale, scores| scores_one_by_one(q, k, row.shape, scale, scores, fma))
    }
}

/// `scores[i] = scale · q · k_i` for the cache rows `k_i` that start every `kv_row` values of `k` (each at
/// the query's KV head), eight at a time: eight rows' products summed lane-wise in eight registers, then
/// one transposed reduction (six `hadd`s, one cross-lane add) gives the eight scores in one register,
/// where a dot product per row would end in a horizontal sum and a call each. Heads a multiple of 8 long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_by_eight(q: &[f32], k: &[f32], kv_row: usize, scale: f32, scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let mut eights = scores.chunks_exact_mut(8);
    let mut i0 = 0;
    for out in &mut eights {
        // Each row's start, its `hd` values checked to be in `k` (plain loops: a closure here is not inlined).
        let mut rows = [k.as_ptr(); 8];
        for (j, r) in rows.iter_mut().enumerate() {
            *r = k[(i0 + j) * kv_row..(i0 + j) * kv_row + hd].as_ptr();
        }
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..hd).step_by(8) {
            // SAFETY: `q` and every row hold `hd` values, a multiple of 8, so `c + 8 <= hd`.
            unsafe {
                let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                for j in 0..8 {
                    acc[j] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(rows[j].add(c)), acc[j]);
                }
            }
        }
        let u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        let u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
        let dots = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
        // SAFETY: `out` is a chunk of eight.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(dots, _mm256_set1_ps(scale))) };
        i0 += 8;
    }
    for (j, score) in eights.into_remainder().iter_mut().enumerate() {
        let at = (i0 + j) * kv_row;
        *score = dot(q, &k[at..at + hd]) * scale;
    }
}

/// [`attend`] without vector extensions.
fn attend_plain(row: &Row<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let fma = |acc: f32, x: f32, y: f32| acc + x * y;
    attend(row, scores, out, fma, |q, k, scale, sc| scores_one_by_one(q, k, row.shape, scale, sc, fma))
}

/// `scores[i] = scale · q · k_i` (as [`scores_by_eight`]), one row at a time.
#[inline(always)]
fn scores_one_by_one(
    q: &[f32],
    k: &[f32],
    s: &AttentionShape,
    scale: f32,
    scores: &mut [f32],
    fma: impl Fn(f32, f32, f32) -> f32 + Copy,
) {
    let (hd, kv_row) = (s.head_dim, s.num_kv_heads * s.head_dim);
    for (i, score) in scores.iter_mut().enumerate() {
        *score = short_dot(q, &k[i * kv_row..i * kv_row + hd], fma) * scale;
    }
}

/// One query token, the heads `row` holds. Positions are walked block by block (no division per position), and
/// everything is inlined into the caller so that, in the AVX2 version, the short dot products and `axpy`s
/// compile to vector FMAs. (Doing the heads that share a KV head together, to read each cached row once,
/// measured slower: the rows are in cache for the next head anyway, and the interleaved loops vectorise
/// worse.)
#[inline(always)]
fn attend(
    row: &Row<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    fma: impl Fn(f32, f32, f32) -> f32 + Copy,
    qk: impl Fn(&[f32], &[f32], f32, &mut [f32]),
) {
    let s = row.shape;
    let hd = s.head_dim;
    let group = s.num_heads / s.num_kv_heads;
    let kv_row = s.num_kv_heads * hd;
    let (n, runs) = visible_runs(row);
    scores.clear();
    scores.resize(n, 0.0);
    for h in 0..row.q.len() / hd {
        let kv = ((row.h0 + h) / group) * hd;
        let q = &row.q[h * hd..(h + 1) * hd];
        let mut j = 0;
        for (slot0, len) in runs.clone() {
            // The run's rows at this KV head: `k` from the first one's, `kv_row` apart.
            let k = &row.k_cache[slot0 * kv_row + kv..(slot0 + len - 1) * kv_row + kv + hd];
            qk(q, k, s.scale, &mut scores[j..j + len]);
            j += len;
        }
        let inv_sum = exp_shifted(scores, fma);
        let o = &mut out[h * hd..(h + 1) * hd];
        o.fill(0.0);
        let mut p = scores.iter();
        for (slot0, len) in runs.clone() {
            // Four positions at a time: one add into `o` per four rows instead of a chain of four FMAs, each
            // waiting on the last (heads of 8 are one vector register: the chain is all there is).
            let mut r = slot0;
            while r + 4 <= slot0 + len {
                let v = |k: usize| &row.v_cache[(r + k) * kv_row + kv..][..hd];
                let (v0, v1, v2, v3) = (v(0), v(1), v(2), v(3));
                let (p0, p1, p2, p3) = (*p.next().unwrap(), *p.next().unwrap(), *p.next().unwrap(), *p.next().unwrap());
                for d in 0..hd {
                    o[d] += fma(p0 * v0[d], p1, v1[d]) + fma(p2 * v2[d], p3, v3[d]);
                }
                r += 4;
            }
            for (base, &p) in (r..slot0 + len).map(|r| r * kv_row + kv).zip(&mut p) {
                for (o, &x) in o.iter_mut().zip(&row.v_cache[base..base + hd]) {
                    *o = fma(*o, p, x);
                }
            }
        }
        for x in o.iter_mut() {
            *x *= inv_sum;
        }
    }
}

/// `x[i] = exp(x[i] - max(x))`; returns `1 / sum(x)`. The exponential is [`exp_nonpositive`], inlined, so
/// that the loop vectorises (libm's `expf` is a call per score).
#[inline(always)]
fn exp_shifted(x: &mut [f32], fma: impl Fn(f32, f32, f32) -> f32 + Copy) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp_nonpositive(c[l] - max, fma);
            lanes[l] += c[l];
        }
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_nonpositive(*v - max, fma);
        sum += *v;
    }
    1.0 / (lanes.iter().sum::<f32>() + sum)
}

/// `e^x` for `x <= 0` (softmax scores less their maximum), within 2 ulp of `f32::exp`: `x = n ln 2 + r`
/// with `|r| <= ln 2 / 2`, `e^r` by Cephes' `expf` polynomial, and `2^n` put straight into the exponent
/// bits. Branch-free, so a loop of it vectorises. Below -87.34, where `expf` turns subnormal, it stays at
/// the smallest normal float (a weight of 1e-38 beside the maximum's 1).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32, fma: impl Fn(f32, f32, f32) -> f32 + Copy) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.336_55);
    // `fma(a, b, c)` is `a + b * c`.
    let n = fma(0.5, x, LOG2E).floor();
    let r = fma(fma(x, n, -LN2_HI), n, -LN2_LO);
    let mut p = 1.987_569_1e-4;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = fma(c, p, r);
    }
    let e_r = fma(r + 1.0, p, r * r);
    // n is in -126..=0 here: a normal power of two.
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Dot product of two head vectors. Heads under 32 values (the small models') go through eight lanes, one
/// vector register, inlined: the 64-lane [`dot`] made for model-width rows spends more on its final
/// reduction than on them. Longer heads call it, out of line (inlined here it measured 15-25% slower on
/// heads of 64 and 128, `kernels/examples/attention_bench.rs`).
#[inline(always)]
fn short_dot(a: &[f32], b: &[f32], fma: impl Fn(f32, f32, f32) -> f32) -> f32 {
    if a.len() >= 32 {
        return dot(a, b);
    }
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = fma(tail, *x, *y);
    }
    for (xa, xb) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = fma(acc[l], xa[l], xb[l]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::exp_nonpositive;

    #[test]
    fn the_inlined_exponential_is_within_two_ulp_of_libm_on_the_softmax_range() {
        let fused = |a: f32, b: f32, c: f32| b.mul_add(c, a);
        let plain = |a: f32, b: f32, c: f32| a + b * c;
        let mut worst = 0f32;
        // Every 1/1024 from -90 to 0, plus a pseudo-random scatter between the grid points.
        let mut seed = 1u32;
        for i in 0..=92_160 {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            for x in [-(i as f32) / 1024.0, -(i as f32 + (seed >> 8) as f32 / (1u32 << 24) as f32) / 1024.0] {
                let want = x.exp();
                for got in [exp_nonpositive(x, fused), exp_nonpositive(x, plain)] {
                    if want < f32::MIN_POSITIVE {
                        assert!(got < 2.0 * f32::MIN_POSITIVE, "e^{x} = {want}, got {got}");
                        continue;
                    }
                    let ulp = (want.to_bits() as i64 - got.to_bits() as i64).unsigned_abs() as f32;
                    worst = worst.max(ulp);
                }
            }
        }
        assert!(worst <= 2.0, "off by {worst} ulp");
        assert_eq!(exp_nonpositive(0.0, fused), 1.0);
        let tiny = exp_nonpositive(-1000.0, fused);
        assert!((0.0..=f32::MIN_POSITIVE * 1.001).contains(&tiny), "{tiny}");
    }
}
