//! Tessera's GGUF support: reading llama.cpp's model files (`*.Q4_K_M.gguf`, `*.Q8_0.gguf`, ...) safely,
//! and the scalar reference (de)quantization of llama.cpp's block formats, bit-exact with llama.cpp.
//!
//! | module | owns |
//! | --- | --- |
//! | [`reader`] | [`GgufFile::open`]: memory-maps a file, parses and validates the GGUF v2/v3 header as untrusted input, and hands out [`Tensor`] views (name, shape, type, bytes in the map) |
//! | [`metadata`] | the key/value pairs: [`Value`], [`Array`], [`GgufString`], and [`Metadata`] with typed getters (`get_u32`, `get_str`, `get_f32_array`, ...) |
//! | [`quants`] | [`GgmlType`] (llama.cpp's type ids, block and type sizes) and [`dequantize`] / [`quantize`], one plain function per block format: the reference faster kernels are checked against |
//! | `kquants` | the Q4_K and Q6_K quantizers behind [`quantize`], as llama.cpp's reference quantizer searches for their scales |
//! | [`error`] | [`GgufError`]: every failure of reading a file or its metadata, each message naming the file and the key or tensor concerned |
//!
//! ```no_run
//! use tessera_gguf::{GgufFile, Metadata};
//!
//! let file = GgufFile::open("model.Q4_K_M.gguf")?;
//! let md = file.metadata();
//! let arch = md.get_str("general.architecture")?;
//! let n_layers = md.get_u32(&format!("{arch}.block_count"))?;
//! let rope_base = md.optional(&format!("{arch}.rope.freq_base"), Metadata::get_f32)?.unwrap_or(10_000.0);
//! let tokens = md.get_str_array("tokenizer.ggml.tokens")?;
//! for tensor in file.tensors() {
//!     println!("{} {:?} {} ({} bytes)", tensor.name(), tensor.shape(), tensor.ggml_type(), tensor.data().len());
//! }
//! let embeddings: Vec<f32> = file.tensor("token_embd.weight").expect("present").dequantize()?;
//! # let _ = (n_layers, rope_base, tokens, embeddings);
//! # Ok::<(), tessera_gguf::GgufError>(())
//! ```
//!
//! The fixtures in `testdata/gguf/` and the tests in `gguf/tests/` check all of this against llama.cpp's
//! own Python package (gguf-py); `scripts/make_gguf_fixtures.py` regenerates them.

pub mod error;
mod kquants;
pub mod metadata;
pub mod quants;
pub mod reader;

pub use error::GgufError;
pub use metadata::{Array, GgufString, Metadata, Value, ValueType};
pub use quants::{GgmlType, QuantError, dequantize, quantize};
pub use reader::{GgufFile, Tensor, TensorInfo};
