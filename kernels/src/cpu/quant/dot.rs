//! The integer dot product of one decoded weight row ([`super::unpack`]) with one quantized activation row
//! ([`super::act`]): per group of 32, two sums of i8·i8 products (one per half), scaled by the weight's
//! steps and the activation's step, minus the weight's offsets times the activation's half sums.
//!
//! On x86-64 with AVX2 and FMA (checked at run time) a group is one `maddubs`/`madd` pair and one FMA
//! into eight f32 lanes; elsewhere a plain loop. Either way the summation order depends only on the row
//! length, never on the batch, so a sequence's logits do not change with what it is batched with.

use super::unpack::{GROUP, Scales};

/// One weight row against one activation row.
pub struct Operands<'a> {
    pub wq: &'a [i8],
    pub ws: &'a [Scales],
    pub xq: &'a [i8],
    pub xd: &'a [f32],
    pub xs: &'a [[f32; 2]],
    /// Whether the weight format has offsets to subtract.
    pub offsets: bool,
}

/// `Σ w·x` for the row pair.
#[inline]
pub fn dot(o: &Operands<'_>) -> f32 {
    debug_assert_eq!(o.wq.len(), o.xq.len());
    debug_assert_eq!(o.ws.len() * GROUP, o.wq.len());
    debug_assert!(o.xd.len() == o.ws.len() && o.xs.len() == o.ws.len());
    let products = products(o);
    if o.offsets { products - offsets(o.ws, o.xs) } else { products }
}

fn products(o: &Operands<'_>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above; lengths are checked by `dot`.
            return unsafe { products_avx2(o) };
        }
    }
    products_scalar(o)
}

/// `Σ_g m_lo·xs_lo + m_hi·xs_hi`: what the offsets take away.
fn offsets(ws: &[Scales], xs: &[[f32; 2]]) -> f32 {
    ws.iter().zip(xs).map(|(w, x)| w[2] * x[0] + w[3] * x[1]).sum()
}

fn half_sum(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

pub(super) fn products_scalar(o: &Operands<'_>) -> f32 {
    let mut acc = 0f32;
    for (g, (w, x)) in o.wq.chunks_exact(GROUP).zip(o.xq.chunks_exact(GROUP)).enumerate() {
        let (s0, s1) = (half_sum(&w[..16], &x[..16]), half_sum(&w[16..], &x[16..]));
        acc += o.xd[g] * (o.ws[g][0] * s0 as f32 + o.ws[g][1] * s1 as f32);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn products_avx2(o: &Operands<'_>) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for g in 0..o.ws.len() {
        // SAFETY: `dot` checked that both rows hold `ws.len()` groups of 32 values.
        let (w, x) = unsafe {
            (
                _mm256_loadu_si256(o.wq.as_ptr().add(g * GROUP).cast()),
                _mm256_loadu_si256(o.xq.as_ptr().add(g * GROUP).cast()),
            )
        };
        // maddubs multiplies unsigned by signed bytes: move w's sign onto x (|w| ≤ 127, so no saturation).
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        // Lanes 0..4 sum values 0..16, lanes 4..8 values 16..32: one step each.
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        let (s, d) = (o.ws[g], o.xd[g]);
        let step = _mm256_setr_m128(_mm_set1_ps(s[0] * d), _mm_set1_ps(s[1] * d));
        acc = _mm256_fmadd_ps(sums, step, acc);
    }
    let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 build and the plain loop agree (to f32 rounding) on random rows, offsets included.
    #[test]
    fn avx2_and_scalar_agree() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let k = 8 * GROUP;
        let wq: Vec<i8> = (0..k).map(|_| (next() % 255) as i8).map(|v| v.max(-127)).collect();
        let xq: Vec<i8> = (0..k).map(|_| (next() % 255) as i8).map(|v| v.max(-127)).collect();
        let ws: Vec<Scales> = (0..8).map(|g| [0.01 * g as f32 + 0.003, -0.02, 0.5, -0.25]).collect();
        let xd: Vec<f32> = (0..8).map(|g| 0.001 * (g + 1) as f32).collect();
        let xs: Vec<[f32; 2]> = (0..8).map(|g| [g as f32, -(g as f32)]).collect();
        let o = Operands { wq: &wq, ws: &ws, xq: &xq, xd: &xd, xs: &xs, offsets: true };
        let scalar = products_scalar(&o);
        assert!(scalar.abs() > 1e-3, "a degenerate row: {scalar}");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: checked just above.
            let simd = unsafe { products_avx2(&o) };
            assert!((simd - scalar).abs() <= 1e-5 * scalar.abs().max(1.0), "{simd} vs {scalar}");
        }
        assert_eq!(dot(&o), products(&o) - offsets(&ws, &xs));
    }
}
