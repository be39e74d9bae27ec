//! `--quantize`: a safetensors model's matrices quantized as they load, so a bf16 checkpoint is served in
//! llama.cpp's block formats without converting it first, on the CPU or (the blocks uploaded as a GGUF
//! file's are) on a GPU.
//!
//! The choice per tensor follows llama.cpp's quantizer (`llama_tensor_get_type`, no importance matrix):
//! every matrix takes the chosen format, except the output projection (or, when it is tied, the
//! embedding that serves as it), which takes Q6_K for `q4_0` and `q4_k` (`q8_0` keeps Q8_0). A row that is
//! not whole blocks falls back as llama.cpp falls back (Q4_K to Q5_0, Q6_K to Q8_0); where llama.cpp would
//! give up (a row that is not whole 32-value blocks), the matrix stays f32. Norms and biases stay f32.

use std::{fmt, str::FromStr};

use tessera_kernels::{DType, GgmlType, Tensor};

use crate::error::ModelError;

/// The formats `--quantize` offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum QuantizeTo {
    Q8_0,
    Q4_0,
    Q4_K,
}

impl FromStr for QuantizeTo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(QuantizeTo::Q8_0),
            "q4_0" => Ok(QuantizeTo::Q4_0),
            "q4_k" => Ok(QuantizeTo::Q4_K),
            other => Err(format!("unknown quantization {other:?}; choose q8_0, q4_0 or q4_k")),
        }
    }
}

impl fmt::Display for QuantizeTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuantizeTo::Q8_0 => "q8_0",
            QuantizeTo::Q4_0 => "q4_0",
            QuantizeTo::Q4_K => "q4_k",
        })
    }
}

impl QuantizeTo {
    fn base(self) -> GgmlType {
        match self {
            QuantizeTo::Q8_0 => GgmlType::Q8_0,
            QuantizeTo::Q4_0 => GgmlType::Q4_0,
            QuantizeTo::Q4_K => GgmlType::Q4_K,
        }
    }

    /// The format of the matrix `name` with rows of `cols` values (`tied`: the embedding is also the output
    /// projection), or `None` to keep it f32.
    pub fn type_for(self, name: &str, cols: usize, tied: bool) -> Option<GgmlType> {
        let output = name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight");
        let mut ty = match self.base() {
            GgmlType::Q8_0 => GgmlType::Q8_0,
            _ if output => GgmlType::Q6_K,
            base => base,
        };
        if !cols.is_multiple_of(ty.block_size()) {
            ty = match ty {
                GgmlType::Q4_K => GgmlType::Q5_0,
                GgmlType::Q6_K => GgmlType::Q8_0,
                other => other,
            };
        }
        cols.is_multiple_of(ty.block_size()).then_some(ty)
    }

    /// `t`, the weight `name`, quantized if it is a matrix (norms and biases are returned as they are).
    pub fn apply(self, name: &str, t: Tensor, tied: bool) -> Result<Tensor, ModelError> {
        if t.rank() != 2 || !name.ends_with(".weight") || name.ends_with("norm.weight") {
            return Ok(t);
        }
        match self.type_for(name, t.dim(1), tied) {
            Some(ty) => Ok(t.to_dtype(DType::Quant(ty))?),
            None => Ok(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_projection_takes_q6_k_and_short_rows_fall_back() {
        let q4k = QuantizeTo::Q4_K;
        assert_eq!(q4k.type_for("model.layers.0.mlp.up_proj.weight", 4096, false), Some(GgmlType::Q4_K));
        assert_eq!(q4k.type_for("lm_head.weight", 4096, false), Some(GgmlType::Q6_K));
        assert_eq!(q4k.type_for("model.embed_tokens.weight", 4096, false), Some(GgmlType::Q4_K));
        assert_eq!(q4k.type_for("model.embed_tokens.weight", 4096, true), Some(GgmlType::Q6_K));
        assert_eq!(q4k.type_for("model.layers.0.mlp.down_proj.weight", 288, false), Some(GgmlType::Q5_0));
        assert_eq!(q4k.type_for("lm_head.weight", 288, false), Some(GgmlType::Q8_0));
        assert_eq!(q4k.type_for("lm_head.weight", 172, false), None);
        assert_eq!(QuantizeTo::Q4_0.type_for("lm_head.weight", 64, false), Some(GgmlType::Q8_0));
        assert_eq!(QuantizeTo::Q8_0.type_for("lm_head.weight", 4096, false), Some(GgmlType::Q8_0));
        assert_eq!("Q4_K".parse::<QuantizeTo>(), Ok(QuantizeTo::Q4_K));
        assert!("q3_k".parse::<QuantizeTo>().unwrap_err().contains("q8_0, q4_0 or q4_k"));
    }

    #[test]
    fn norms_and_biases_stay_f32() {
        let m = Tensor::from_f32(vec![0.25; 64], &[2, 32]).unwrap();
        let q = QuantizeTo::Q8_0.apply("model.layers.0.self_attn.q_proj.weight", m.clone(), false).unwrap();
        assert_eq!(q.dtype(), DType::Quant(GgmlType::Q8_0));
        let n = QuantizeTo::Q8_0.apply("model.layers.0.input_layernorm.weight", m.clone(), false).unwrap();
        assert_eq!(n.dtype(), DType::F32);
        let b = Tensor::from_f32(vec![0.25; 32], &[32]).unwrap();
        assert_eq!(
            QuantizeTo::Q8_0.apply("model.layers.0.self_attn.q_proj.bias", b, false).unwrap().dtype(),
            DType::F32
        );
    }
}
