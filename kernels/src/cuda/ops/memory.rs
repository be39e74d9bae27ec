//! Buffers as a whole: allocation, host transfers, device-to-device copies, fills, the non-finite count the
//! tests use, and dtype casts. Nothing here computes on the model's values.

use std::sync::Arc;

use cudarc::driver::PushKernelArg;
use half::bf16;

use super::launch::{alloc_bf16, alloc_f32};
use crate::{
    cuda::{Buffer, DeviceData, Gpu},
    dtype::DType,
    error::KernelError,
    error::Result,
};

pub(crate) fn zeros(gpu: &Arc<Gpu>, n: usize, dtype: DType) -> Result<Buffer> {
    let data = match dtype {
        DType::F32 => DeviceData::F32(gpu.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| gpu.err("alloc", e))?),
        DType::BF16 => DeviceData::BF16(gpu.stream.alloc_zeros::<bf16>(n.max(1)).map_err(|e| gpu.err("alloc", e))?),
        DType::F16 | DType::Quant(_) => {
            return Err(KernelError::Device {
                op: "zeros (f16 or quantized)",
                device: crate::device::Device::Cuda(gpu.ordinal),
            });
        }
    };
    Ok(Buffer::new(gpu.clone(), data))
}

pub(crate) fn upload_f32(gpu: &Arc<Gpu>, v: &[f32]) -> Result<Buffer> {
    let s = if v.is_empty() { alloc_f32(gpu, 1)? } else { gpu.stream.clone_htod(v).map_err(|e| gpu.err("copy", e))? };
    Ok(Buffer::new(gpu.clone(), DeviceData::F32(s)))
}

pub(crate) fn upload_bf16(gpu: &Arc<Gpu>, v: &[bf16]) -> Result<Buffer> {
    let s =
        if v.is_empty() { alloc_bf16(gpu, 1)? } else { gpu.stream.clone_htod(v).map_err(|e| gpu.err("copy", e))? };
    Ok(Buffer::new(gpu.clone(), DeviceData::BF16(s)))
}

/// The elements as host f32 (waits for queued work).
pub(crate) fn to_host_f32(b: &Buffer) -> Result<Vec<f32>> {
    let g = &b.gpu;
    Ok(match &*b.data {
        DeviceData::F32(s) => g.stream.clone_dtoh(s).map_err(|e| g.err("copy to host", e))?,
        DeviceData::BF16(s) => {
            g.stream.clone_dtoh(s).map_err(|e| g.err("copy to host", e))?.into_iter().map(|x| x.to_f32()).collect()
        }
        DeviceData::Quant(ty, s) => {
            // Decoded on the device, as one row of all its blocks.
            let values = s.len() / ty.type_size() * ty.block_size();
            return to_host_f32(&super::quant::dequantize(b, None, 0, 1, values, DType::F32)?);
        }
    })
}

/// Number of elements a buffer was allocated for (empty tensors hold one placeholder element).
fn len(b: &Buffer) -> usize {
    match &*b.data {
        DeviceData::F32(s) => s.len(),
        DeviceData::BF16(s) => s.len(),
        DeviceData::Quant(_, s) => s.len(),
    }
}

/// Elements `[start, end)` copied into a new buffer.
pub(crate) fn copy_range(b: &Buffer, start: usize, end: usize) -> Result<Buffer> {
    let g = &b.gpu;
    let n = end - start;
    let data = match &*b.data {
        DeviceData::F32(s) => {
            let mut out = alloc_f32(g, n)?;
            if n > 0 {
                g.stream.memcpy_dtod(&s.slice(start..end), &mut out.slice_mut(0..n)).map_err(|e| g.err("copy", e))?;
            }
            DeviceData::F32(out)
        }
        DeviceData::BF16(s) => {
            let mut out = alloc_bf16(g, n)?;
            if n > 0 {
                g.stream.memcpy_dtod(&s.slice(start..end), &mut out.slice_mut(0..n)).map_err(|e| g.err("copy", e))?;
            }
            DeviceData::BF16(out)
        }
        DeviceData::Quant(..) => return Err(quant_unsupported(g, "copy_range")),
    };
    Ok(Buffer::new(g.clone(), data))
}

/// An op that takes no tensor in a block format was given one.
fn quant_unsupported(g: &Gpu, op: &'static str) -> KernelError {
    KernelError::Device { op, device: crate::device::Device::Cuda(g.ordinal) }
}

/// The first `n` elements of each buffer, one after another (same dtype, same GPU). Weights in a block
/// format go as their blocks (whole rows of them: fused projections).
pub(crate) fn concat(parts: &[(&Buffer, usize)]) -> Result<Buffer> {
    let g = &parts[0].0.gpu;
    let dtype = parts[0].0.dtype();
    // Elements, or bytes of blocks, per part.
    let len = |n: usize| if let DType::Quant(_) = dtype { dtype.bytes_for(n) } else { n };
    let total: usize = parts.iter().map(|&(_, n)| len(n)).sum();
    let mut data = match *parts[0].0.data {
        DeviceData::BF16(_) => DeviceData::BF16(alloc_bf16(g, total)?),
        DeviceData::F32(_) => DeviceData::F32(alloc_f32(g, total)?),
        // SAFETY: every byte is copied in below before anything reads it.
        DeviceData::Quant(ty, _) => {
            DeviceData::Quant(ty, unsafe { g.stream.alloc::<u8>(total.max(1)) }.map_err(|e| g.err("alloc", e))?)
        }
    };
    let mut at = 0;
    for &(p, n) in parts {
        if p.dtype() != dtype {
            return Err(KernelError::DType { op: "concat_rows", expected: dtype, got: p.dtype() });
        }
        let n = len(n);
        if n == 0 {
            continue;
        }
        match (&*p.data, &mut data) {
            (DeviceData::BF16(s), DeviceData::BF16(d)) => {
                g.stream.memcpy_dtod(&s.slice(0..n), &mut d.slice_mut(at..at + n))
            }
            (DeviceData::F32(s), DeviceData::F32(d)) => {
                g.stream.memcpy_dtod(&s.slice(0..n), &mut d.slice_mut(at..at + n))
            }
            (DeviceData::Quant(_, s), DeviceData::Quant(_, d)) => {
                g.stream.memcpy_dtod(&s.slice(0..n), &mut d.slice_mut(at..at + n))
            }
            _ => return Err(KernelError::DType { op: "concat_rows", expected: parts[0].0.dtype(), got: p.dtype() }),
        }
        .map_err(|e| g.err("copy", e))?;
        at += n;
    }
    Ok(Buffer::new(g.clone(), data))
}

