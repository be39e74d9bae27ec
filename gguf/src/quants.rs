//! llama.cpp's tensor element types ([`GgmlType`]) and the scalar reference (de)quantization of its
//! block formats.
//!
//! A quantized tensor is a sequence of blocks; each block encodes [`GgmlType::block_size`] consecutive
//! values of a row in [`GgmlType::type_size`] bytes (the layouts are ggml's `block_*` structs in
//! `ggml-common.h`: all fields little-endian, `ggml_half` an IEEE f16). The float types are "blocks" of one.
//!
//! [`dequantize`] handles F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K.
//! [`quantize`] handles F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and Q4_K and Q6_K (in
//! [`crate::kquants`], llama.cpp's reference quantizer without an importance matrix). Every other type (Q8_1, Q8_K, the
//! IQ*, TQ*, MXFP4, NVFP4, Q1_0, Q2_0 and integer types) is named, sized and can be read from a file, but
//! (de)quantizing it is a [`QuantError`] naming the type.
//!
//! The code is deliberately plain, one function per type and block, written from ggml-quants.c's
//! `dequantize_row_*` and `quantize_row_*_ref`: it is the reference that faster kernels are checked
//! against, and it is bit-exact with llama.cpp's gguf-py (`gguf.quants`), which the tests in
//! `gguf/tests/` compare against on random blocks (`to_bits()` equality, byte equality). The arithmetic is
//! done in f32 in the same order as ggml's C (Rust never fuses a multiply and an add), so it matches
//! llama.cpp's scalar C code as well.
//!
//! gguf-py has no K-quant quantizer, so Q4_K and Q6_K are checked against llama.cpp's own
//! (`llama_model_quantize`) instead; Q2_K, Q3_K and Q5_K are not quantized here.
//!
//! Corner cases, none of which the fixtures exercise: f32 to f16 uses the `half` crate's round to nearest
//! even (as ggml does), but a NaN's payload may differ from ggml's; for Q4_0/Q5_0 the sign of a zero scale
//! follows ggml's C loop (first strictly larger magnitude), which differs from gguf-py's `argmax` only for
//! an all-zero block starting with `-0.0`.

use std::fmt;

use half::f16;

/// Values per K-quant super-block (`QK_K` in ggml).
pub const QK_K: usize = 256;

/// A tensor element type, with llama.cpp's type ids (`enum ggml_type`).
///
/// Ids 4 and 5 (Q4_2, Q4_3), 31..=33 (Q4_0_4_4, ...) and 36..=38 (IQ4_NL_4_4, ...) were removed from
/// ggml and are not accepted in files.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
#[non_exhaustive]
pub enum GgmlType {
    /// IEEE f32.
    F32 = 0,
    /// IEEE f16.
    F16 = 1,
    /// 32 values: f16 scale `d`, 4-bit quants; `x = d * (q - 8)`.
    Q4_0 = 2,
    /// 32 values: f16 scale `d` and minimum `m`, 4-bit quants; `x = d * q + m`.
    Q4_1 = 3,
    /// 32 values: f16 scale, 5-bit quants (high bits packed in a u32); `x = d * (q - 16)`.
    Q5_0 = 6,
    /// 32 values: f16 scale and minimum, 5-bit quants; `x = d * q + m`.
    Q5_1 = 7,
    /// 32 values: f16 scale, i8 quants; `x = d * q`.
    Q8_0 = 8,
    /// 32 values: f16 scale and sum, i8 quants (an intermediate format for dot products).
    Q8_1 = 9,
    /// 256 values: 16 sub-blocks with 4-bit scales and mins, 2-bit quants.
    Q2_K = 10,
    /// 256 values: 16 sub-blocks with 6-bit scales, 3-bit quants.
    Q3_K = 11,
    /// 256 values: 8 sub-blocks with 6-bit scales and mins, 4-bit quants.
    Q4_K = 12,
    /// 256 values: 8 sub-blocks with 6-bit scales and mins, 5-bit quants.
    Q5_K = 13,
    /// 256 values: 16 sub-blocks with i8 scales, 6-bit quants.
    Q6_K = 14,
    /// 256 values: f32 scale, i8 quants, block sums (an intermediate format for dot products).
    Q8_K = 15,
    /// IQ2_XXS (not (de)quantized here).
    IQ2_XXS = 16,
    /// IQ2_XS (not (de)quantized here).
    IQ2_XS = 17,
    /// IQ3_XXS (not (de)quantized here).
    IQ3_XXS = 18,
    /// IQ1_S (not (de)quantized here).
    IQ1_S = 19,
    /// IQ4_NL (not (de)quantized here).
    IQ4_NL = 20,
    /// IQ3_S (not (de)quantized here).
    IQ3_S = 21,
    /// IQ2_S (not (de)quantized here).
    IQ2_S = 22,
    /// IQ4_XS (not (de)quantized here).
    IQ4_XS = 23,
    /// i8 (not (de)quantized here).
    I8 = 24,
    /// i16 (not (de)quantized here).
    I16 = 25,
    /// i32 (not (de)quantized here).
    I32 = 26,
    /// i64 (not (de)quantized here).
    I64 = 27,
    /// f64 (not (de)quantized here).
    F64 = 28,
    /// IQ1_M (not (de)quantized here).
    IQ1_M = 29,
    /// bfloat16: the top 16 bits of an f32.
    BF16 = 30,
    /// TQ1_0 (not (de)quantized here).
    TQ1_0 = 34,
    /// TQ2_0 (not (de)quantized here).
    TQ2_0 = 35,
    /// MXFP4 (not (de)quantized here).
    MXFP4 = 39,
    /// NVFP4 (not (de)quantized here).
    NVFP4 = 40,
    /// Q1_0 (not (de)quantized here).
    Q1_0 = 41,
    /// Q2_0 (not (de)quantized here).
    Q2_0 = 42,
}

