//! The tensor type: a contiguous row-major buffer, its shape, dtype and device.
//!
//! Layout is always contiguous: every op in the forward pass reads and writes whole rows, and keeping views
//! out of the type keeps each kernel (CPU or CUDA) to one indexing scheme. Reshape is free; anything that
//! would need a strided view is an explicit copy.

use std::{borrow::Cow, sync::Arc};

use half::{bf16, f16};

use crate::{
    cpu::quant::QuantMatrix,
    device::Device,
    dtype::{DType, GgmlType},
    error::KernelError,
    error::Result,
};

/// Backing memory of a tensor; ops dispatch on it.
#[derive(Clone, Debug)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    /// A weight matrix's blocks in a llama.cpp format, as the CPU kernels keep them; shared on clone (a
    /// tied embedding and `lm_head` are one table).
    Quant(Arc<QuantMatrix>),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::Buffer),
}

/// The value [`Tensor::uniform`] puts at flat index `i`: splitmix64 of the seed and index, mapped to
/// `[-scale, scale)` and rounded to bf16, exactly as the CUDA fill kernel computes it, so a random model
/// is the same on every device.
fn uniform_at(seed: u64, i: u64, scale: f32) -> f32 {
    let mut z = seed.wrapping_add(0x9e3779b97f4a7c15u64.wrapping_mul(i + 1));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^= z >> 31;
    let u = (z >> 40) as f32 * (1.0 / 16_777_216.0);
    bf16::from_f32((2.0 * u - 1.0) * scale).to_f32()
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

/// `n` copies of `zero`, or an error when the memory cannot be had: sizes come from files and requests
/// (a KV cache budget, a model's shape), and an allocation that fails must not abort the process.
fn zeroed<T: Clone>(n: usize, zero: T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| KernelError::OutOfMemory {
        bytes: n.saturating_mul(std::mem::size_of::<T>()),
        device: Device::Cpu,
    })?;
    v.resize(n, zero);
    Ok(v)
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

    /// A CPU weight matrix `[rows, cols]` kept in the block format `ty`: `bytes` holds each row's
    /// `cols / block_size` blocks, row after row. Only the formats [`crate::cpu::quant`] computes with are
    /// accepted.
    pub fn from_quant(ty: GgmlType, bytes: Vec<u8>, shape: &[usize]) -> Result<Self> {
        let (rows, cols) = check_quant("Tensor::from_quant", ty, bytes.len(), shape)?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Quant(Arc::new(QuantMatrix::new(ty, bytes, rows, cols))) })
    }

    /// [`Tensor::from_quant`] on `device`. A GPU takes the blocks as they are: the CPU's interleaved
    /// layout is not made only to be undone.
    pub fn from_quant_on(ty: GgmlType, bytes: Vec<u8>, shape: &[usize], device: Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(i) = device {
            check_quant("Tensor::from_quant_on", ty, bytes.len(), shape)?;
            let buf = crate::cuda::ops::upload_quant(&crate::cuda::gpu(i)?, ty, &bytes)?;
            return Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cuda(buf) });
        }
        Tensor::from_quant(ty, bytes, shape)?.to_device(device)
    }

    /// The block format and bytes, in the file's layout, of a quantized CPU tensor (`None` for any other).
    pub fn quant_bytes(&self) -> Option<(GgmlType, Cow<'_, [u8]>)> {
        self.quant_matrix().map(|q| (q.ty(), q.blocks(0, q.rows())))
    }

    /// The matrix of a quantized CPU tensor (`None` for any other).
    pub fn quant_matrix(&self) -> Option<&QuantMatrix> {
        match &self.storage {
            Storage::Quant(q) => Some(q),
            _ => None,
        }
    }

    /// A zero-filled tensor.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        crate::ensure_available(device)?;
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| KernelError::shape("zeros", format!("{shape:?} has more elements than fit in memory")))?;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(i) = device {
            let buf = crate::cuda::ops::zeros(&crate::cuda::gpu(i)?, n, dtype)?;
            return Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cuda(buf) });
        }
        let storage = match dtype {
            DType::F32 => Storage::F32(zeroed(n, 0.0)?),
            DType::BF16 => Storage::BF16(zeroed(n, bf16::ZERO)?),
            DType::F16 => Storage::F16(zeroed(n, f16::ZERO)?),
            DType::Quant(_) => return Err(KernelError::DType { op: "zeros", expected: DType::F32, got: dtype }),
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

    /// A tensor of values uniform in `[-scale, scale)` from `seed` (see [`uniform_at`]): identical on every
    /// device, so a random model built on the GPU equals the one built on the CPU.
    pub fn uniform(shape: &[usize], dtype: DType, device: Device, seed: u64, scale: f32) -> Result<Self> {
        crate::ensure_available(device)?;
        let n: usize = shape.iter().product();
        #[cfg(feature = "cuda")]
        if let Device::Cuda(i) = device {
            let t = Tensor {
                shape: shape.to_vec(),
                storage: Storage::Cuda(crate::cuda::ops::uniform(&crate::cuda::gpu(i)?, n, seed, scale)?),
            };
            return t.to_dtype(dtype);
        }
        let v: Vec<f32> = (0..n as u64).map(|i| uniform_at(seed, i, scale)).collect();
        Tensor::from_f32(v, shape)?.to_dtype(dtype)
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn from_cuda(buf: crate::cuda::Buffer, shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), storage: Storage::Cuda(buf) }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_buffer(&self) -> Option<&crate::cuda::Buffer> {
        match &self.storage {
            Storage::Cuda(b) => Some(b),
            _ => None,
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_buffer_mut(&mut self) -> Option<&mut crate::cuda::Buffer> {
        match &mut self.storage {
            Storage::Cuda(b) => Some(b),
            _ => None,
        }
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
            Storage::Quant(q) => DType::Quant(q.ty()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Device::Cuda(b.gpu.ordinal),
            _ => Device::Cpu,
        }
    }

    /// Bytes of element data.
    pub fn size_in_bytes(&self) -> usize {
        self.dtype().bytes_for(self.numel())
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        check_len("Tensor::reshape", self.numel(), shape)?;
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Converts to another dtype (a copy; a no-op move when the dtype already matches), on the same device.
    pub fn to_dtype(self, dtype: DType) -> Result<Tensor> {
        if self.dtype() == dtype {
            return Ok(self);
        }
        #[cfg(feature = "cuda")]
        if let Storage::Cuda(b) = &self.storage {
            let out = crate::cuda::ops::cast(b, self.numel(), dtype)?;
            return Ok(Tensor { shape: self.shape, storage: Storage::Cuda(out) });
        }
        let f = self.to_vec_f32()?;
        let storage = match dtype {
            DType::F32 => Storage::F32(f),
            DType::BF16 => Storage::BF16(f.into_iter().map(bf16::from_f32).collect()),
            DType::F16 => Storage::F16(f.into_iter().map(f16::from_f32).collect()),
            DType::Quant(ty) => {
                // Rows are contiguous and whole blocks (checked by `from_quant`), so the flat data quantizes
                // block by block exactly as each row would.
                let mut bytes = Vec::new();
                if self.rank() == 2 && self.dim(1).is_multiple_of(ty.block_size()) {
                    tessera_gguf::quantize(ty, &f, &mut bytes)
                        .map_err(|e| KernelError::Unsupported { op: "Tensor::to_dtype", detail: e.to_string() })?;
                }
                return Tensor::from_quant(ty, bytes, &self.shape);
            }
        };
        Ok(Tensor { shape: self.shape, storage })
    }

    /// Copies the elements out to the host as f32, whatever the dtype and device.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        Ok(match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::Quant(q) => {
                let mut out = zeroed(self.numel(), 0f32)?;
                q.dequantize_rows(0, q.rows(), &mut out)
                    .map_err(|e| KernelError::Unsupported { op: "Tensor::to_vec_f32", detail: e.to_string() })?;
                out
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => crate::cuda::ops::to_host_f32(b)?,
        })
    }

    /// The elements as host f32: borrowed for a CPU f32 tensor, copied otherwise.
    pub fn host_f32(&self) -> Result<Cow<'_, [f32]>> {
        match &self.storage {
            Storage::F32(v) => Ok(Cow::Borrowed(v)),
            _ => Ok(Cow::Owned(self.to_vec_f32()?)),
        }
    }

    /// A copy on `device` with the same dtype and shape (a shared clone when it is there already).
    /// The CUDA device holds f32 and bf16 tensors.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        crate::ensure_available(device)?;
        match device {
            Device::Cpu => {
                #[cfg(feature = "cuda")]
                if let Storage::Cuda(b) = &self.storage
                    && let DType::Quant(_) = b.dtype()
                {
                    let (ty, mut bytes) = crate::cuda::ops::to_host_bytes(b)?;
                    // An empty matrix's buffer holds a placeholder byte.
                    bytes.truncate(self.dtype().bytes_for(self.numel()));
                    return Tensor::from_quant(ty, bytes, &self.shape);
                }
                let v = self.to_vec_f32()?;
                Tensor::from_f32(v, &self.shape)?.to_dtype(self.dtype())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let gpu = crate::cuda::gpu(i)?;
                let host = match &self.storage {
                    Storage::Cuda(_) => self.to_device(Device::Cpu)?,
                    _ => self.clone(),
                };
                let buf = match &host.storage {
                    Storage::F32(v) => crate::cuda::ops::upload_f32(&gpu, v)?,
                    Storage::BF16(v) => crate::cuda::ops::upload_bf16(&gpu, v)?,
                    Storage::Quant(q) => crate::cuda::ops::upload_quant(&gpu, q.ty(), &q.blocks(0, q.rows()))?,
                    _ => return Err(KernelError::Device { op: "Tensor::to_device (f16 or quantized)", device }),
                };
                Ok(Tensor { shape: self.shape.clone(), storage: Storage::Cuda(buf) })
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(KernelError::Device { op: "Tensor::to_device", device }),
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

    /// The tensors stacked along the first dimension (same dtype, device and trailing dimensions).
    pub fn concat_rows(parts: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "concat_rows";
        let first = parts.first().ok_or_else(|| KernelError::shape(OP, "nothing to concatenate"))?;
        let tail = first.shape.get(1..).unwrap_or(&[]).to_vec();
        if first.rank() == 0 {
            return Err(KernelError::shape(OP, "rank-0 tensor"));
        }
        for p in parts {
            if p.shape[1..] != tail[..] || p.dtype() != first.dtype() || p.device() != first.device() {
                return Err(KernelError::shape(
                    OP,
                    format!(
                        "{:?} {} on {} with {:?} {} on {}",
                        p.shape,
                        p.dtype(),
                        p.device(),
                        first.shape,
                        first.dtype(),
                        first.device()
                    ),
                ));
            }
        }
        let mut shape = first.shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        #[cfg(feature = "cuda")]
        if first.device() != Device::Cpu {
            let bufs: Vec<(&crate::cuda::Buffer, usize)> =
                parts.iter().map(|p| (p.cuda_buffer().expect("on cuda"), p.numel())).collect();
            return Ok(Tensor { shape, storage: Storage::Cuda(crate::cuda::ops::concat(&bufs)?) });
        }
        let storage = match first.dtype() {
            DType::Quant(ty) => {
                let mut bytes = Vec::new();
                for p in parts {
                    bytes.extend_from_slice(&p.quant_bytes().map(|(_, b)| b).unwrap_or_default());
                }
                return Tensor::from_quant(ty, bytes, &shape);
            }
            DType::F32 => Storage::F32(
                parts.iter().map(|p| p.as_f32().map(<[f32]>::to_vec)).collect::<Result<Vec<_>>>()?.concat(),
            ),
            _ => {
                let v: Vec<f32> = parts.iter().map(|p| p.to_vec_f32()).collect::<Result<Vec<_>>>()?.concat();
                return Tensor::from_f32(v, &shape)?.to_dtype(first.dtype());
            }
        };
        Ok(Tensor { shape, storage })
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
            Storage::Quant(q) => {
                let bytes = q.blocks(start, end).into_owned();
                Storage::Quant(Arc::new(QuantMatrix::new(q.ty(), bytes, end - start, q.cols())))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Storage::Cuda(crate::cuda::ops::copy_range(b, start * row, end * row)?),
        };
        Ok(Tensor { shape, storage })
    }
}

/// The rows and columns of a quantized matrix of `ty` blocks, `len` bytes, shaped `shape`, or the error
/// saying what does not fit.
fn check_quant(op: &'static str, ty: GgmlType, len: usize, shape: &[usize]) -> Result<(usize, usize)> {
    if !crate::cpu::quant::supported(ty) {
        return Err(KernelError::Unsupported { op, detail: format!("no kernels for {ty} weights") });
    }
    let &[rows, cols] = shape else {
        return Err(KernelError::shape(op, format!("a quantized tensor is a matrix, not {shape:?}")));
    };
    if !cols.is_multiple_of(ty.block_size()) {
        return Err(KernelError::shape(op, format!("rows of {cols} values are not whole {ty} blocks")));
    }
    if rows.checked_mul(DType::Quant(ty).bytes_for(cols)) != Some(len) {
        return Err(KernelError::shape(op, format!("{len} bytes for {shape:?} in {ty}")));
    }
    Ok((rows, cols))
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
        let b = t.clone().to_dtype(DType::BF16).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        assert_eq!(b.size_in_bytes(), 12);
        assert_eq!(b.to_vec_f32().unwrap(), t.to_vec_f32().unwrap());
        assert!(b.as_f32().is_err());
        assert_eq!(t.narrow_rows(1, 2).unwrap().as_f32().unwrap(), &[0.5, 8.0, -1.0]);
        assert!(t.narrow_rows(1, 3).is_err());
        assert!(Tensor::from_f32(vec![1.0; 5], &[2, 3]).is_err());
        assert!(t.clone().reshape(&[3, 2]).is_ok());
        assert!(t.reshape(&[4, 2]).is_err());
    }

    #[test]
    fn uniform_is_seeded_bounded_and_bf16_exact() {
        let a = Tensor::uniform(&[1000], DType::F32, Device::Cpu, 7, 0.5).unwrap().to_vec_f32().unwrap();
        let b = Tensor::uniform(&[1000], DType::F32, Device::Cpu, 7, 0.5).unwrap().to_vec_f32().unwrap();
        let c = Tensor::uniform(&[1000], DType::F32, Device::Cpu, 8, 0.5).unwrap().to_vec_f32().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| (-0.5..=0.5).contains(v) && bf16::from_f32(*v).to_f32() == *v));
        let mean = a.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!(a.iter().any(|v| *v > 0.4) && a.iter().any(|v| *v < -0.4));
    }
}