pub(crate) fn uniform(gpu: &Arc<Gpu>, n: usize, seed: u64, scale: f32) -> Result<Buffer> {
    let mut out = alloc_bf16(gpu, n)?;
    if n > 0 {
        let f = gpu.kernel("fill_uniform_bf16")?;
        let n64 = n as u64;
        // SAFETY: the kernel writes indices below n of a buffer of n elements.
        unsafe {
            gpu.stream.launch_builder(f).arg(&mut out).arg(&n64).arg(&seed).arg(&scale).launch(Gpu::elementwise_cfg(n))
        }
        .map_err(|e| gpu.err("fill_uniform_bf16", e))?;
    }
    Ok(Buffer::new(gpu.clone(), DeviceData::BF16(out)))
}

/// Overwrites every element with the bit pattern `bits` (2 bytes for bf16, 4 for f32): tests poison output
/// buffers with NaN this way.
pub(crate) fn fill_bits(b: &mut Buffer, bits: u32) -> Result<()> {
    let g = b.gpu.clone();
    let n = len(b);
    let data = Arc::get_mut(&mut b.data).ok_or_else(|| g.err("fill", "buffer is shared"))?;
    let n64 = n as u64;
    // SAFETY: the kernels write indices below n of buffers of n elements (u16 and f32-sized elements).
    match data {
        DeviceData::BF16(s) => {
            let v = bits as u16;
            let f = g.kernel("fill_u16")?;
            unsafe { g.stream.launch_builder(f).arg(&mut *s).arg(&v).arg(&n64).launch(Gpu::elementwise_cfg(n)) }
        }
        DeviceData::F32(s) => {
            let f = g.kernel("fill_u32")?;
            unsafe { g.stream.launch_builder(f).arg(&mut *s).arg(&bits).arg(&n64).launch(Gpu::elementwise_cfg(n)) }
        }
        DeviceData::Quant(..) => return Err(quant_unsupported(&g, "fill")),
    }
    .map_err(|e| g.err("fill", e))?;
    Ok(())
}

/// Number of NaN or infinite elements among the first `n`.
pub(crate) fn count_nonfinite(b: &Buffer, n: usize) -> Result<u32> {
    let g = &b.gpu;
    let mut count = g.stream.alloc_zeros::<u32>(1).map_err(|e| g.err("alloc", e))?;
    if n > 0 {
        let n64 = n as u64;
        // SAFETY: reads n elements of a buffer at least that long; one atomic counter.
        match &*b.data {
            DeviceData::BF16(s) => {
                let f = g.kernel("count_nonfinite_bf16")?;
                unsafe { g.stream.launch_builder(f).arg(s).arg(&n64).arg(&mut count).launch(Gpu::elementwise_cfg(n)) }
            }
            DeviceData::F32(s) => {
                let f = g.kernel("count_nonfinite_f32")?;
                unsafe { g.stream.launch_builder(f).arg(s).arg(&n64).arg(&mut count).launch(Gpu::elementwise_cfg(n)) }
            }
            DeviceData::Quant(..) => return Err(quant_unsupported(g, "count_nonfinite")),
        }
        .map_err(|e| g.err("count_nonfinite", e))?;
    }
    Ok(g.stream.clone_dtoh(&count).map_err(|e| g.err("copy to host", e))?[0])
}

pub(crate) fn cast(b: &Buffer, n: usize, to: DType) -> Result<Buffer> {
    let g = &b.gpu;
    let n64 = n as u64;
    let data = match (&*b.data, to) {
        (DeviceData::BF16(s), DType::F32) => {
            let mut out = alloc_f32(g, n)?;
            if n > 0 {
                let f = g.kernel("cast_bf16_f32")?;
                // SAFETY: n elements in, n out.
                unsafe { g.stream.launch_builder(f).arg(s).arg(&mut out).arg(&n64).launch(Gpu::elementwise_cfg(n)) }
                    .map_err(|e| g.err("cast_bf16_f32", e))?;
            }
            DeviceData::F32(out)
        }
        (DeviceData::F32(s), DType::BF16) => {
            let mut out = alloc_bf16(g, n)?;
            if n > 0 {
                let f = g.kernel("cast_f32_bf16")?;
                // SAFETY: n elements in, n out.
                unsafe { g.stream.launch_builder(f).arg(s).arg(&mut out).arg(&n64).launch(Gpu::elementwise_cfg(n)) }
                    .map_err(|e| g.err("cast_f32_bf16", e))?;
            }
            DeviceData::BF16(out)
        }
        (_, to) => {
            return Err(KernelError::Device {
                op: if to == DType::F16 { "cast to f16" } else { "cast" },
                device: crate::device::Device::Cuda(g.ordinal),
            });
        }
    };
    Ok(Buffer::new(g.clone(), data))
}
