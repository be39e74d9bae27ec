//! Element types a tensor can hold.

use std::fmt;

pub use tessera_gguf::GgmlType;

/// Element type. Compute on the CPU is f32; bf16/f16 exist for weights as stored on disk and for the GPU;
/// `Quant` is a weight matrix kept in one of llama.cpp's block formats (on either device), whose rows are
/// whole blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    Quant(GgmlType),
}

impl DType {
    /// Bytes that `numel` elements take (for `Quant`, whole blocks: `numel` a multiple of the block size).
    pub fn bytes_for(self, numel: usize) -> usize {
        match self {
            DType::F32 => numel * 4,
            DType::BF16 | DType::F16 => numel * 2,
            DType::Quant(t) => numel / t.block_size() * t.type_size(),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DType::F32 => f.write_str("f32"),
            DType::BF16 => f.write_str("bf16"),
            DType::F16 => f.write_str("f16"),
            DType::Quant(t) => write!(f, "{t}"),
        }
    }
}
