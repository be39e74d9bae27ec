//! Element-wise and gather ops: residual add, SiLU-and-multiply, softmax, embedding gather.

use rayon::prelude::*;

/// `x += y`.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `out = silu(gate) * up`, with `silu(g) = g / (1 + e^-g)`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert_eq!(gate.len(), up.len());
    debug_assert_eq!(gate.len(), out.len());
    const CHUNK: usize = 4096;
    out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(o, (g, u))| {
        for ((ov, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
            *ov = gv / (1.0 + (-gv).exp()) * uv;
        }
    });
}

/// Numerically stable softmax of one row, in place.
pub fn softmax_inplace(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Softmax over every row of width `n`.
pub fn softmax_rows(x: &mut [f32], n: usize) {
    x.par_chunks_mut(n).for_each(softmax_inplace);
}

/// `out[t] = table[ids[t]]` for a `[vocab, h]` table. Ids were range-checked by the caller.
pub fn embedding(ids: &[u32], table: &[f32], h: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), ids.len() * h);
    for (row, &id) in out.chunks_exact_mut(h).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * h..(id + 1) * h]);
    }
}
