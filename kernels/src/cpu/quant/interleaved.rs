//! Dot products over interleaved groups ([`super::matrix`]): eight weight rows of Q8_0 or Q4_0 against up
//! to [`ROWS`] activation rows at once.
//!
//! Four activation bytes broadcast to every lane meet four weights of each of the eight rows in one
//! `vpdpbusd` (`maddubs` then `madd` without VNNI), so a block column sums into one i32 lane per weight row
//! in eight instructions per activation row, and one multiply-add per activation row and column scales
//! it. Kernels that take one weight row at a time (as these did before, `direct.rs` in the history of
//! `docs/benchmarks/gguf.md`) pay a conversion, a multiply, an add and, at the end, a horizontal sum per
//! weight row; here eight rows share them, and run 2–4× faster for it.
//!
//! The K-quants' sub-block scales multiply each sub-block's i32 sums lane by lane (`vpmulld`), the eight
//! rows' scales decoded together from their interleaved bytes; Q4_K's minimums and Q6_K's offset of 32 are
//! taken out through the activations' level sums per 32 or per 16 values.
//!
//! `vpdpbusd` takes the weights' bytes unsigned: Q4_0's levels as stored (`q + 8`), Q8_0's as `q + 128` (the
//! sign bit flipped). The shift times the activations' level sum is taken back out as an integer, so each
//! column's sum is exact before its one rounding to f32, and a row's result does not depend on how many
//! activation rows it was computed with. The AVX2 build keeps Q8_0's levels signed with the sign trick
//! (`maddubs` would saturate on pairs of `q + 128` products).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use tessera_gguf::GgmlType;

use super::{act::QuantizedRows, matrix::GROUP_ROWS};

/// Activation rows dotted with one group at a time.
pub const ROWS: usize = 8;

/// Whether this CPU runs interleaved kernels for `ty` (and so whether its matrices are interleaved).
pub fn available(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_K | GgmlType::Q6_K)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// A build of the kernels: the same code, with the byte products summed by the best instruction the CPU
/// has for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Build {
    /// `vpmaddubsw` then `vpmaddwd`.
    Avx2,
    /// One `vpdpbusd` (AVX-VNNI, VEX-encoded: Alder Lake and later, Zen 5).
    AvxVnni,
    /// One `vpdpbusd` on 256-bit registers from AVX-512 VNNI with VL (Cascade Lake, Ice Lake, Zen 4).
    Avx512Vnni,
}

impl Build {
    /// Every build this CPU runs, the best last.
    fn supported() -> Vec<Build> {
        let mut builds = vec![Build::Avx2];
        if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl") {
            builds.push(Build::Avx512Vnni);
        }
        if std::arch::is_x86_feature_detected!("avxvnni") {
            builds.push(Build::AvxVnni);
        }
        builds
    }

    fn best() -> Build {
        static BEST: std::sync::OnceLock<Build> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Build::supported().last().expect("AVX2 is always listed"))
    }
}

/// For each interleaved group in `groups` (whole groups, one after another) and each of `rows` (1..=[`ROWS`])
/// activation rows from `i0`: `out[g · rows + r][j] = w_gj · x[i0 + r]`, `w_gj` the group's weight row `j`.
/// One call takes a task's run of groups, so the checks and the choice of kernel are made once for all.
pub fn dot_groups(
    ty: GgmlType,
    groups: &[u8],
    acts: &QuantizedRows,
    i0: usize,
    rows: usize,
    out: &mut [[f32; GROUP_ROWS]],
) {
    dot_groups_on(Build::best(), ty, groups, acts, i0, rows, out)
}

/// [`dot_groups`] with `build`, which the caller has checked the CPU runs ([`Build::supported`]).
fn dot_groups_on(
    build: Build,
    ty: GgmlType,
    groups: &[u8],
    acts: &QuantizedRows,
    i0: usize,
    rows: usize,
    out: &mut [[f32; GROUP_ROWS]],
) {
    assert!(available(ty) && (1..=ROWS).contains(&rows) && i0 + rows <= acts.rows());
    let gb = GROUP_ROWS * super::row_bytes(ty, acts.k);
    assert!(groups.len().is_multiple_of(gb) && out.len() == groups.len() / gb * rows);
    macro_rules! rows {
        ($m:ident) => {
            match rows {
                1 => $m::groups::<1>(ty, groups, gb, acts, i0, out),
                2 => $m::groups::<2>(ty, groups, gb, acts, i0, out),
                3 => $m::groups::<3>(ty, groups, gb, acts, i0, out),
                4 => $m::groups::<4>(ty, groups, gb, acts, i0, out),
                5 => $m::groups::<5>(ty, groups, gb, acts, i0, out),
                6 => $m::groups::<6>(ty, groups, gb, acts, i0, out),
                7 => $m::groups::<7>(ty, groups, gb, acts, i0, out),
                _ => $m::groups::<8>(ty, groups, gb, acts, i0, out),
            }
        };
    }
    // SAFETY: AVX2, FMA and F16C are present (`available`), and the VNNI extension of the build chosen (the
    // caller's check); the groups' and the activations' lengths were checked above, and every load stays
    // inside them.
    unsafe {
        match build {
            Build::Avx2 => rows!(avx2),
            Build::AvxVnni => rows!(vnni),
            Build::Avx512Vnni => rows!(vnni512),
        }
    }
}

