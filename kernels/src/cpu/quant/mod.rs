//! Projections whose weights stay in llama.cpp's block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q6_K):
//! `out = x · wᵀ (+ bias)` with `w` a `[n, k]` matrix of blocks, row after row.
//!
//! - [`unpack`]: every format decoded into one shape, small integers with a step and an offset per 16
//!   values;
//! - [`act`]: activations quantized to int8 as llama.cpp quantizes them for its dot products (Q8_0 per 32
//!   values, Q8_K per 256 for the K-quants);
//! - [`random`]: random matrices in a block format, for benchmarks;
//! - [`dot`]: the integer dot product of a decoded weight row and an activation row (AVX2 at run time);
//! - [`matrix`]: the matrix as the CPU keeps it: Q8_0, Q4_0, Q4_K and Q6_K rows interleaved eight at a time
//!   where the CPU runs `interleaved` (x86-64 with AVX2, FMA and F16C; VNNI builds where it has AVX-VNNI
//!   or AVX-512 VNNI), the kernels that dot such a group of rows with up to eight activation rows.
//!
//! Interleaved matrices take the int8 path for every batch, prefill included (measured faster than
//! dequantizing into the f32 GEMM): a group of eight weight rows stays in cache while every input row
//! passes it. Other matrices take it up to [`INT8_MAX_ROWS`] input rows, each weight row decoded once and
//! dotted with every input row while it is in cache; larger inputs dequantize tiles of weight rows to f32
//! and multiply them with the `gemm` crate.

pub mod act;
pub mod dot;
#[cfg(target_arch = "x86_64")]
pub mod interleaved;
pub mod matrix;
pub mod random;
pub mod unpack;

use rayon::prelude::*;
use tessera_gguf::GgmlType;

use self::{
    act::{ActFormat, QuantizedRows},
    dot::{Operands, dot},
    unpack::{GROUP, Scales, has_offsets, unpack_row},
};
pub use self::{matrix::QuantMatrix, unpack::supported};

/// At or below this many input rows a matrix that is not interleaved takes the int8 path. Measured on the
/// 124.7M shape in Q8_0 before Q8_0 was interleaved (2 cores): a row at a time, the int8 path cost ~6 ms per
/// input row per step, the dequantizing one ~70 ms plus ~3.3 ms per row, so they crossed near 24 rows
/// (16 rows: 96 against 147 ms; 64 rows: 397 against 279 ms).
pub const INT8_MAX_ROWS: usize = 24;

/// Rayon tasks per thread on the int8 path, and the fewest weight rows a task gets.
const TASKS_PER_THREAD: usize = 4;
const MIN_ROWS_PER_TASK: usize = 16;

/// Bytes of interleaved weights that every input row passes before a task moves on (more than eight input
/// rows): they stay in L2 (1–2 MB a core on current x86) rather than being read again from memory for each
/// eight rows, which a large matrix's share per task (a 32000-row output projection's is megabytes) would be.
const CACHED_WEIGHT_BYTES: usize = 256 << 10;

/// Weight rows dequantized at once on the prefill path (a few MB of f32 at most).
const TILE_ROWS: usize = 256;

/// Bytes of one row of `k` values of `ty`.
pub fn row_bytes(ty: GgmlType, k: usize) -> usize {
    k / ty.block_size() * ty.type_size()
}

