//! CPU implementations of the ops, on plain f32 slices.
//!
//! These are both the CPU backend and the reference the CUDA kernels are tested against, so each is written
//! to be read: one indexing scheme per kernel, parallelism only over independent rows. Shape checks live
//! in [`crate::ops`]; functions here `debug_assert!` the lengths they rely on.

pub mod attention;
pub mod elementwise;
pub mod lora;
pub mod matmul;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod sampling;
