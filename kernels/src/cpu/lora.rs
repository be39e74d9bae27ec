//! LoRA deltas on the CPU: for the rows of one adapter, `y[row, col0..] += scale · B·(A·x[row])`, straight
//! from the rows of `x` (no gathered copy) and through two short loops instead of two GEMM calls: a decode
//! batch gives each adapter a few rows, where a general GEMM's setup costs more than its arithmetic.
//!
//! The jobs of one projection (every adapter of the batch, every target of a fused projection) are
//! independent: their deltas are computed in parallel, then added in order.

use rayon::prelude::*;

use super::matmul::dot;

/// One adapter's delta to one band of columns of `y`.
pub struct Job<'a> {
    /// Rows of `x` and `y`, strictly increasing.
    pub rows: &'a [u32],
    /// First column of `y` the delta goes to.
    pub col0: usize,
    /// `[rank, in]`.
    pub a: &'a [f32],
    /// `[out, rank]`.
    pub b: &'a [f32],
    pub rank: usize,
    pub out: usize,
    pub scale: f32,
}

/// Rows of one job computed together: a prefill chunk of one adapter is split so both cores share it.
const ROWS_PER_TASK: usize = 16;

/// Adds every job's delta to `y` (`[?, y_cols]`) for input `x` (`[?, x_cols]`).
pub fn add_lora(y: &mut [f32], y_cols: usize, x: &[f32], x_cols: usize, jobs: &[Job<'_>]) {
    let tasks: Vec<(usize, &[u32])> =
        jobs.iter().enumerate().flat_map(|(j, job)| job.rows.chunks(ROWS_PER_TASK).map(move |r| (j, r))).collect();
    let deltas: Vec<Vec<f32>> = tasks.par_iter().map(|&(j, rows)| delta(x, x_cols, &jobs[j], rows)).collect();
    for ((j, rows), d) in tasks.iter().zip(&deltas) {
        let job = &jobs[*j];
        for (&row, dr) in rows.iter().zip(d.chunks_exact(job.out)) {
            let start = row as usize * y_cols + job.col0;
            for (o, v) in y[start..start + job.out].iter_mut().zip(dr) {
                *o += v;
            }
        }
    }
}

/// `scale · B·(A·x[row])` for each of `rows`, `[rows, out]`.
fn delta(x: &[f32], x_cols: usize, job: &Job<'_>, rows: &[u32]) -> Vec<f32> {
    let (r, out) = (job.rank, job.out);
    let mut u = vec![0f32; rows.len() * r];
    for (ui, &row) in u.chunks_exact_mut(r).zip(rows) {
        let xr = &x[row as usize * x_cols..(row as usize + 1) * x_cols];
        for (k, uk) in ui.iter_mut().enumerate() {
            *uk = dot(&job.a[k * x_cols..(k + 1) * x_cols], xr);
        }
    }
    let mut d = vec![0f32; rows.len() * out];
    for (c, bc) in job.b.chunks_exact(r).enumerate() {
        for (i, ui) in u.chunks_exact(r).enumerate() {
            d[i * out + c] = short_dot(bc, ui) * job.scale;
        }
    }
    d
}

/// A dot product of rank length (tens of elements): eight lanes the compiler vectorizes, no long-vector
/// setup.
#[inline]
fn short_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(p, q)| p * q).sum();
    for (xa, xb) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += xa[l] * xb[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}
