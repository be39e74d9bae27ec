//! The one error type of the kernels crate: every shape, dtype or device misuse is reported, never panicked.

use crate::{
    device::{Device, ParseDeviceError},
    dtype::DType,
};

/// Result type of every fallible operation in this crate.
pub type Result<T> = std::result::Result<T, KernelError>;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: expected dtype {expected}, got {got}")]
    DType { op: &'static str, expected: DType, got: DType },
    #[error("{op}: not supported on device {device}")]
    Device { op: &'static str, device: Device },
    #[error("{op}: index out of range: {detail}")]
    Index { op: &'static str, detail: String },
    #[error("{op}: {detail}")]
    Unsupported { op: &'static str, detail: String },
    #[error(transparent)]
    BadDevice(#[from] ParseDeviceError),
    #[error("device {0} is not available: {1}")]
    Unavailable(Device, String),
    #[error("CUDA kernel module {module}.cu failed to compile:\n{log}")]
    Compile { module: String, log: String },
    #[error("{device}: {detail}")]
    Cuda { device: Device, detail: String },
    #[error("{device}: cannot allocate {bytes} bytes")]
    OutOfMemory { bytes: usize, device: Device },
}

impl KernelError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        KernelError::Shape { op, detail: detail.into() }
    }
    pub(crate) fn index(op: &'static str, detail: impl Into<String>) -> Self {
        KernelError::Index { op, detail: detail.into() }
    }
}