/// `acc + u · s`, four byte products to a lane, with `maddubs` and `madd` (the caller keeps each pair of
/// products below i16's saturation).
#[target_feature(enable = "avx2")]
#[inline]
fn dot4_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
}

/// `acc + u · s` in one VNNI instruction.
#[target_feature(enable = "avx2,avxvnni")]
#[inline]
fn dot4_vnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, u, s)
}

/// `acc + u · s` in one AVX-512 VNNI instruction on 256-bit registers.
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
#[inline]
fn dot4_vnni512(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

/// One build of the kernels: `$dot4` accumulates byte products, `$vnni` says whether it takes any unsigned
/// byte (VNNI) or needs Q8_0's levels kept signed (AVX2).
macro_rules! kernels {
    ($module:ident, $features:literal, $dot4:ident, $vnni:literal) => {
        mod $module {
            use std::arch::x86_64::*;

            use tessera_gguf::GgmlType;

            use super::super::{act::QuantizedRows, matrix::GROUP_ROWS};

            /// The four activation bytes at `p`, in every lane.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn broadcast(p: *const i8) -> __m256i {
                // SAFETY: the caller's `p` has four bytes to read.
                _mm256_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
            }

            /// Every group of `w` (`gb` bytes each), `N` activation rows each.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn groups<const N: usize>(
                ty: GgmlType,
                w: &[u8],
                gb: usize,
                acts: &QuantizedRows,
                i0: usize,
                out: &mut [[f32; GROUP_ROWS]],
            ) {
                for (g, o) in w.chunks_exact(gb).zip(out.chunks_exact_mut(N)) {
                    // SAFETY: as for `groups`, whose checks cover each group.
                    unsafe { group::<N>(ty, g, acts, i0, o) }
                }
            }

            /// The activation rows a group is multiplied by: each row's levels, steps and level sums.
            struct Rows<'a, const N: usize> {
                xs: [*const i8; N],
                steps: [&'a [f32]; N],
                level_sums: [&'a [i32]; N],
                half_sums: [&'a [i32]; N],
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn group<const N: usize>(
                ty: GgmlType,
                w: &[u8],
                acts: &QuantizedRows,
                i0: usize,
                out: &mut [[f32; GROUP_ROWS]],
            ) {
                let columns = acts.k / 32;
                let mut rows =
                    Rows { xs: [std::ptr::null(); N], steps: [&[]; N], level_sums: [&[]; N], half_sums: [&[]; N] };
                for r in 0..N {
                    let (q, d, _) = acts.row(i0 + r);
                    (rows.xs[r], rows.steps[r]) = (q.as_ptr(), d);
                    (rows.level_sums[r], rows.half_sums[r]) = (acts.level_sums(i0 + r), acts.half_level_sums(i0 + r));
                }
                let mut acc = [_mm256_setzero_ps(); N];
                // SAFETY: as for `groups`, whose checks cover each group: `dot_group_on` checked that the group
                // holds `columns` columns of eight blocks and each activation row `columns` groups of 32 levels,
                // one step and one level sum. The per-format functions load within those.
                unsafe {
                    match ty {
                        GgmlType::Q8_0 => q8_0::<N>(w, columns, &rows, &mut acc),
                        GgmlType::Q4_0 => q4_0::<N>(w, columns, &rows, &mut acc),
                        GgmlType::Q4_K => q4_k::<N>(w, columns, &rows, &mut acc),
                        GgmlType::Q6_K => q6_k::<N>(w, columns, &rows, &mut acc),
                        _ => unreachable!("dot_groups of {ty}: `available` is checked"),
                    }
                    for (o, a) in out.iter_mut().zip(acc) {
                        _mm256_storeu_ps(o.as_mut_ptr(), a);
                    }
                }
            }

            /// Block `b` of a Q8_0 or Q4_0 column into each row's accumulator: the integer sums, less `offset`
            /// times the activations' level sum (the weights' levels were stored plus `offset`), times the
            /// weight row's step and the activation row's.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn add_blocks<const N: usize>(
                sums: [__m256i; N],
                offset: i32,
                b: usize,
                w_steps: __m256,
                rows: &Rows<'_, N>,
                acc: &mut [__m256; N],
            ) {
                for r in 0..N {
                    // SAFETY: each activation row has `columns` level sums and steps, and `b < columns`.
                    let (level_sum, x_step) =
                        unsafe { (*rows.level_sums[r].get_unchecked(b), *rows.steps[r].get_unchecked(b)) };
                    let mut sum = sums[r];
                    if offset != 0 {
                        sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(offset * level_sum));
                    }
                    let step = _mm256_mul_ps(w_steps, _mm256_set1_ps(x_step));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), step, acc[r]);
                }
            }

            /// Q8_0: 32 signed levels and one step per block.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q8_0<const N: usize>(w: &[u8], columns: usize, rows: &Rows<'_, N>, acc: &mut [__m256; N]) {
                // SAFETY (every load): as for `group`.
                unsafe {
                    for b in 0..columns {
                        let col = w.as_ptr().add(b * GROUP_ROWS * 34);
                        let w_steps = _mm256_cvtph_ps(_mm_loadu_si128(col.cast()));
                        let mut q = [_mm256_setzero_si256(); 8];
                        for (c, q) in q.iter_mut().enumerate() {
                            *q = _mm256_loadu_si256(col.add(16 + 32 * c).cast());
                        }
                        let u = if $vnni {
                            q.map(|q| _mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN)))
                        } else {
                            q.map(|q| _mm256_sign_epi8(q, q))
                        };
                        // Chunk by chunk across the rows, so that the rows' sums are independent
                        // neighbours rather than one chain of eight dependent instructions each.
                        let mut sums = [_mm256_setzero_si256(); N];
                        for c in 0..8 {
                            for r in 0..N {
                                let xb = broadcast(rows.xs[r].add(32 * b + 4 * c));
                                let s = if $vnni { xb } else { _mm256_sign_epi8(xb, q[c]) };
                                sums[r] = super::$dot4(sums[r], u[c], s);
                            }
                        }
                        let offset = if $vnni { 128 } else { 0 };
                        add_blocks(sums, offset, b, w_steps, rows, acc);
                    }
                }
            }

            /// Q4_0: 32 levels of 4 bits, offset by 8, and one step per block.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q4_0<const N: usize>(w: &[u8], columns: usize, rows: &Rows<'_, N>, acc: &mut [__m256; N]) {
                // SAFETY (every load): as for `group`.
                unsafe {
                    let low4 = _mm256_set1_epi8(0x0F);
                    for b in 0..columns {
                        let col = w.as_ptr().add(b * GROUP_ROWS * 18);
                        let w_steps = _mm256_cvtph_ps(_mm_loadu_si128(col.cast()));
                        let (mut lo, mut hi) = ([_mm256_setzero_si256(); 4], [_mm256_setzero_si256(); 4]);
                        for p in 0..4 {
                            let raw = _mm256_loadu_si256(col.add(16 + 32 * p).cast());
                            lo[p] = _mm256_and_si256(raw, low4);
                            hi[p] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low4);
                        }
                        // Low nibbles are a block's values 0..16, high ones 16..32.
                        let mut sums = [_mm256_setzero_si256(); N];
                        for p in 0..4 {
                            for r in 0..N {
                                let x = rows.xs[r].add(32 * b);
                                sums[r] = super::$dot4(sums[r], lo[p], broadcast(x.add(4 * p)));
                                sums[r] = super::$dot4(sums[r], hi[p], broadcast(x.add(16 + 4 * p)));
                            }
                        }
                        add_blocks(sums, 8, b, w_steps, rows, acc);
                    }
                }
            }

            /// Q4_K: super-blocks of 256 in eight sub-blocks, each with a 6-bit scale and minimum.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q4_k<const N: usize>(w: &[u8], columns: usize, rows: &Rows<'_, N>, acc: &mut [__m256; N]) {
                // SAFETY (every load): as for `group`.
                unsafe {
                    let (low4, low6, top2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x3F), _mm256_set1_epi8(0x30));
                    for b in 0..columns / 8 {
                        let col = w.as_ptr().add(b * GROUP_ROWS * 144);
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(col.cast()));
                        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(col.add(16).cast()));
                        // The twelve bytes of packed scales, each for the eight rows: bytes 0..4, 4..8
                        // and 8..12. Decoded, sub-block j's scales for the eight rows are the bytes
                        // `8j..8j + 8` of `decoded`, its minimums `64 + 8j..`.
                        let y0 = _mm256_loadu_si256(col.add(32).cast());
                        let y1 = _mm256_loadu_si256(col.add(64).cast());
                        let y2 = _mm256_loadu_si256(col.add(96).cast());
                        let top = |y| _mm256_and_si256(_mm256_srli_epi16::<2>(y), top2);
                        let mut decoded = [0u8; 128];
                        let parts = [
                            _mm256_and_si256(y0, low6),
                            _mm256_or_si256(_mm256_and_si256(y2, low4), top(y0)),
                            _mm256_and_si256(y1, low6),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(y2), low4), top(y1)),
                        ];
                        for (i, part) in parts.into_iter().enumerate() {
                            _mm256_storeu_si256(decoded.as_mut_ptr().add(32 * i).cast(), part);
                        }
                        let lanes = |at: usize| _mm256_cvtepu8_epi32(_mm_loadl_epi64(decoded.as_ptr().add(at).cast()));
                        let mut isum = [_mm256_setzero_si256(); N];
                        for j in 0..8 {
                            // Quants chunk j / 2: low nibbles are sub-block j for even j, high for odd.
                            let mut q = [_mm256_setzero_si256(); 8];
                            for (p, q) in q.iter_mut().enumerate() {
                                let raw = _mm256_loadu_si256(col.add(128 + (j / 2) * 256 + 32 * p).cast());
                                let raw = if j % 2 == 0 { raw } else { _mm256_srli_epi16::<4>(raw) };
                                *q = _mm256_and_si256(raw, low4);
                            }
                            let mut sums = [_mm256_setzero_si256(); N];
                            for p in 0..8 {
                                for r in 0..N {
                                    let x = broadcast(rows.xs[r].add(256 * b + 32 * j + 4 * p));
                                    sums[r] = super::$dot4(sums[r], q[p], x);
                                }
                            }
                            let scale = lanes(8 * j);
                            for r in 0..N {
                                isum[r] = _mm256_add_epi32(isum[r], _mm256_mullo_epi32(sums[r], scale));
                            }
                        }
                        for r in 0..N {
                            let mut msum = _mm256_setzero_si256();
                            for j in 0..8 {
                                let xsum = _mm256_set1_epi32(*rows.level_sums[r].get_unchecked(8 * b + j));
                                msum = _mm256_add_epi32(msum, _mm256_mullo_epi32(lanes(64 + 8 * j), xsum));
                            }
                            let dx = _mm256_set1_ps(*rows.steps[r].get_unchecked(8 * b));
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(d, dx), acc[r]);
                            acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_mul_ps(dmin, dx), acc[r]);
                        }
                    }
                }
            }

            /// Q6_K: super-blocks of 256 in sixteen sub-blocks of 6-bit levels offset by 32, 8-bit scales.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q6_k<const N: usize>(w: &[u8], columns: usize, rows: &Rows<'_, N>, acc: &mut [__m256; N]) {
                // SAFETY (every load): as for `group`.
                unsafe {
                    let (low4, top2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
                    for b in 0..columns / 8 {
                        // Low nibbles (1024 bytes for the eight rows), high bits (512), the sixteen
                        // scales (8 bytes each), d.
                        let col = w.as_ptr().add(b * GROUP_ROWS * 210);
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(col.add(1664).cast()));
                        let mut isum = [_mm256_setzero_si256(); N];
                        for n in 0..2 {
                            for t in 0..4 {
                                // Values 128n + 32t + 4p.., p in 0..8: sub-blocks 8n + 2t (p < 4) and
                                // 8n + 2t + 1 (`unpack::q6_k`'s order).
                                let mut q = [_mm256_setzero_si256(); 8];
                                for (p, q) in q.iter_mut().enumerate() {
                                    let ql = _mm256_loadu_si256(col.add(32 * (16 * n + 8 * (t % 2) + p)).cast());
                                    let qh = _mm256_loadu_si256(col.add(1024 + 32 * (8 * n + p)).cast());
                                    let lo = if t < 2 { ql } else { _mm256_srli_epi16::<4>(ql) };
                                    let hi = match t {
                                        0 => _mm256_slli_epi16::<4>(qh),
                                        1 => _mm256_slli_epi16::<2>(qh),
                                        2 => qh,
                                        _ => _mm256_srli_epi16::<2>(qh),
                                    };
                                    *q = _mm256_or_si256(_mm256_and_si256(lo, low4), _mm256_and_si256(hi, top2));
                                }
                                let s = 8 * n + 2 * t;
                                let scale =
                                    |s: usize| _mm256_cvtepi8_epi32(_mm_loadl_epi64(col.add(1536 + 8 * s).cast()));
                                let (sc0, sc1) = (scale(s), scale(s + 1));
                                for r in 0..N {
                                    let x = rows.xs[r].add(256 * b + 128 * n + 32 * t);
                                    let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                                    for p in 0..4 {
                                        s0 = super::$dot4(s0, q[p], broadcast(x.add(4 * p)));
                                        s1 = super::$dot4(s1, q[p + 4], broadcast(x.add(16 + 4 * p)));
                                    }
                                    // Levels are q − 32: take 32 times the activations' sum back out.
                                    let half = |h: usize| {
                                        _mm256_set1_epi32(32 * *rows.half_sums[r].get_unchecked(16 * b + s + h))
                                    };
                                    let s0 = _mm256_mullo_epi32(_mm256_sub_epi32(s0, half(0)), sc0);
                                    let s1 = _mm256_mullo_epi32(_mm256_sub_epi32(s1, half(1)), sc1);
                                    isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(s0, s1));
                                }
                            }
                        }
                        for r in 0..N {
                            let dx = _mm256_set1_ps(*rows.steps[r].get_unchecked(8 * b));
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(d, dx), acc[r]);
                        }
                    }
                }
            }
        }
    };
}