/// Whether `linear` quantizes `m` input rows to int8 for `w` (where it does not, it multiplies in f32).
pub fn int8_inputs(w: &QuantMatrix, m: usize) -> bool {
    w.packed_rows() > 0 || m <= INT8_MAX_ROWS
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`, `w` being `n` rows of `k` values in a block format the
/// caller has checked is [`supported`]; the lengths match.
pub fn linear(x: &[f32], w: &QuantMatrix, bias: Option<&[f32]>, out: &mut [f32], m: usize) {
    let (ty, k, n) = (w.ty(), w.cols(), w.rows());
    debug_assert!(supported(ty) && k.is_multiple_of(ty.block_size()));
    debug_assert_eq!((x.len(), out.len()), (m * k, m * n));
    if m == 0 || n == 0 {
        return;
    }
    if w.packed_rows() > 0 {
        // Only x86-64 interleaves.
        #[cfg(target_arch = "x86_64")]
        interleaved_rows(x, w, out, m);
    } else if m <= INT8_MAX_ROWS {
        int8_rows(x, ty, w.raw(), out, m, k, n);
    } else {
        dequantized_tiles(x, w, out, m);
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
    // Fills `o`, weight rows from `j0` on, each with its `m` results (the transpose of `out`'s layout).
    let fill = |j0: usize, o: &mut [f32]| {
        let (mut wq, mut ws) = (vec![0i8; k], vec![[0.0; 4]; k / GROUP]);
        for (jj, vals) in o.chunks_exact_mut(m).enumerate() {
            dot_decoded(ty, &w[(j0 + jj) * rb..(j0 + jj + 1) * rb], &acts, (&mut wq, &mut ws), vals);
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

/// `vals[i] = row · x[i]` for every activation row, the weight row decoded into `wq` and `ws` first.
fn dot_decoded(
    ty: GgmlType,
    row: &[u8],
    acts: &QuantizedRows,
    (wq, ws): (&mut Vec<i8>, &mut Vec<Scales>),
    vals: &mut [f32],
) {
    unpack_row(ty, row, wq, ws);
    for (i, v) in vals.iter_mut().enumerate() {
        let (xq, xd, xs) = acts.row(i);
        *v = dot(&Operands { wq, ws, xq, xd, xs, offsets: has_offsets(ty) });
    }
}

/// The output matrix, written by tasks that each own a set of its columns.
#[cfg(target_arch = "x86_64")]
struct Columns {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint elements (`Columns::put`'s contract); the matrix outlives them (a scope).
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Columns {}

#[cfg(target_arch = "x86_64")]
impl Columns {
    /// Writes `vals` at `at`.
    ///
    /// # Safety
    /// No other task writes or reads any of these elements while the matrix is shared.
    unsafe fn put(&self, at: usize, vals: &[f32]) {
        assert!(at + vals.len() <= self.len);
        // SAFETY: in bounds (asserted); exclusive by the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.ptr.add(at), vals.len()) };
    }
}

/// `linear` for an interleaved matrix: tasks take runs of groups, and pass every input row, eight at a
/// time, over a few of their groups at a time ([`CACHED_WEIGHT_BYTES`]) while those weights are in cache.
/// The rows after the last group are decoded one by one.
#[cfg(target_arch = "x86_64")]
fn interleaved_rows(x: &[f32], w: &QuantMatrix, out: &mut [f32], m: usize) {
    use self::matrix::GROUP_ROWS;
    let (ty, k, n) = (w.ty(), w.cols(), w.rows());
    let acts = QuantizedRows::new(x, k, ActFormat::for_weights(ty));
    let gb = GROUP_ROWS * row_bytes(ty, k);
    let groups = w.packed_rows() / GROUP_ROWS;
    let per_task = groups.div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD).max(MIN_ROWS_PER_TASK / GROUP_ROWS);
    let cols = Columns { ptr: out.as_mut_ptr(), len: out.len() };
    let raw = w.raw();
    // Groups passed by every input row before the next ones: what stays in L2 meanwhile.
    let run = (CACHED_WEIGHT_BYTES / gb).max(1);
    (0..groups.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let (g0, g1) = (t * per_task, ((t + 1) * per_task).min(groups));
        let mut res = vec![[0f32; GROUP_ROWS]; run.min(g1 - g0) * interleaved::ROWS];
        for r0 in (g0..g1).step_by(run) {
            let r1 = (r0 + run).min(g1);
            for i0 in (0..m).step_by(interleaved::ROWS) {
                let rows = interleaved::ROWS.min(m - i0);
                let res = &mut res[..(r1 - r0) * rows];
                interleaved::dot_groups(ty, &raw[r0 * gb..r1 * gb], &acts, i0, rows, res);
                for (g, vals) in (r0..r1).zip(res.chunks_exact(rows)) {
                    for (r, vals) in vals.iter().enumerate() {
                        // SAFETY: columns g·8..g·8+8 belong to this task's group g alone.
                        unsafe { cols.put((i0 + r) * n + g * GROUP_ROWS, vals) };
                    }
                }
            }
        }
    });
    // At most seven rows: decoded one at a time.
    let rb = row_bytes(ty, k);
    let (mut wq, mut ws, mut vals) = (vec![0i8; k], vec![[0.0; 4]; k / GROUP], vec![0f32; m]);
    for j in w.packed_rows()..n {
        dot_decoded(ty, &raw[j * rb..(j + 1) * rb], &acts, (&mut wq, &mut ws), &mut vals);
        for (i, &v) in vals.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
}

fn dequantized_tiles(x: &[f32], w: &QuantMatrix, out: &mut [f32], m: usize) {
    let (k, n) = (w.cols(), w.rows());
    let mut tile = vec![0f32; TILE_ROWS.min(n) * k];
    let mut stripe = vec![0f32; TILE_ROWS.min(n) * m];
    for j0 in (0..n).step_by(TILE_ROWS) {
        let rows = TILE_ROWS.min(n - j0);
        let (tile, stripe) = (&mut tile[..rows * k], &mut stripe[..rows * m]);
        tile.par_chunks_mut(k).enumerate().for_each(|(r, dst)| {
            let done = w.dequantize_rows(j0 + r, j0 + r + 1, dst);
            debug_assert!(done.is_ok(), "the caller checked the type and the lengths: {done:?}");
        });
        super::matmul::gemm_xwt(x, tile, stripe, m, k, rows);
        for (dst, src) in out.chunks_exact_mut(n).zip(stripe.chunks_exact(rows)) {
            dst[j0..j0 + rows].copy_from_slice(src);
        }
    }
}
