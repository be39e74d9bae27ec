//! AVX2 (and VNNI, AVX-VNNI or AVX-512 VNNI, where the CPU has it) dot products that read Q8_0, Q4_0, Q4_K and Q6_K blocks where they lie, decoding each group of 32
//! weights in registers, and dot it with up to [`ROWS`] activation rows before moving on: the weights of a
//! row are read once for every input row, and nothing is written back to memory in between.
//!
//! A group's levels go to `maddubs` as unsigned bytes where the format has offsets anyway (Q4_K as they
//! are, Q6_K as `q + 32` with the shift folded into its offsets), which are subtracted through the
//! activations' half sums; Q8_0's and Q4_0's signed levels use the sign trick. The result equals
//! [`super::dot::dot`] on the decoded row to f32 rounding (the tests compare both with an f64 product).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use tessera_gguf::GgmlType;

use super::act::QuantizedRows;

/// Activation rows dotted with one weight row at a time.
pub const ROWS: usize = 8;

/// Whether this CPU runs the direct kernels for `ty`.
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

/// `out[r] = w · x[i0 + r]` for the weight row `w` (blocks of `ty`) and `out.len()` (1..=[`ROWS`])
/// activation rows from `i0`.
pub fn dot_rows(ty: GgmlType, w: &[u8], acts: &QuantizedRows, i0: usize, out: &mut [f32]) {
    dot_rows_on(Build::best(), ty, w, acts, i0, out)
}

/// [`dot_rows`] with `build`, which the caller has checked the CPU runs ([`Build::supported`]).
fn dot_rows_on(build: Build, ty: GgmlType, w: &[u8], acts: &QuantizedRows, i0: usize, out: &mut [f32]) {
    assert!(available(ty) && (1..=ROWS).contains(&out.len()) && i0 + out.len() <= acts.rows());
    assert_eq!(w.len(), super::row_bytes(ty, acts.k));
    macro_rules! rows {
        ($m:ident) => {
            match out.len() {
                1 => $m::row::<1>(ty, w, acts, i0, out),
                2 => $m::row::<2>(ty, w, acts, i0, out),
                3 => $m::row::<3>(ty, w, acts, i0, out),
                4 => $m::row::<4>(ty, w, acts, i0, out),
                5 => $m::row::<5>(ty, w, acts, i0, out),
                6 => $m::row::<6>(ty, w, acts, i0, out),
                7 => $m::row::<7>(ty, w, acts, i0, out),
                _ => $m::row::<8>(ty, w, acts, i0, out),
            }
        };
    }
    // SAFETY: AVX2, FMA and F16C are present (`available`), and the VNNI extension of the build chosen (the
    // caller's check); the row and activation lengths were checked above, and every load stays inside them.
    unsafe {
        match build {
            Build::Avx2 => rows!(avx2),
            Build::AvxVnni => rows!(vnni),
            Build::Avx512Vnni => rows!(vnni512),
        }
    }
}

/// `u · s` four bytes at a time with `maddubs` and `madd` (no pair saturates: `u` is at most 127).
#[target_feature(enable = "avx2")]
#[inline]
fn pairs_avx2(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// `u · s` four bytes at a time in one VNNI instruction.
#[target_feature(enable = "avx2,avxvnni")]
#[inline]
fn pairs_vnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
}

