//! What every op module needs around a launch: output buffers that a kernel fills entirely (so left
//! uninitialised) and the one-block-per-row launch shape.

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::bf16;

use crate::{cuda::Gpu, error::Result};

pub(super) fn alloc_bf16(gpu: &Gpu, n: usize) -> Result<CudaSlice<bf16>> {
    // SAFETY: every caller launches a kernel that writes all `n` elements before anything reads them.
    unsafe { gpu.stream.alloc::<bf16>(n.max(1)) }.map_err(|e| gpu.err("alloc", e))
}

pub(super) fn alloc_f32(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: as `alloc_bf16`.
    unsafe { gpu.stream.alloc::<f32>(n.max(1)) }.map_err(|e| gpu.err("alloc", e))
}

/// One block of `threads` per row, for the kernels that reduce over a row (norms, softmax, sampling).
pub(super) fn row_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}
