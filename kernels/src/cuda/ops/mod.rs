//! The CUDA implementations behind [`crate::ops`]: buffer management, the kernel launches and cuBLAS
//! GEMMs. Shapes, dtypes and indices were checked by `ops` before anything here runs; what is checked
//! here is what only the device can tell (allocation, launch and copy errors).
//!
//! Activations and weights are bf16 with f32 accumulation; logits may be produced in f32.
//!
//! One module per family of ops; this one only names them and re-exports what the rest of the crate calls
//! (`crate::cuda::ops::linear` and so on). The modules share helpers through [`launch`] and [`blas`], never
//! through this one.

mod attention;
mod blas;
mod dense_attention;
mod elementwise;
mod gather;
mod launch;
mod linear;
mod memory;
mod norm;
mod quant;
mod rope;
mod sampling;

pub(crate) use attention::paged_attention;
pub(crate) use elementwise::{add_inplace, add_rows_scaled, copy_cols, silu_mul, silu_mul_packed};
pub(crate) use gather::{embedding, gather_rows, write_kv};
pub(crate) use linear::linear;
pub(crate) use memory::{
    cast, concat, copy_range, count_nonfinite, fill_bits, to_host_f32, uniform, upload_bf16, upload_f32, zeros,
};
pub(crate) use norm::{add_rms_norm, rms_norm};
pub(crate) use quant::{to_host_bytes, upload_quant};
pub(crate) use rope::rope;
pub(crate) use sampling::{argmax, sample};