kernels!(avx2, "avx2,fma,f16c", dot4_avx2, false);
kernels!(vnni, "avx2,fma,f16c,avxvnni", dot4_vnni, true);
kernels!(vnni512, "avx2,fma,f16c,avx512vnni,avx512vl", dot4_vnni512, true);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quant::{
        act::ActFormat,
        dot::{Operands, dot},
        matrix::QuantMatrix,
        unpack::{GROUP, has_offsets, unpack_row},
    };

    /// Every build, for 1..=8 activation rows, against the plain dot product of each decoded weight row,
    /// with levels at their extremes (−128 included) among random ones.
    #[test]
    fn interleaved_kernels_equal_the_decoded_dot_product() {
        let mut state = 0x243f_6a88_85a3_08d3u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let k = 512;
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            if !available(ty) {
                continue;
            }
            let rb = super::super::row_bytes(ty, k);
            // Two groups, so that a call covers more than one.
            let mut w: Vec<u8> = (0..2 * GROUP_ROWS * rb).map(|_| next() as u8).collect();
            let f16_at: &[usize] = match ty {
                GgmlType::Q4_K => &[0, 2],
                GgmlType::Q6_K => &[208],
                _ => &[0],
            };
            for (i, b) in w.chunks_exact_mut(ty.type_size()).enumerate() {
                if i % 3 == 0 {
                    b.fill(if i % 2 == 0 { 0x80 } else { 0xFF });
                }
                for &at in f16_at {
                    let v = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
                    b[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
            let x: Vec<f32> = (0..ROWS * k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            let acts = QuantizedRows::new(&x, k, ActFormat::for_weights(ty));
            let matrix = QuantMatrix::new(ty, w.clone(), 2 * GROUP_ROWS, k);
            assert_eq!(matrix.packed_rows(), 2 * GROUP_ROWS);
            for build in Build::supported() {
                for n in 1..=ROWS {
                    let mut got = vec![[0f32; GROUP_ROWS]; 2 * n];
                    dot_groups_on(build, ty, matrix.raw(), &acts, ROWS - n, n, &mut got);
                    for (j, row) in w.chunks_exact(rb).enumerate() {
                        let (mut wq, mut ws) = (vec![0i8; k], vec![[0f32; 4]; k / GROUP]);
                        unpack_row(ty, row, &mut wq, &mut ws);
                        let (group, j) = (j / GROUP_ROWS, j % GROUP_ROWS);
                        for (r, g) in got[group * n..(group + 1) * n].iter().enumerate() {
                            let (xq, xd, xs) = acts.row(ROWS - n + r);
                            let want = dot(&Operands { wq: &wq, ws: &ws, xq, xd, xs, offsets: has_offsets(ty) });
                            let what = format!(
                                "{ty} {build:?} n={n} group {group} weight row {j} row {r}: {} vs {want}",
                                g[j]
                            );
                            assert!((g[j] - want).abs() <= 1e-4 * want.abs().max(1.0), "{what}");
                        }
                    }
                }
            }
        }
    }
}