/// `u · s` four bytes at a time in one AVX-512 VNNI instruction, on 256-bit registers.
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
#[inline]
fn pairs_vnni512(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

/// One build of the kernels for a set of CPU features: `$pairs(u, s)` sums each four products of the
/// unsigned bytes `u` and the signed bytes `s` into an i32 lane.
macro_rules! kernels {
    ($module:ident, $features:literal, $pairs:ident) => {
        mod $module {
            use std::arch::x86_64::*;

            use tessera_gguf::GgmlType;

            use super::super::{act::QuantizedRows, unpack::k4_scale_min};

            /// The little-endian f16 at `b[at..]`, widened by the F16C instruction (the `half` crate's conversion is a
            /// call per value, and a block's step is converted for every 32 weights).
            #[target_feature(enable = $features)]
            #[inline]
            fn f16_at(b: &[u8], at: usize) -> f32 {
                let bits = u16::from_le_bytes([b[at], b[at + 1]]);
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }

            /// The running sums of `N` activation rows against one weight row.
            struct Acc<'a, const N: usize> {
                lanes: [__m256; N],
                offsets: [f32; N],
                /// Each row's levels, steps and half sums.
                rows: [(&'a [i8], &'a [f32], &'a [[f32; 2]]); N],
            }

            impl<'a, const N: usize> Acc<'a, N> {
                fn new(acts: &'a QuantizedRows, i0: usize) -> Self {
                    // SAFETY: all-zero bits are a valid __m256.
                    Acc {
                        lanes: unsafe { std::mem::zeroed() },
                        offsets: [0.0; N],
                        rows: std::array::from_fn(|r| acts.row(i0 + r)),
                    }
                }

                /// Adds group `g`, whose levels are `w` (unsigned unless `signed`), steps `d` and offsets `m` per half
                /// of 16 (`w = d·q − m`; `offsets` false when every `m` of the format is zero). Callers pass `signed`
                /// and `offsets` as constants, so each inlined copy keeps only its own branch.
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn group(
                    &mut self,
                    g: usize,
                    w: __m256i,
                    signed: bool,
                    offsets: bool,
                    d: [f32; 2],
                    m: [f32; 2],
                ) {
                    let abs_w = if signed { _mm256_sign_epi8(w, w) } else { w };
                    let wstep = _mm256_setr_m128(_mm_set1_ps(d[0]), _mm_set1_ps(d[1]));
                    for r in 0..N {
                        let (q, steps, sums) = self.rows[r];
                        // SAFETY: `dot_rows` checked that every row holds the weight row's groups.
                        let (x, dx, xs) = unsafe {
                            (
                                _mm256_loadu_si256(q.as_ptr().add(g * 32).cast()),
                                *steps.get_unchecked(g),
                                *sums.get_unchecked(g),
                            )
                        };
                        let x = if signed { _mm256_sign_epi8(x, w) } else { x };
                        let sums = _mm256_cvtepi32_ps(super::$pairs(abs_w, x));
                        let step = _mm256_mul_ps(wstep, _mm256_set1_ps(dx));
                        self.lanes[r] = _mm256_fmadd_ps(sums, step, self.lanes[r]);
                        if offsets {
                            self.offsets[r] += m[0] * xs[0] + m[1] * xs[1];
                        }
                    }
                }

                #[target_feature(enable = $features)]
                unsafe fn finish(&self, out: &mut [f32]) {
                    for ((o, v), off) in out.iter_mut().zip(self.lanes).zip(self.offsets) {
                        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
                        *o = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair))) - off;
                    }
                }
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn row<const N: usize>(
                ty: GgmlType,
                w: &[u8],
                acts: &QuantizedRows,
                i0: usize,
                out: &mut [f32],
            ) {
                let mut acc = Acc::<N>::new(acts, i0);
                let low4 = _mm256_set1_epi8(0x0F);
                // SAFETY (every load): each block slice below has the format's full size, from `chunks_exact`.
                unsafe {
                    match ty {
                        GgmlType::Q8_0 => {
                            for (g, b) in w.chunks_exact(34).enumerate() {
                                let d = f16_at(b, 0);
                                let q = _mm256_loadu_si256(b.as_ptr().add(2).cast());
                                acc.group(g, q, true, false, [d, d], [0.0, 0.0]);
                            }
                        }
                        GgmlType::Q4_0 => {
                            let eight = _mm256_set1_epi8(8);
                            for (g, b) in w.chunks_exact(18).enumerate() {
                                let d = f16_at(b, 0);
                                // Signed levels (q − 8) cost one subtraction per group; as unsigned ones with an offset,
                                // every row would pay for the offset.
                                let q =
                                    _mm256_sub_epi8(nibbles(_mm_loadu_si128(b.as_ptr().add(2).cast()), low4), eight);
                                acc.group(g, q, true, false, [d, d], [0.0, 0.0]);
                            }
                        }
                        GgmlType::Q4_K => {
                            for (sb, b) in w.chunks_exact(144).enumerate() {
                                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                                let packed = &b[4..16];
                                for c in 0..4 {
                                    let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * c).cast());
                                    for (half, q) in
                                        [_mm256_and_si256(q, low4), _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4)]
                                            .into_iter()
                                            .enumerate()
                                    {
                                        let j = 2 * c + half;
                                        let (sc, m) = k4_scale_min(j, packed);
                                        let (step, off) = (d * sc as f32, dmin * m as f32);
                                        acc.group(8 * sb + j, q, false, true, [step, step], [off, off]);
                                    }
                                }
                            }
                        }
                        GgmlType::Q6_K => {
                            let high2 = _mm256_set1_epi8(0x30);
                            for (sb, b) in w.chunks_exact(210).enumerate() {
                                let d = f16_at(b, 208);
                                let scales = &b[192..208];
                                for n in 0..2 {
                                    let ql0 = _mm256_loadu_si256(b.as_ptr().add(64 * n).cast());
                                    let ql1 = _mm256_loadu_si256(b.as_ptr().add(64 * n + 32).cast());
                                    let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * n).cast());
                                    let groups = [
                                        _mm256_or_si256(
                                            _mm256_and_si256(ql0, low4),
                                            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), high2),
                                        ),
                                        _mm256_or_si256(
                                            _mm256_and_si256(ql1, low4),
                                            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), high2),
                                        ),
                                        _mm256_or_si256(
                                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                                            _mm256_and_si256(qh, high2),
                                        ),
                                        _mm256_or_si256(
                                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                                            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), high2),
                                        ),
                                    ];
                                    for (t, q) in groups.into_iter().enumerate() {
                                        let j = 4 * n + t;
                                        let lo = d * scales[2 * j] as i8 as f32;
                                        let hi = d * scales[2 * j + 1] as i8 as f32;
                                        acc.group(8 * sb + j, q, false, true, [lo, hi], [32.0 * lo, 32.0 * hi]);
                                    }
                                }
                            }
                        }
                        _ => unreachable!("dot_rows of {ty}: `available` is checked"),
                    }
                    acc.finish(out);
                }
            }

            /// The 32 nibbles of 16 bytes as bytes: low nibbles are values 0..16, high ones 16..32.
            #[target_feature(enable = $features)]
            #[inline]
            fn nibbles(bytes: __m128i, low4: __m256i) -> __m256i {
                let both = _mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes);
                _mm256_and_si256(both, low4)
            }
        }
    };
}