impl GgmlType {
    /// Every type, in id order.
    pub const ALL: [GgmlType; 35] = {
        use GgmlType::*;
        [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ2_XXS, IQ2_XS, IQ3_XXS,
            IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64, IQ1_M, BF16, TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0,
            Q2_0,
        ]
    };

    /// The type with llama.cpp's id `id`.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// llama.cpp's id of the type.
    pub const fn id(self) -> u32 {
        self as u32
    }

    /// llama.cpp's name of the type (`Q4_K`, `BF16`, ...).
    pub const fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
            Q2_0 => "Q2_0",
        }
    }

    /// Values per block (1 for the plain number types).
    pub const fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            NVFP4 | Q2_0 => 64,
            Q1_0 => 128,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ3_S | IQ2_S | IQ4_XS
            | IQ1_M | TQ1_0 | TQ2_0 => QK_K,
        }
    }

    /// Bytes per block: `sizeof(block_*)` in ggml-common.h.
    ///
    /// Q8_1 is 36 bytes (two f16 and 32 i8), as in ggml; gguf-py's `GGML_QUANT_SIZES` says 40, a leftover
    /// from when its two scales were f32.
    pub const fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            I8 => 1,
            I16 => 2,
            I32 => 4,
            I64 | F64 => 8,
            Q4_0 => 2 + 16,
            Q4_1 => 2 + 2 + 16,
            Q5_0 => 2 + 4 + 16,
            Q5_1 => 2 + 2 + 4 + 16,
            Q8_0 => 2 + 32,
            Q8_1 => 2 + 2 + 32,
            Q2_K => QK_K / 16 + QK_K / 4 + 2 + 2,
            Q3_K => QK_K / 8 + QK_K / 4 + 12 + 2,
            Q4_K => 2 + 2 + 12 + QK_K / 2,
            Q5_K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            Q8_K => 4 + QK_K + QK_K / 16 * 2,
            IQ2_XXS => 2 + QK_K / 4,
            IQ2_XS => 2 + QK_K / 4 + QK_K / 32,
            IQ3_XXS => 2 + 3 * QK_K / 8,
            IQ1_S => 2 + QK_K / 8 + QK_K / 16,
            IQ4_NL => 2 + 16,
            IQ3_S => 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + QK_K / 64,
            IQ2_S => 2 + QK_K / 4 + QK_K / 16,
            IQ4_XS => 2 + 2 + QK_K / 64 + QK_K / 2,
            IQ1_M => QK_K / 8 + QK_K / 16 + QK_K / 32,
            TQ1_0 => (QK_K - 4 * QK_K / 64) / 5 + QK_K / 64 + 2,
            TQ2_0 => QK_K / 4 + 2,
            MXFP4 => 1 + 16,
            NVFP4 => 4 + 32,
            Q1_0 => 2 + 128 / 8,
            Q2_0 => 2 + 64 / 4,
        }
    }

    /// Whether [`dequantize`] supports the type.
    pub const fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K)
    }

    /// Whether [`quantize`] supports the type.
    pub const fn can_quantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4_K | Q6_K)
    }

    /// Bytes that `n_elements` values take; `None` if that is not a whole number of blocks or overflows.
    pub const fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let block = self.block_size() as u64;
        if !n_elements.is_multiple_of(block) {
            return None;
        }
        (n_elements / block).checked_mul(self.type_size() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a buffer could not be (de)quantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// The type has no dequantization here.
    #[error("dequantizing {0} is not supported")]
    DequantizeUnsupported(GgmlType),
    /// The type has no quantization here.
    #[error("quantizing to {0} is not supported")]
    QuantizeUnsupported(GgmlType),
    /// The input bytes are not a whole number of blocks.
    #[error("{ggml_type}: {len} bytes is not a whole number of {type_size}-byte blocks")]
    PartialBlockBytes {
        /// The type.
        ggml_type: GgmlType,
        /// Bytes given.
        len: usize,
        /// Bytes per block.
        type_size: usize,
    },
    /// The input values are not a whole number of blocks.
    #[error("{ggml_type}: {len} values is not a whole number of {block_size}-value blocks")]
    PartialBlockValues {
        /// The type.
        ggml_type: GgmlType,
        /// Values given.
        len: usize,
        /// Values per block.
        block_size: usize,
    },
    /// The output slice's length is not the number of values the input holds.
    #[error("{ggml_type}: the input holds {expected} values but the output has room for {got}")]
    OutputLength {
        /// The type.
        ggml_type: GgmlType,
        /// Values in the input.
        expected: usize,
        /// Length of the output.
        got: usize,
    },
}

