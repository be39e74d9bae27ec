//! K-quant quantization: Q4_K and Q6_K blocks made from f32 as llama.cpp's reference quantizer makes them
//! when it has no importance matrix (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref` in ggml-quants.c,
//! with their helpers `make_qkx2_quants` and `make_qx_quants`).
//!
//! Both search for each sub-block's scale (and Q4_K's minimum) by trying a few candidate steps and keeping
//! the one of least weighted error, then quantize the sub-block scales themselves to 6 (Q4_K) or 8 (Q6_K)
//! bits under one f16 super-block scale. The arithmetic is f32 in ggml's order, and `nearest_int` rounds
//! half to even as ggml's magic-number trick does. `scripts/make_quant_fixtures.py` checks the result
//! against llama.cpp's own quantizer (`llama_model_quantize`) on the fixture models.

use half::f16;

use crate::quants::QK_K;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below it quantizes to zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest, ties to even (exact for |x| < 2^22, as ggml asserts).
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// `make_qkx2_quants`: levels `0..=nmax` with a step and a minimum for `x`, chosen among `nstep + 1`
/// candidate steps by weighted squared error. Returns (step, −minimum).
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// One Q4_K block (144 bytes) from 256 values.
pub(crate) fn quantize_q4_k(x: &[f32; QK_K]) -> [u8; 144] {
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        let (scale, min) = make_qkx2_quants(xs, &weights, 15, &mut levels[32 * j..32 * j + 32], -1.0, 0.1, 20);
        (scales[j], mins[j]) = (scale, min);
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // ggml stores nearest_int's result in a uint8_t before taking the minimum with 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = crate::quants::k4_scale_min(j, &packed);
        let step = d.to_f32() * sc as f32;
        if step == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            levels[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / step).clamp(0, 15) as u8;
        }
    }
    let mut out = [0u8; 144];
    out[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_bits().to_le_bytes());
    out[4..16].copy_from_slice(&packed);
    for (c, chunk) in levels.chunks_exact(64).enumerate() {
        for l in 0..32 {
            out[16 + 32 * c + l] = chunk[l] | (chunk[l + 32] << 4);
        }
    }
    out
}

/// `make_qx_quants` with `rmse_type` 1 and no importance weights: signed levels `-nmax..nmax` (stored
/// offset by `nmax`) and a step, chosen among 19 candidate steps by error weighted with `x²`.
fn make_qx_quants(x: &[f32], nmax: i32, levels: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let l = level(iscale, v);
        levels[i] = (l + nmax) as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        (sumlx, suml2) = (0.0, 0.0);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                levels[i] = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// One Q6_K block (210 bytes) from 256 values.
pub(crate) fn quantize_q6_k(x: &[f32; QK_K]) -> [u8; 210] {
    let mut levels = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut levels[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    let mut out = [0u8; 210];
    if max_abs_scale < GROUP_MAX_EPS {
        return out;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    let mut q = [0u8; QK_K];
    for (i, l) in levels.iter().enumerate() {
        q[i] = *l as u8;
    }
    for j in 0..16 {
        let step = d.to_f32() * sc[j] as f32;
        if step == 0.0 {
            continue;
        }
        for ii in 0..16 {
            q[16 * j + ii] = (nearest_int(x[16 * j + ii] / step).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for n in 0..2 {
        let (l0, ql, qh) = (128 * n, &mut ql[64 * n..64 * n + 64], &mut qh[32 * n..32 * n + 32]);
        for l in 0..32 {
            let (q1, q2, q3, q4) = (q[l0 + l], q[l0 + l + 32], q[l0 + l + 64], q[l0 + l + 96]);
            ql[l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    for (o, s) in rest[..16].iter_mut().zip(sc) {
        *o = s as u8;
    }
    rest[16..18].copy_from_slice(&d.to_bits().to_le_bytes());
    out
}