kernels!(avx2, "avx2,fma,f16c", pairs_avx2);
kernels!(vnni, "avx2,fma,f16c,avxvnni", pairs_vnni);
kernels!(vnni512, "avx2,fma,f16c,avx512vnni,avx512vl", pairs_vnni512);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quant::{
        dot::{Operands, dot},
        unpack::{GROUP, has_offsets, unpack_row},
    };

    /// Each direct kernel against the decoded row's plain dot product, for 1..=4 rows at once.
    #[test]
    fn direct_kernels_equal_the_decoded_dot_product() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
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
            let mut w: Vec<u8> = (0..super::super::row_bytes(ty, k)).map(|_| next() as u8).collect();
            let d_at: &[usize] = match ty {
                GgmlType::Q4_K => &[0, 2],
                GgmlType::Q6_K => &[208],
                _ => &[0],
            };
            for b in w.chunks_exact_mut(ty.type_size()) {
                for &at in d_at {
                    let v = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
                    b[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
            let x: Vec<f32> = (0..ROWS * k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            let acts = QuantizedRows::new(&x, k, super::super::act::ActFormat::for_weights(ty));
            let (mut wq, mut ws) = (vec![0i8; k], vec![[0f32; 4]; k / GROUP]);
            unpack_row(ty, &w, &mut wq, &mut ws);
            for build in Build::supported() {
                for n in 1..=ROWS {
                    let mut got = vec![0f32; n];
                    dot_rows_on(build, ty, &w, &acts, ROWS - n, &mut got);
                    for (r, g) in got.iter().enumerate() {
                        let (xq, xd, xs) = acts.row(ROWS - n + r);
                        let want = dot(&Operands { wq: &wq, ws: &ws, xq, xd, xs, offsets: has_offsets(ty) });
                        let what = format!("{ty} {build:?} n={n} row {r}: {g} vs {want}");
                        assert!((g - want).abs() <= 1e-4 * want.abs().max(1.0), "{what}");
                    }
                }
            }
        }
    }
}