/// Decodes `bytes`, a whole number of `ty` blocks, into `out`, which must have exactly
/// `bytes.len() / ty.type_size() * ty.block_size()` elements.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    if !ty.can_dequantize() {
        return Err(QuantError::DequantizeUnsupported(ty));
    }
    if !bytes.len().is_multiple_of(ty.type_size()) {
        return Err(QuantError::PartialBlockBytes { ggml_type: ty, len: bytes.len(), type_size: ty.type_size() });
    }
    let expected = bytes.len() / ty.type_size() * ty.block_size();
    if out.len() != expected {
        return Err(QuantError::OutputLength { ggml_type: ty, expected, got: out.len() });
    }
    use GgmlType::*;
    match ty {
        F32 => each_block(bytes, out, |b: &[u8; 4], y: &mut [f32; 1]| y[0] = f32::from_le_bytes(*b)),
        F16 => each_block(bytes, out, |b: &[u8; 2], y: &mut [f32; 1]| y[0] = f16_le(b, 0)),
        BF16 => each_block(bytes, out, |b: &[u8; 2], y: &mut [f32; 1]| y[0] = bf16_to_f32(u16::from_le_bytes(*b))),
        Q4_0 => each_block(bytes, out, dequantize_q4_0),
        Q4_1 => each_block(bytes, out, dequantize_q4_1),
        Q5_0 => each_block(bytes, out, dequantize_q5_0),
        Q5_1 => each_block(bytes, out, dequantize_q5_1),
        Q8_0 => each_block(bytes, out, dequantize_q8_0),
        Q2_K => each_block(bytes, out, dequantize_q2_k),
        Q3_K => each_block(bytes, out, dequantize_q3_k),
        Q4_K => each_block(bytes, out, dequantize_q4_k),
        Q5_K => each_block(bytes, out, dequantize_q5_k),
        Q6_K => each_block(bytes, out, dequantize_q6_k),
        _ => return Err(QuantError::DequantizeUnsupported(ty)),
    }
    Ok(())
}

