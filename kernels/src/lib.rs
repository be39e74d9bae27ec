//! Tensors on a device and the compute ops of Tessera's forward pass.
//!
//! This crate knows nothing of models, networks or tokenizers. It owns:
//! - [`Tensor`]: a contiguous, row-major buffer with a shape, a [`DType`] and a [`Device`];
//! - [`ops`]: the operations the forward pass is built from, each validating its inputs and dispatching on
//!   the tensors' device. Callers only ever go through [`ops`], so a CUDA device slots in as another arm of
//!   each dispatch without touching them;
//! - [`rope`]: the rotary-embedding frequency tables (default, linear, dynamic NTK and llama3 scaling);
//! - [`cpu`]: the CPU implementations on plain slices, multi-threaded with rayon where it pays.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod ops;
pub mod rope;
mod tensor;

pub use device::Device;
pub use dtype::DType;
pub use error::KernelError;
pub use tensor::Tensor;

/// Result type of every fallible operation in this crate.
pub type Result<T> = std::result::Result<T, KernelError>;
