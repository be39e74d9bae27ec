//! RMSNorm, as Llama defines it: `x / sqrt(mean(x²) + eps) * weight`, row by row.

use rayon::prelude::*;

/// Rows per rayon task: a row is only `hidden` elements, so batch several.
const ROWS_PER_TASK: usize = 16;

/// `out[r] = x[r] / rms(x[r]) * weight` for every row of width `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let h = weight.len();
    debug_assert_eq!(x.len(), out.len());
    out.par_chunks_mut(h * ROWS_PER_TASK).zip(x.par_chunks(h * ROWS_PER_TASK)).for_each(|(o, xi)| {
        for (orow, xrow) in o.chunks_exact_mut(h).zip(xi.chunks_exact(h)) {
            let ss: f32 = super::matmul::dot(xrow, xrow);
            let inv = 1.0 / (ss / h as f32 + eps).sqrt();
            for ((ov, &xv), &wv) in orow.iter_mut().zip(xrow).zip(weight) {
                *ov = wv * (xv * inv);
            }
        }
    });
}