/// Encodes `src`, a whole number of `ty` blocks of values, and appends the blocks to `out`
/// (`src.len() / ty.block_size() * ty.type_size()` bytes).
pub fn quantize(ty: GgmlType, src: &[f32], out: &mut Vec<u8>) -> Result<(), QuantError> {
    if !ty.can_quantize() {
        return Err(QuantError::QuantizeUnsupported(ty));
    }
    if !src.len().is_multiple_of(ty.block_size()) {
        return Err(QuantError::PartialBlockValues { ggml_type: ty, len: src.len(), block_size: ty.block_size() });
    }
    out.reserve(src.len() / ty.block_size() * ty.type_size());
    use GgmlType::*;
    match ty {
        F32 => src.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        F16 => src.iter().for_each(|&x| out.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes())),
        BF16 => src.iter().for_each(|&x| out.extend_from_slice(&f32_to_bf16(x).to_le_bytes())),
        Q4_0 => quantize_blocks(src, out, quantize_q4_0),
        Q4_1 => quantize_blocks(src, out, quantize_q4_1),
        Q5_0 => quantize_blocks(src, out, quantize_q5_0),
        Q5_1 => quantize_blocks(src, out, quantize_q5_1),
        Q8_0 => quantize_blocks(src, out, quantize_q8_0),
        Q4_K => quantize_blocks(src, out, crate::kquants::quantize_q4_k),
        Q6_K => quantize_blocks(src, out, crate::kquants::quantize_q6_k),
        _ => return Err(QuantError::QuantizeUnsupported(ty)),
    }
    Ok(())
}

/// Runs `f` on each `B`-byte block of `bytes` and the `N` values of `out` it decodes to. The caller has
/// checked that both are whole numbers of blocks and that they match.
fn each_block<const B: usize, const N: usize>(bytes: &[u8], out: &mut [f32], f: impl Fn(&[u8; B], &mut [f32; N])) {
    let (blocks, _) = bytes.as_chunks::<B>();
    let (outs, _) = out.as_chunks_mut::<N>();
    debug_assert_eq!(blocks.len(), outs.len());
    for (block, y) in blocks.iter().zip(outs) {
        f(block, y);
    }
}

/// Appends `f`'s encoding of each `N`-value block of `src` (whose length the caller has checked).
fn quantize_blocks<const N: usize, const B: usize>(src: &[f32], out: &mut Vec<u8>, f: impl Fn(&[f32; N]) -> [u8; B]) {
    let (blocks, _) = src.as_chunks::<N>();
    for block in blocks {
        out.extend_from_slice(&f(block));
    }
}

