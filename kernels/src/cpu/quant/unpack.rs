//! Weight blocks of every format we compute with, decoded into one shape the dot kernels share: per group
//! of 32 weights, their small integers `q` (i8) and, for each half of 16, a step `d` and an offset `m`, so
//! that `w[i] = d[i / 16] · q[i] − m[i / 16]`.
//!
//! Every format fits it: the 32-value formats have one step for the whole group (and Q4_1/Q5_1 an offset),
//! the K-quants a step (and Q2_K/Q4_K/Q5_K an offset) per 16 or 32 values. The decoding follows
//! [`tessera_gguf::quants`]' reference line by line, and the tests check that `d · q − m` equals its
//! dequantization bit for bit.

use half::f16;
use tessera_gguf::{GgmlType, quants::QK_K};

/// Values in a group: the granularity of the activations' int8 scales.
pub const GROUP: usize = 32;

/// One group's steps and offsets: `[d_lo, d_hi, m_lo, m_hi]` for values 0..16 and 16..32.
pub type Scales = [f32; 4];

/// Whether the dot kernels run `ty`.
pub fn supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K)
}

/// Whether `ty`'s weights have offsets (`m`), which the dot kernels then subtract.
pub fn has_offsets(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, Q4_1 | Q5_1 | Q2_K | Q4_K | Q5_K)
}

