//! Activations quantized for the integer dot products, exactly as llama.cpp's CPU backend quantizes them
//! (`quantize_row_q8_0` and `quantize_row_q8_K` in ggml-cpu), so that a GGUF file computes here what it
//! computes there:
//!
//! - [`ActFormat::Q8_0`] (for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights): per 32 values, levels
//!   `round(x · 127 / amax)` (ties to even) and the step `amax / 127` rounded to f16;
//! - [`ActFormat::Q8_K`] (for the K-quants): per 256 values, levels `min(127, round(x · −127 / max))`
//!   with `max` the value of largest magnitude (its sign included) and the step `1 / (−127 / max)` in f32.
//!
//! Either way each group of 32 gets its own copy of the step, so the dot kernels see one layout.

use half::f16;
use tessera_gguf::GgmlType;

use super::unpack::GROUP;

/// How activations are quantized for a weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ActFormat {
    Q8_0,
    Q8_K,
}

impl ActFormat {
    /// The format llama.cpp pairs with weights of `ty` (its `vec_dot_type`).
    pub fn for_weights(ty: GgmlType) -> Self {
        use GgmlType::*;
        if matches!(ty, Q2_K | Q3_K | Q4_K | Q5_K | Q6_K) { ActFormat::Q8_K } else { ActFormat::Q8_0 }
    }

    /// Values sharing one step.
    pub fn block(self) -> usize {
        match self {
            ActFormat::Q8_0 => GROUP,
            ActFormat::Q8_K => 256,
        }
    }
}

/// `m` rows of `k` activations, quantized.
pub struct QuantizedRows {
    pub k: usize,
    /// `m × k` levels.
    pub q: Vec<i8>,
    /// One step per group of 32: `m × k / 32`.
    pub d: Vec<f32>,
    /// Per group, `step · Σ q` over each half of 16: what a weight offset multiplies.
    pub sums: Vec<[f32; 2]>,
    /// Per group, `Σ q`: what a constant added to the weights' levels adds to an integer dot product.
    pub level_sums: Vec<i32>,
    /// `Σ q` per 16 values, for formats whose levels carry their offset per 16.
    pub half_level_sums: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `x` (`m × k`, `k` a multiple of `format`'s block).
    pub fn new(x: &[f32], k: usize, format: ActFormat) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above), the only feature the copy is compiled for.
            return unsafe { Self::new_avx2(x, k, format) };
        }
        Self::quantize(x, k, format)
    }

    /// [`QuantizedRows::new`] compiled for AVX2: its rounding is then one instruction per eight values, where
    /// the baseline build calls libm's `rintf` per value (5% of a Q4_0 decode step on two cores).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn new_avx2(x: &[f32], k: usize, format: ActFormat) -> Self {
        Self::quantize(x, k, format)
    }

    #[inline(always)]
    fn quantize(x: &[f32], k: usize, format: ActFormat) -> Self {
        debug_assert!(k.is_multiple_of(format.block()));
        let mut q = vec![0i8; x.len()];
        let mut d = Vec::with_capacity(x.len() / GROUP);
        for (xs, qs) in x.chunks_exact(format.block()).zip(q.chunks_exact_mut(format.block())) {
            let step = match format {
                ActFormat::Q8_0 => q8_0(xs, qs),
                ActFormat::Q8_K => q8_k(xs, qs),
            };
            d.extend(std::iter::repeat_n(step, format.block() / GROUP));
        }
        let half_level_sums: Vec<i32> = q.chunks_exact(GROUP / 2).map(|h| h.iter().map(|&v| v as i32).sum()).collect();
        let level_sums = half_level_sums.chunks_exact(2).map(|h| h[0] + h[1]).collect();
        let sums = q
            .chunks_exact(GROUP)
            .zip(&d)
            .map(|(g, &step)| {
                let half = |h: &[i8]| h.iter().map(|&v| v as i32).sum::<i32>() as f32 * step;
                [half(&g[..16]), half(&g[16..])]
            })
            .collect();
        QuantizedRows { k, q, d, sums, level_sums, half_level_sums }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.q.len().checked_div(self.k).unwrap_or(0)
    }

    /// Row `i`'s level sums, one per group.
    pub fn level_sums(&self, i: usize) -> &[i32] {
        let g = self.k / GROUP;
        &self.level_sums[i * g..(i + 1) * g]
    }

    /// Row `i`'s level sums, one per 16 values.
    pub fn half_level_sums(&self, i: usize) -> &[i32] {
        let h = 2 * self.k / GROUP;
        &self.half_level_sums[i * h..(i + 1) * h]
    }

    /// Row `i`: its levels, steps and half sums.
    pub fn row(&self, i: usize) -> (&[i8], &[f32], &[[f32; 2]]) {
        let g = self.k / GROUP;
        (&self.q[i * self.k..(i + 1) * self.k], &self.d[i * g..(i + 1) * g], &self.sums[i * g..(i + 1) * g])
    }
}

/// One Q8_0 block; returns its step.
#[inline(always)]
fn q8_0(xs: &[f32], qs: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (o, &v) in qs.iter_mut().zip(xs) {
        *o = (v * inv).round_ties_even() as i8;
    }
    f16::from_f32(amax / 127.0).to_f32()
}

/// One Q8_K block; returns its step.
#[inline(always)]
fn q8_k(xs: &[f32], qs: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in xs {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        qs.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (o, &v) in qs.iter_mut().zip(xs) {
        *o = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    1.0 / iscale
}