/// The little-endian f16 at `b[at..at + 2]`, widened (exactly) to f32.
fn f16_le(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// bfloat16 bits to f32: the bits become the top half of the f32 (exact, NaN payloads included).
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 to bfloat16 bits as ggml does it (`ggml_compute_fp32_to_bf16`): round to nearest even, and a NaN
/// stays a NaN (quieted) rather than rounding to infinity.
fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    // No overflow: the largest non-NaN bit pattern is -inf, 0xff80_0000.
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// The f32 as the f16 bytes of a block's scale field.
fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

// ---------------------------------------------------------------------------------------------------------
// Dequantization, one block at a time. Layouts from ggml-common.h; formulas from ggml-quants.c.
// ---------------------------------------------------------------------------------------------------------

/// `block_q4_0`: `d: f16, qs: [u8; 16]`. Value `j` is the low nibble of `qs[j]`, value `j + 16` the high
/// nibble; `x = (q - 8) * d`.
fn dequantize_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_le(b, 0);
    let qs = &b[2..18];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1`: `d: f16, m: f16, qs: [u8; 16]`; nibbles as in Q4_0; `x = q * d + m`.
fn dequantize_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_le(b, 0);
    let m = f16_le(b, 2);
    let qs = &b[4..20];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// `block_q5_0`: `d: f16, qh: [u8; 4], qs: [u8; 16]`. The low four bits as in Q4_0; bit `j` of the
/// little-endian u32 `qh` is the fifth bit of value `j`; `x = (q - 16) * d`.
fn dequantize_q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_le(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = (((q & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// `block_q5_1`: `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`; bits as in Q5_0; `x = q * d + m`.
fn dequantize_q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_le(b, 0);
    let m = f16_le(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = ((q & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) | h1) as f32 * d + m;
    }
}

/// `block_q8_0`: `d: f16, qs: [i8; 32]`; `x = q * d`.
fn dequantize_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_le(b, 0);
    for (out, &q) in y.iter_mut().zip(&b[2..34]) {
        *out = (q as i8) as f32 * d;
    }
}

/// `block_q2_K`: `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`.
///
/// The 256 values are two halves of 128; half `n` reads the 32 bytes `qs[32n..32n + 32]` four times, at
/// bit shifts 0, 2, 4, 6, each pass giving 32 values. Every 16 values have their own scale byte
/// (`scales[v / 16]` for value `v`): low nibble times `d` is the step, high nibble times `dmin` the offset;
/// `x = d * (sc & 15) * q - dmin * (sc >> 4)`.
fn dequantize_q2_k(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_le(b, 80);
    let dmin = f16_le(b, 82);
    for (n, (q, y_half)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(128)).enumerate() {
        for (pass, y32) in y_half.chunks_exact_mut(32).enumerate() {
            let shift = 2 * pass;
            for (sub, y16) in y32.chunks_exact_mut(16).enumerate() {
                let sc = scales[n * 8 + pass * 2 + sub];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for (l, out) in y16.iter_mut().enumerate() {
                    let quant = (q[sub * 16 + l] >> shift) & 3;
                    *out = dl * quant as f32 - ml;
                }
            }
        }
    }
}

/// The sixteen 6-bit scales of a Q3_K block, unpacked from 12 bytes and re-centred (`- 32`).
///
/// Scale `j`'s low four bits are the low nibble of byte `j` for `j < 8`, else the high nibble of byte
/// `j - 8`; its high two bits are bits `2 * (j / 4)..` of byte `8 + j % 4`.
fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    })
}

/// `block_q3_K`: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`.
///
/// The low two bits of each quant are laid out as in Q2_K. The third bit of value `v` is bit
/// `v / 32` of `hmask[v % 32]`, and it is inverted: a clear bit subtracts 4. Every 16 values have a signed
/// 6-bit scale; `x = d * scale * q` with `q` in `-4..=3`.
fn dequantize_q3_k(b: &[u8; 110], y: &mut [f32; QK_K]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_le(b, 108);
    for (n, (q, y_half)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(128)).enumerate() {
        for (pass, y32) in y_half.chunks_exact_mut(32).enumerate() {
            let shift = 2 * pass;
            let hbit = 1u8 << (n * 4 + pass);
            for (sub, y16) in y32.chunks_exact_mut(16).enumerate() {
                let dl = d * scales[n * 8 + pass * 2 + sub] as f32;
                for (l, out) in y16.iter_mut().enumerate() {
                    let i = sub * 16 + l;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let quant = if hmask[i] & hbit != 0 { low } else { low - 4 };
                    *out = dl * quant as f32;
                }
            }
        }
    }
}

/// Scale and minimum of sub-block `j` (0..8) of a Q4_K or Q5_K block, each 6 bits, from the 12 packed
/// bytes (`get_scale_min_k4` in ggml): sub-blocks 0..4 use the low six bits of bytes `j` and `j + 4`;
/// sub-blocks 4..8 take their low four bits from the nibbles of byte `j + 4` and their high two bits from
/// the top bits of bytes `j - 4` and `j`.
pub(crate) fn k4_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// `block_q4_K`: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`.
///
/// Eight sub-blocks of 32 values, each with a 6-bit scale and minimum. Sub-blocks `2c` and `2c + 1` are
/// the low and high nibbles of `qs[32c..32c + 32]`; `x = d * sc * q - dmin * m`.
fn dequantize_q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_le(b, 0);
    let dmin = f16_le(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (c, (q, y64)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc_lo, m_lo) = k4_scale_min(2 * c, scales);
        let (sc_hi, m_hi) = k4_scale_min(2 * c + 1, scales);
        let (d_lo, min_lo) = (d * sc_lo as f32, dmin * m_lo as f32);
        let (d_hi, min_hi) = (d * sc_hi as f32, dmin * m_hi as f32);
        let (y_lo, y_hi) = y64.split_at_mut(32);
        for (l, &byte) in q.iter().enumerate() {
            y_lo[l] = d_lo * (byte & 0x0F) as f32 - min_lo;
            y_hi[l] = d_hi * (byte >> 4) as f32 - min_hi;
        }
    }
}

