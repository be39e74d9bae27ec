//! Dense projections: `out = x · wᵀ (+ bias)` with `w` stored `[out_features, in_features]` as in
//! Hugging Face checkpoints.
//!
//! Two paths. Prefill-sized inputs go to the `gemm` crate (packed, cache-blocked, runtime SIMD dispatch).
//! Decode-sized inputs (a few rows) are memory-bound on reading `w`: a row-parallel GEMV streams each
//! weight row once and dots it with every input row while it is in cache, which is what reaches the
//! bandwidth roofline.

use rayon::prelude::*;

/// At or below this many input rows the GEMV path is used.
pub const GEMV_MAX_ROWS: usize = 8;

/// Weight rows handed to one rayon task in the GEMV path: large enough to amortise scheduling,
/// small enough to balance two to dozens of threads.
const GEMV_ROWS_PER_TASK: usize = 64;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`.
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32], m: usize, k: usize, n: usize) {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    debug_assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if m <= GEMV_MAX_ROWS {
        gemv(x, w, out, m, k, n);
    } else {
        gemm_xwt(x, w, out, m, k, n);
    }
    if let Some(b) = bias {
        debug_assert_eq!(b.len(), n);
        for row in out.chunks_exact_mut(n) {
            for (o, &bv) in row.iter_mut().zip(b) {
                *o += bv;
            }
        }
    }
}

/// `out[m, n] = a[m, k] · b[k, n]` for row-major `a` and `b`, through the `gemm` crate.
pub fn matmul(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    debug_assert_eq!(a.len(), m * k);
    debug_assert_eq!(b.len(), k * n);
    debug_assert_eq!(out.len(), m * n);
    // SAFETY: the strides describe row-major buffers whose lengths were checked above (and by ops::).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m * n * k),
        );
    }
}

pub(crate) fn gemm_xwt(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    // wᵀ as a [k, n] matrix: element (kk, j) is w[j * k + kk], so its column stride is k and row stride 1.
    // SAFETY: strides describe the buffers checked in `linear`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m * n * k),
        );
    }
}

fn parallelism(flops: usize) -> gemm::Parallelism {
    // Below ~1 MFLOP the fork/join costs more than it saves.
    if flops < (1 << 20) || rayon::current_num_threads() == 1 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    }
}

fn gemv(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    // Work is split over weight rows; each task writes a column stripe of `out`, so it collects its
    // results into a local buffer and they are scattered afterwards (out is [m, n], stripes are strided).
    let tasks = n.div_ceil(GEMV_ROWS_PER_TASK);
    let mut stripes: Vec<Vec<f32>> = vec![Vec::new(); tasks];
    stripes.par_iter_mut().enumerate().for_each(|(t, stripe)| {
        let j0 = t * GEMV_ROWS_PER_TASK;
        let j1 = (j0 + GEMV_ROWS_PER_TASK).min(n);
        stripe.resize((j1 - j0) * m, 0.0);
        for j in j0..j1 {
            let wr = &w[j * k..(j + 1) * k];
            for i in 0..m {
                stripe[(j - j0) * m + i] = dot(&x[i * k..(i + 1) * k], wr);
            }
        }
    });
    for (t, stripe) in stripes.iter().enumerate() {
        let j0 = t * GEMV_ROWS_PER_TASK;
        for (jj, vals) in stripe.chunks_exact(m).enumerate() {
            for (i, &v) in vals.iter().enumerate() {
                out[i * n + j0 + jj] = v;
            }
        }
    }
}

/// Dot product over independent accumulator lanes, so the loop is limited by memory rather than by the
/// latency of one long chain of float adds; on x86-64 a build of the same loop with AVX2 and FMA is picked
/// at run time. The summation order depends only on the length, never on the caller or the batch.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot_avx2_fma(a, b) };
        }
    }
    dot_lanes(a, b, |acc, x, y| acc + x * y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b, |acc, x, y| x.mul_add(y, acc))
}

/// 64 lanes: eight 256-bit accumulators, enough to hide FMA latency at two FMAs per cycle.
const LANES: usize = 64;

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32], fma: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = fma(acc[l], xa[l], xb[l]);
        }
    }
    let mut tail = 0f32;
    for (p, q) in ta.iter().zip(tb) {
        tail = fma(tail, *p, *q);
    }
    // Pairwise reduction of the lanes (also vectorises).
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0] + tail
}
