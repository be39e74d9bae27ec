//! Projections whose weights stay in llama.cpp's block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q6_K):
//! `out = x · wᵀ (+ bias)` with `w` a `[n, k]` matrix of blocks, row after row.
//!
//! - [`unpack`]: every format decoded into one shape, small integers with a step and an offset per 16
//!   values;
//! - [`act`]: activations quantized to int8 as llama.cpp quantizes them for its dot products (Q8_0 per 32
//!   values, Q8_K per 256 for the K-quants);
//! - [`random`]: random matrices in a block format, for benchmarks;
//! - [`dot`]: the integer dot product of a decoded weight row and an activation row (AVX2 at run time);
//! - `direct` (x86-64): kernels for Q8_0, Q4_0, Q4_K and Q6_K that decode in registers and dot a weight row
//!   with up to eight activation rows at a time, used whenever the CPU has AVX2, FMA and F16C (an AVX-VNNI
//!   or AVX-512 VNNI build where it has one of those too).
//!
//! Up to [`INT8_MAX_ROWS`] input rows (decode and batched decode), each weight row is decoded once and
//! dotted with every input row while it is in cache: the weights are read once per step whatever the
//! batch. Larger inputs (prefill) dequantize tiles of weight rows to f32 and multiply them with the `gemm`
//! crate, where the arithmetic, not the reading, is the cost.

pub mod act;
#[cfg(target_arch = "x86_64")]
pub mod direct;
pub mod dot;
pub mod random;
pub mod unpack;

use rayon::prelude::*;
use tessera_gguf::GgmlType;

pub use self::unpack::supported;
use self::{
    act::{ActFormat, QuantizedRows},
    dot::{Operands, dot},
    unpack::{GROUP, Scales, has_offsets, unpack_row},
};

/// At or below this many input rows the int8 path is used. Measured on the 124.7M shape in Q8_0 (2 cores):
/// the int8 path costs ~6 ms per input row per step, the dequantizing one ~70 ms plus ~3.3 ms per row, so
/// they cross near 24 rows (16 rows: 96 against 147 ms; 64 rows: 397 against 279 ms).
pub const INT8_MAX_ROWS: usize = 24;

/// Rayon tasks per thread on the int8 path, and the fewest weight rows a task gets.
const TASKS_PER_THREAD: usize = 4;
const MIN_ROWS_PER_TASK: usize = 16;

/// Weight rows dequantized at once on the prefill path (a few MB of f32 at most).
const TILE_ROWS: usize = 256;

/// Bytes of one row of `k` values of `ty`.
pub fn row_bytes(ty: GgmlType, k: usize) -> usize {
    k / ty.block_size() * ty.type_size()
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`, `w` being `n` rows of `ty` blocks. The caller has checked
/// that `ty` is [`supported`], `k` is whole blocks and the lengths match.
#[allow(clippy::too_many_arguments)]
pub fn linear(x: &[f32], ty: GgmlType, w: &[u8], bias: Option<&[f32]>, out: &mut [f32], m: usize, k: usize, n: usize) {
    debug_assert!(supported(ty) && k.is_multiple_of(ty.block_size()));
    debug_assert_eq!(w.len(), n * row_bytes(ty, k));
    debug_assert_eq!((x.len(), out.len()), (m * k, m * n));
    if m == 0 || n == 0 {
        return;
    }
    if m <= INT8_MAX_ROWS {
        int8_rows(x, ty, w, out, m, k, n);
    } else {
        dequantized_tiles(x, ty, w, out, m, k, n);
    }
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(n) {
            for (o, &bv) in row.iter_mut().zip(b) {
                *o += bv;
            }
        }
    }
}

fn int8_rows(x: &[f32], ty: GgmlType, w: &[u8], out: &mut [f32], m: usize, k: usize, n: usize) {
    let acts = QuantizedRows::new(x, k, ActFormat::for_weights(ty));
    let rb = row_bytes(ty, k);
    #[cfg(target_arch = "x86_64")]
    let direct = direct::available(ty);
    #[cfg(not(target_arch = "x86_64"))]
    let direct = false;
    // Fills `o`, weight rows from `j0` on, each with its `m` results (the transpose of `out`'s layout).
    let fill = |j0: usize, o: &mut [f32]| {
        let (mut wq, mut ws): (Vec<i8>, Vec<Scales>) =
            if direct { (Vec::new(), Vec::new()) } else { (vec![0i8; k], vec![[0.0; 4]; k / GROUP]) };
        for (jj, vals) in o.chunks_exact_mut(m).enumerate() {
            let row = &w[(j0 + jj) * rb..(j0 + jj + 1) * rb];
            #[cfg(target_arch = "x86_64")]
            if direct {
                for (c, chunk) in vals.chunks_mut(direct::ROWS).enumerate() {
                    direct::dot_rows(ty, row, &acts, c * direct::ROWS, chunk);
                }
                continue;
            }
            unpack_row(ty, row, &mut wq, &mut ws);
            for (i, v) in vals.iter_mut().enumerate() {
                let (xq, xd, xs) = acts.row(i);
                *v = dot(&Operands { wq: &wq, ws: &ws, xq, xd, xs, offsets: has_offsets(ty) });
            }
        }
    };
    // A few tasks per thread: enough to balance, few enough that scheduling them costs nothing.
    let per_task = n.div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD).max(MIN_ROWS_PER_TASK);
    if m == 1 {
        out.par_chunks_mut(per_task).enumerate().for_each(|(t, o)| fill(t * per_task, o));
        return;
    }
    let mut by_row = vec![0f32; n * m];
    by_row.par_chunks_mut(per_task * m).enumerate().for_each(|(t, o)| fill(t * per_task, o));
    for (j, vals) in by_row.chunks_exact(m).enumerate() {
        for (i, &v) in vals.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
}

fn dequantized_tiles(x: &[f32], ty: GgmlType, w: &[u8], out: &mut [f32], m: usize, k: usize, n: usize) {
    let rb = row_bytes(ty, k);
    let mut tile = vec![0f32; TILE_ROWS.min(n) * k];
    let mut stripe = vec![0f32; TILE_ROWS.min(n) * m];
    for j0 in (0..n).step_by(TILE_ROWS) {
        let rows = TILE_ROWS.min(n - j0);
        let (tile, stripe) = (&mut tile[..rows * k], &mut stripe[..rows * m]);
        tile.par_chunks_mut(k).enumerate().for_each(|(r, dst)| {
            let src = &w[(j0 + r) * rb..(j0 + r + 1) * rb];
            let done = tessera_gguf::dequantize(ty, src, dst);
            debug_assert!(done.is_ok(), "the caller checked the type and the lengths: {done:?}");
        });
        super::matmul::gemm_xwt(x, tile, stripe, m, k, rows);
        for (dst, src) in out.chunks_exact_mut(n).zip(stripe.chunks_exact(rows)) {
            dst[j0..j0 + rows].copy_from_slice(src);
        }
    }
}