/// `block_q5_K`: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`.
///
/// As Q4_K, plus a fifth bit: bit `s` of `qh[l]` is the high bit of value `l` of sub-block `s`.
fn dequantize_q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_le(b, 0);
    let dmin = f16_le(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (c, (q, y64)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc_lo, m_lo) = k4_scale_min(2 * c, scales);
        let (sc_hi, m_hi) = k4_scale_min(2 * c + 1, scales);
        let (d_lo, min_lo) = (d * sc_lo as f32, dmin * m_lo as f32);
        let (d_hi, min_hi) = (d * sc_hi as f32, dmin * m_hi as f32);
        let (bit_lo, bit_hi) = (1u8 << (2 * c), 1u8 << (2 * c + 1));
        let (y_lo, y_hi) = y64.split_at_mut(32);
        for (l, &byte) in q.iter().enumerate() {
            let q_lo = (byte & 0x0F) + if qh[l] & bit_lo != 0 { 16 } else { 0 };
            let q_hi = (byte >> 4) + if qh[l] & bit_hi != 0 { 16 } else { 0 };
            y_lo[l] = d_lo * q_lo as f32 - min_lo;
            y_hi[l] = d_hi * q_hi as f32 - min_hi;
        }
    }
}

/// `block_q6_K`: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
///
/// Two halves of 128 values; half `n` uses `ql[64n..64n + 64]` and `qh[32n..32n + 32]`. For `l` in 0..32
/// its four values `l`, `l + 32`, `l + 64`, `l + 96` take their low nibbles from `ql[l]`, `ql[l + 32]`
/// (low nibbles), then `ql[l]`, `ql[l + 32]` (high nibbles), and their top two bits from `qh[l]` at
/// shifts 0, 2, 4, 6. Every 16 values have an i8 scale; `x = d * scale * (q - 32)`.
fn dequantize_q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let scales = &b[192..208];
    let d = f16_le(b, 208);
    for (n, y_half) in y.chunks_exact_mut(128).enumerate() {
        let ql = &ql_all[64 * n..64 * n + 64];
        let qh = &qh_all[32 * n..32 * n + 32];
        let sc = |k: usize| scales[8 * n + k] as i8 as f32;
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y_half[l] = d * sc(is) * q1 as f32;
            y_half[l + 32] = d * sc(is + 2) * q2 as f32;
            y_half[l + 64] = d * sc(is + 4) * q3 as f32;
            y_half[l + 96] = d * sc(is + 6) * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Quantization, one block at a time (`quantize_row_*_ref` in ggml-quants.c).
// ---------------------------------------------------------------------------------------------------------

/// The value of largest magnitude (the first one, if several), as ggml's Q4_0/Q5_0 loops find it.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Smallest and largest value.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `1 / d`, or 0 for a zero scale (an all-zero block then quantizes to the zero point).
fn inverse(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Q8_0: `d = absmax / 127`, `q = round(x / d)` (half away from zero).
fn quantize_q8_0(x: &[f32; 32]) -> [u8; 34] {
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
        }
    }
    let d = amax / 127.0;
    let id = inverse(d);
    let mut b = [0u8; 34];
    b[0..2].copy_from_slice(&f16_bytes(d));
    for (out, &v) in b[2..].iter_mut().zip(x) {
        *out = (v * id).round() as i8 as u8;
    }
    b
}