/// Decodes one row of `ty` blocks into `q` (one i8 per value) and `scales` (one per [`GROUP`]). The caller
/// sizes all three consistently (`bytes` whole blocks, `q.len()` its values).
pub fn unpack_row(ty: GgmlType, bytes: &[u8], q: &mut [i8], scales: &mut [Scales]) {
    use GgmlType::*;
    let (bs, ts) = (ty.block_size(), ty.type_size());
    debug_assert_eq!(bytes.len() / ts * bs, q.len());
    debug_assert_eq!(q.len() / GROUP, scales.len());
    let groups = bs / GROUP;
    for ((b, q), s) in bytes.chunks_exact(ts).zip(q.chunks_exact_mut(bs)).zip(scales.chunks_exact_mut(groups)) {
        match ty {
            Q8_0 => q8_0(b, q, s),
            Q4_0 => q4_0(b, q, s),
            Q4_1 => q4_1(b, q, s),
            Q5_0 => q5_0(b, q, s),
            Q5_1 => q5_1(b, q, s),
            Q2_K => q2_k(b, q, s),
            Q3_K => q3_k(b, q, s),
            Q4_K => q4_k(b, q, s),
            Q5_K => q5_k(b, q, s),
            Q6_K => q6_k(b, q, s),
            _ => unreachable!("unpack_row of {ty}: callers check `supported`"),
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn q8_0(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let d = f16_at(b, 0);
    for (o, &v) in q.iter_mut().zip(&b[2..34]) {
        *o = v as i8;
    }
    s[0] = [d, d, 0.0, 0.0];
}

/// The 32 nibbles of `qs` (16 bytes: low nibbles are values 0..16, high ones 16..32), each minus `sub`.
fn nibbles(qs: &[u8], sub: i8, q: &mut [i8]) {
    let (lo, hi) = q.split_at_mut(16);
    for ((l, h), &v) in lo.iter_mut().zip(hi).zip(qs) {
        *l = (v & 0x0F) as i8 - sub;
        *h = (v >> 4) as i8 - sub;
    }
}

/// As [`nibbles`] with a fifth bit per value from the little-endian u32 `qh` (bit `j` for value `j`).
fn nibbles5(qs: &[u8], qh: u32, sub: i8, q: &mut [i8]) {
    let (lo, hi) = q.split_at_mut(16);
    for (j, ((l, h), &v)) in lo.iter_mut().zip(hi).zip(qs).enumerate() {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        *l = ((v & 0x0F) | h0) as i8 - sub;
        *h = ((v >> 4) | h1) as i8 - sub;
    }
}

fn q4_0(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let d = f16_at(b, 0);
    nibbles(&b[2..18], 8, q);
    s[0] = [d, d, 0.0, 0.0];
}

fn q4_1(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    nibbles(&b[4..20], 0, q);
    s[0] = [d, d, -m, -m];
}

fn q5_0(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let d = f16_at(b, 0);
    nibbles5(&b[6..22], u32::from_le_bytes([b[2], b[3], b[4], b[5]]), 16, q);
    s[0] = [d, d, 0.0, 0.0];
}

fn q5_1(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    nibbles5(&b[8..24], u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 0, q);
    s[0] = [d, d, -m, -m];
}

/// Q2_K: value `v = 128n + 32p + l` is bits `2p..2p+2` of `qs[32n + l]`; scale byte `v / 16` holds the step
/// (low nibble, times `d`) and the offset (high nibble, times `dmin`).
fn q2_k(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (v, o) in q.iter_mut().enumerate() {
        let (n, p, l) = (v / 128, (v / 32) % 4, v % 32);
        *o = ((qs[32 * n + l] >> (2 * p)) & 3) as i8;
    }
    for (g, sg) in s.iter_mut().enumerate() {
        let (lo, hi) = (scales[2 * g], scales[2 * g + 1]);
        *sg = [d * (lo & 0x0F) as f32, d * (hi & 0x0F) as f32, dmin * (lo >> 4) as f32, dmin * (hi >> 4) as f32];
    }
}

/// Q3_K: the low two bits as in Q2_K, the third from `hmask` (bit `v / 32` of `hmask[v % 32]`, clear
/// meaning −4), a signed 6-bit scale per 16 values.
fn q3_k(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    for (v, o) in q.iter_mut().enumerate() {
        let (n, p, l) = (v / 128, (v / 32) % 4, v % 32);
        let low = ((qs[32 * n + l] >> (2 * p)) & 3) as i8;
        *o = if hmask[l] & (1 << (v / 32)) != 0 { low } else { low - 4 };
    }
    let scale = |j: usize| {
        let low = if j < 8 { packed[j] & 0x0F } else { packed[j - 8] >> 4 };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        ((low | (high << 4)) as i32 - 32) as f32
    };
    for (g, sg) in s.iter_mut().enumerate() {
        *sg = [d * scale(2 * g), d * scale(2 * g + 1), 0.0, 0.0];
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K block (`get_scale_min_k4`).
pub(super) fn k4_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

fn k4_scales(d: f32, dmin: f32, packed: &[u8], s: &mut [Scales]) {
    for (g, sg) in s.iter_mut().enumerate() {
        let (sc, m) = k4_scale_min(g, packed);
        let (step, off) = (d * sc as f32, dmin * m as f32);
        *sg = [step, step, off, off];
    }
}

/// Q4_K: sub-blocks `2c` and `2c + 1` are the low and high nibbles of `qs[32c..32c + 32]`.
fn q4_k(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let qs = &b[16..144];
    for (bytes, q64) in qs.chunks_exact(QK_K / 8).zip(q.chunks_exact_mut(64)) {
        let (lo, hi) = q64.split_at_mut(32);
        for ((l, h), &v) in lo.iter_mut().zip(hi).zip(bytes) {
            *l = (v & 0x0F) as i8;
            *h = (v >> 4) as i8;
        }
    }
    k4_scales(f16_at(b, 0), f16_at(b, 2), &b[4..16], s);
}

/// Q5_K: as Q4_K, with bit `s` of `qh[l]` the fifth bit of value `l` of sub-block `s`.
fn q5_k(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (c, (bytes, q64)) in qs.chunks_exact(32).zip(q.chunks_exact_mut(64)).enumerate() {
        let (lo, hi) = q64.split_at_mut(32);
        let (bit_lo, bit_hi) = (1u8 << (2 * c), 1u8 << (2 * c + 1));
        for (l, ((ql, qhi), &v)) in lo.iter_mut().zip(hi).zip(bytes).enumerate() {
            *ql = ((v & 0x0F) + if qh[l] & bit_lo != 0 { 16 } else { 0 }) as i8;
            *qhi = ((v >> 4) + if qh[l] & bit_hi != 0 { 16 } else { 0 }) as i8;
        }
    }
    k4_scales(f16_at(b, 0), f16_at(b, 2), &b[4..16], s);
}

/// Q6_K: in half `n`, values `l`, `l + 32`, `l + 64`, `l + 96` take low nibbles from `ql[l]`, `ql[l + 32]`
/// (low, then high nibbles) and top bits from `qh[l]` at shifts 0, 2, 4, 6; an i8 scale per 16 values.
fn q6_k(b: &[u8], q: &mut [i8], s: &mut [Scales]) {
    let (ql_all, qh_all, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (n, q128) in q.chunks_exact_mut(128).enumerate() {
        let (ql, qh) = (&ql_all[64 * n..64 * n + 64], &qh_all[32 * n..32 * n + 32]);
        for l in 0..32 {
            q128[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            q128[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            q128[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            q128[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    for (g, sg) in s.iter_mut().enumerate() {
        *sg = [d * scales[2 * g] as i8 as f32, d * scales[2 * g + 1] as i8 as f32, 0.0, 0.0];
    }
}
