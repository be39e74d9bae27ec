//! Tensors on a device and the compute ops of Tessera's forward pass.
//!
//! This crate knows nothing of models, networks or tokenizers. It owns:
//! - [`Tensor`]: a contiguous, row-major buffer with a shape, a [`DType`] and a [`Device`];
//! - [`ops`]: the operations the forward pass is built from, each validating its inputs and dispatching on
//!   the tensors' device. Callers only ever go through [`ops`], so a CUDA device slots in as another arm of
//!   each dispatch without touching them;
//! - [`rope`]: the rotary-embedding frequency tables (default, linear, dynamic NTK and llama3 scaling);
//! - [`cpu`]: the CPU implementations on plain slices, multi-threaded with rayon where it pays;
//! - `cuda` (feature `cuda`, on by default): the CUDA device, loaded at run time: a context and stream per
//!   GPU, the `.cu` kernels in `kernels/cuda/` compiled by NVRTC, cuBLAS, NCCL, and each op's CUDA arm
//!   (`cuda::ops`);
//! - `device`, `dtype`, `error`, `tensor`: the types above, and [`ensure_available`], [`synchronize`],
//!   [`memory_info`], [`device_name`] for what a device can do in this process.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod ops;
pub mod rope;
mod tensor;

pub use device::{Device, ParseDeviceError};
pub use dtype::{DType, GgmlType};
pub use error::{KernelError, Result};
pub use tensor::Tensor;

/// Checks that `device` can be used in this process. A free function rather than a method of `Device`,
/// whose module the error type depends on.
pub fn ensure_available(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => cuda::gpu(i).map(|_| ()),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            Err(KernelError::Unavailable(device, "this build of tessera has no CUDA backend; use --device cpu".into()))
        }
    }
}

/// Waits until all work queued on `device` is done (a no-op on the CPU, whose ops are synchronous), and
/// reports any error a kernel raised meanwhile. Benchmarks time with it.
pub fn synchronize(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => cuda::gpu(i)?.synchronize(),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => ensure_available(device),
    }
}

/// Free and total memory of `device` in bytes (`None` for the CPU, where the worker reads /proc/meminfo).
pub fn memory_info(device: Device) -> Result<Option<(usize, usize)>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => Ok(Some(cuda::gpu(i)?.memory()?)),
        _ => Ok(None),
    }
}

/// A human-readable name of the device (the GPU's marketing name, or "cpu").
pub fn device_name(device: Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => cuda::gpu(i).map_or_else(|e| e.to_string(), |g| format!("{device} {}", g.name)),
        _ => device.to_string(),
    }
}