/// Q4_0: `d = max / -8` where `max` is the value of largest magnitude, `q = min(15, trunc(x / d + 8.5))`.
fn quantize_q4_0(x: &[f32; 32]) -> [u8; 18] {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    let mut b = [0u8; 18];
    b[0..2].copy_from_slice(&f16_bytes(d));
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        b[2 + j] = q0 | (q1 << 4);
    }
    b
}

/// Q4_1: `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - min) / d + 0.5))`.
fn quantize_q4_1(x: &[f32; 32]) -> [u8; 20] {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let mut b = [0u8; 20];
    b[0..2].copy_from_slice(&f16_bytes(d));
    b[2..4].copy_from_slice(&f16_bytes(min));
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        b[4 + j] = q0 | (q1 << 4);
    }
    b
}

/// Q5_0: `d = max / -16`, `q = min(31, trunc(x / d + 16.5))`, fifth bits gathered into `qh`.
fn quantize_q5_0(x: &[f32; 32]) -> [u8; 22] {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    let mut b = [0u8; 22];
    b[0..2].copy_from_slice(&f16_bytes(d));
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let q1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        b[6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= u32::from(q0 >> 4) << j;
        qh |= u32::from(q1 >> 4) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
    b
}

/// Q5_1: `d = (max - min) / 31`, `m = min`, `q = trunc((x - min) / d + 0.5)` (at most 31).
fn quantize_q5_1(x: &[f32; 32]) -> [u8; 24] {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    let mut b = [0u8; 24];
    b[0..2].copy_from_slice(&f16_bytes(d));
    b[2..4].copy_from_slice(&f16_bytes(min));
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as u8).min(31);
        let q1 = (((x[j + 16] - min) * id + 0.5) as u8).min(31);
        b[8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= u32::from(q0 >> 4) << j;
        qh |= u32::from(q1 >> 4) << (j + 16);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip_and_sizes_match_ggml_common() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            assert_eq!(GgmlType::from_id(removed), None);
        }
        // Spot checks against the static_asserts in ggml-common.h.
        assert_eq!(GgmlType::Q2_K.type_size(), 84);
        assert_eq!(GgmlType::Q3_K.type_size(), 110);
        assert_eq!(GgmlType::Q4_K.type_size(), 144);
        assert_eq!(GgmlType::Q5_K.type_size(), 176);
        assert_eq!(GgmlType::Q6_K.type_size(), 210);
        assert_eq!(GgmlType::Q8_K.type_size(), 292);
        assert_eq!(GgmlType::Q8_1.type_size(), 36);
        assert_eq!(GgmlType::IQ3_S.type_size(), 110);
        assert_eq!(GgmlType::TQ1_0.type_size(), 54);
    }

    #[test]
    fn bf16_rounding_is_ggmls() {
        // 1 + 2^-8 is exactly half-way between two bf16 values: ties to even (down).
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3 * 2^-8 is half-way too: ties to even (up).
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
        // A NaN whose payload lies only in the low half must stay a NaN.
        assert_eq!(f32_to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
    }

    #[test]
    fn zero_blocks_quantize_to_the_zero_point_and_back() {
        let x = [0.0f32; 32];
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0] {
            let mut bytes = Vec::new();
            quantize(ty, &x, &mut bytes).unwrap();
            assert_eq!(bytes.len(), ty.type_size());
            let mut y = [1.0f32; 32];
            dequantize(ty, &bytes, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{ty}: {y:?}");
        }
    }

    #[test]
    fn q3_k_scales_unpack_every_bit() {
        // Scale j set to j (+32 so the re-centred value is j): pack by hand with the layout described.
        let mut s = [0u8; 12];
        for j in 0..16usize {
            let v = (j as u8) + 32;
            if j < 8 {
                s[j] |= v & 0x0F;
            } else {
                s[j - 8] |= (v & 0x0F) << 4;
            }
            s[8 + j % 4] |= (v >> 4) << (2 * (j / 4));
        }
        assert_eq!(q3_k_scales(&s), std::array::from_fn(|j| j as i32));
    }
}
