//! The tensor type: a contiguous row-major buffer, its shape, dtype and device.
//!
//! Layout is always contiguous: every op in the forward pass reads and writes whole rows, and keeping views
//! out of the type keeps each kernel (CPU or CUDA) to one indexing scheme. Reshape is free; anything that
//! would need a strided view is an explicit copy.

use half::{bf16, f16};

use crate::{DType, Device, KernelError, Result};

/// Backing memory of a tensor. A CUDA buffer becomes another variant; ops dispatch on it.
#[derive(Clone, Debug)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// A CPU f32 tensor from data; `data.len()` must equal the product of `shape`.
    pub fn from_f32(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        check_len("Tensor::from_f32", data.len(), shape)?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::F32(data) })
    }

    /// A CPU bf16 tensor from data.
    pub fn from_bf16(data: Vec<bf16>, shape: &[usize]) -> Result<Self> {
        check_len("Tensor::from_bf16", data.len(), shape)?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::BF16(data) })
    }

    /// A CPU f16 tensor from data.
    pub fn from_f16(data: Vec<f16>, shape: &[usize]) -> Result<Self> {
        check_len("Tensor::from_f16", data.len(), shape)?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::F16(data) })
    }

    /// A zero-filled tensor.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        device.ensure_available()?;
        let n = shape.iter().product();
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
        };
        Ok(Tensor { shape: shape.to_vec(), storage })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Size of dimension `i`; panics only on a programming error (an index past the rank).
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
        }
    }

    pub fn device(&self) -> Device {
        Device::Cpu
    }

    /// Bytes of element data.
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype().size()
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        check_len("Tensor::reshape", self.numel(), shape)?;
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Converts to another dtype (a copy; a no-op move when the dtype already matches).
    pub fn to_dtype(self, dtype: DType) -> Tensor {
        if self.dtype() == dtype {
            return self;
        }
        let f = self.to_vec_f32();
        let storage = match dtype {
            DType::F32 => Storage::F32(f),
            DType::BF16 => Storage::BF16(f.into_iter().map(bf16::from_f32).collect()),
            DType::F16 => Storage::F16(f.into_iter().map(f16::from_f32).collect()),
        };
        Tensor { shape: self.shape, storage }
    }

    /// Copies the elements out as f32, whatever the dtype.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The elements of a CPU f32 tensor.
    pub fn as_f32(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(KernelError::DType { op: "Tensor::as_f32", expected: DType::F32, got: self.dtype() }),
        }
    }

    /// The elements of a CPU f32 tensor, mutably.
    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        let got = self.dtype();
        match &mut self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(KernelError::DType { op: "Tensor::as_f32_mut", expected: DType::F32, got }),
        }
    }

    /// Rows `[start, end)` along the first dimension, copied into a new tensor.
    pub fn narrow_rows(&self, start: usize, end: usize) -> Result<Tensor> {
        let rows = *self.shape.first().ok_or_else(|| KernelError::shape("narrow_rows", "rank-0 tensor"))?;
        if start > end || end > rows {
            return Err(KernelError::index("narrow_rows", format!("rows {start}..{end} of {rows}")));
        }
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        let storage = match &self.storage {
            Storage::F32(v) => Storage::F32(v[start * row..end * row].to_vec()),
            Storage::BF16(v) => Storage::BF16(v[start * row..end * row].to_vec()),
            Storage::F16(v) => Storage::F16(v[start * row..end * row].to_vec()),
        };
        Ok(Tensor { shape, storage })
    }
}

fn check_len(op: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len {
        return Err(KernelError::shape(op, format!("{len} elements do not fill shape {shape:?} ({n})")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_round_trip_and_errors() {
        let t = Tensor::from_f32(vec![1.0, -2.5, 3.25, 0.5, 8.0, -1.0], &[2, 3]).unwrap();
        let b = t.clone().to_dtype(DType::BF16);
        assert_eq!(b.dtype(), DType::BF16);
        assert_eq!(b.size_in_bytes(), 12);
        assert_eq!(b.to_vec_f32(), t.to_vec_f32());
        assert!(b.as_f32().is_err());
        assert_eq!(t.narrow_rows(1, 2).unwrap().as_f32().unwrap(), &[0.5, 8.0, -1.0]);
        assert!(t.narrow_rows(1, 3).is_err());
        assert!(Tensor::from_f32(vec![1.0; 5], &[2, 3]).is_err());
        assert!(t.clone().reshape(&[3, 2]).is_ok());
        assert!(t.reshape(&[4, 2]).is_err());
    }
}
