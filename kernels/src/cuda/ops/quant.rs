//! Weight matrices in llama.cpp's block formats on the device (`quant.cu`): kept as their blocks, decoded
//! where they are read. Few-row projections (decode) go through `qgemv`, which decodes each weight in
//! registers; larger ones (prefill) decode a band of weight rows at a time to bf16 and hand it to cuBLAS,
//! so the scratch stays bounded whatever the matrix. The embedding lookup decodes just the rows it takes.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;
use tessera_gguf::GgmlType;

use super::blas;
use crate::{
    cuda::{Buffer, DeviceData, Gpu},
    device::Device,
    dtype::DType,
    error::{KernelError, Result},
};

/// `qgemv` takes at most this many rows a pass (`QGEMV_MAX_M` in quant.cu)...
const QGEMV_MAX_M: usize = 8;
/// ...and projections of up to this many rows (batched decode) go through it, a pass per eight rows: four
/// passes read about 2.3 bytes a weight for Q4_K, decoding the matrix to bf16 for cuBLAS about 4.6.
const QGEMV_PASSES_MAX_M: usize = 32;
/// ...in blocks of this many warps, one output column each (`QGEMV_WARPS`).
const QGEMV_WARPS: usize = 4;
/// Bytes of bf16 weights a prefill decodes at once before its GEMM.
const BAND_BYTES: usize = 64 << 20;

/// The kernels for `ty` (decoding rows, and the few-row projection), if the device runs it.
fn kernels(ty: GgmlType) -> Option<(&'static str, &'static str)> {
    use GgmlType::*;
    Some(match ty {
        Q8_0 => ("dequant_q8_0", "qgemv_q8_0"),
        Q4_0 => ("dequant_q4_0", "qgemv_q4_0"),
        Q4_1 => ("dequant_q4_1", "qgemv_q4_1"),
        Q5_0 => ("dequant_q5_0", "qgemv_q5_0"),
        Q5_1 => ("dequant_q5_1", "qgemv_q5_1"),
        Q2_K => ("dequant_q2_k", "qgemv_q2_k"),
        Q3_K => ("dequant_q3_k", "qgemv_q3_k"),
        Q4_K => ("dequant_q4_k", "qgemv_q4_k"),
        Q5_K => ("dequant_q5_k", "qgemv_q5_k"),
        Q6_K => ("dequant_q6_k", "qgemv_q6_k"),
        _ => return None,
    })
}

fn kernels_for(g: &Gpu, ty: GgmlType) -> Result<(&'static str, &'static str)> {
    kernels(ty).ok_or(KernelError::Device { op: "a weight in this block format", device: Device::Cuda(g.ordinal) })
}

/// `bytes` (whole blocks of `ty`) on the device.
pub(crate) fn upload_quant(gpu: &Arc<Gpu>, ty: GgmlType, bytes: &[u8]) -> Result<Buffer> {
    kernels_for(gpu, ty)?;
    let s = if bytes.is_empty() {
        // SAFETY: a placeholder byte that nothing reads.
        unsafe { gpu.stream.alloc::<u8>(1) }.map_err(|e| gpu.err("alloc", e))?
    } else {
        gpu.stream.clone_htod(bytes).map_err(|e| gpu.err("copy", e))?
    };
    Ok(Buffer::new(gpu.clone(), DeviceData::Quant(ty, s)))
}

/// The blocks, back on the host.
pub(crate) fn to_host_bytes(b: &Buffer) -> Result<(GgmlType, Vec<u8>)> {
    let g = &b.gpu;
    match &*b.data {
        DeviceData::Quant(ty, s) => Ok((*ty, g.stream.clone_dtoh(s).map_err(|e| g.err("copy to host", e))?)),
        _ => Err(KernelError::DType { op: "to_host_bytes", expected: DType::Quant(GgmlType::Q8_0), got: b.dtype() }),
    }
}

fn blocks<'a>(b: &'a Buffer, op: &'static str) -> Result<(GgmlType, &'a CudaSlice<u8>)> {
    match &*b.data {
        DeviceData::Quant(ty, s) => Ok((*ty, s)),
        _ => Err(KernelError::DType { op, expected: DType::Quant(GgmlType::Q8_0), got: b.dtype() }),
    }
}

/// Rows of `w` (rows of `row_len` values) decoded: `rows` of them in that order (or the first `n_rows` of
/// `w` from `first_row` on, without a list), to bf16 or f32 (`out`).
pub(crate) fn dequantize(
    w: &Buffer,
    rows: Option<&[u32]>,
    first_row: usize,
    n_rows: usize,
    row_len: usize,
    out: DType,
) -> Result<Buffer> {
    const OP: &str = "dequantize";
    let g = &w.gpu;
    let (ty, s) = blocks(w, OP)?;
    let (kernel, _) = kernels_for(g, ty)?;
    let n = n_rows * row_len;
    let row_blocks = (row_len / ty.block_size()) as u64;
    let mut buf = super::linear::alloc_output(g, out, n)?;
    if n == 0 {
        return Ok(buf);
    }
    let ids = rows.map(|r| g.upload_u32(r)).transpose()?;
    let ids_ptr = ids.as_ref().map_or(0, |i| i.device_ptr(&g.stream).0);
    let w_ptr = s.device_ptr(&g.stream).0 + (first_row as u64) * row_blocks * ty.type_size() as u64;
    let data = Arc::get_mut(&mut buf.data).expect("fresh buffer");
    let (out_ptr, out_f32) = match data {
        DeviceData::BF16(c) => (c.device_ptr_mut(&g.stream).0, 0i32),
        DeviceData::F32(c) => (c.device_ptr_mut(&g.stream).0, 1i32),
        DeviceData::Quant(..) => unreachable!("allocated above as bf16 or f32"),
    };
    let f = g.kernel(kernel)?;
    let n_rows64 = n_rows as u64;
    // SAFETY: the kernel reads `n_rows` rows of `row_blocks` blocks from `w_ptr` (or the listed rows, which
    // `ops` checked against the matrix) and writes `n` values; one thread per eight values.
    unsafe {
        g.stream
            .launch_builder(f)
            .arg(&w_ptr)
            .arg(&ids_ptr)
            .arg(&row_blocks)
            .arg(&out_ptr)
            .arg(&out_f32)
            .arg(&n_rows64)
            .launch(Gpu::elementwise_cfg(n / 8))
    }
    .map_err(|e| g.err(OP, e))?;
    drop(ids);
    Ok(buf)
}

/// `x[m, k] · w[n, k]ᵀ (+ bias)` for a weight in a block format (bf16 `x`), output in `out_dtype`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qlinear(
    x: &CudaSlice<bf16>,
    w: &Buffer,
    bias: Option<&Buffer>,
    out: &mut Buffer,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    const OP: &str = "linear";
    let g = w.gpu.clone();
    let (ty, s) = blocks(w, OP)?;
    let (_, gemv) = kernels_for(&g, ty)?;
    let bias_ptr = bias.map(|b| b.bf16(OP).map(|s| s.device_ptr(&g.stream).0)).transpose()?.unwrap_or(0);
    let data = Arc::get_mut(&mut out.data).expect("fresh buffer");
    let (y_ptr, y_f32) = match data {
        DeviceData::BF16(c) => (c.device_ptr_mut(&g.stream).0, false),
        DeviceData::F32(c) => (c.device_ptr_mut(&g.stream).0, true),
        DeviceData::Quant(..) => unreachable!("outputs are bf16 or f32"),
    };
    let dims =
        |v: usize| i32::try_from(v).map_err(|_| KernelError::shape(OP, format!("dimension {v} too large for CUDA")));
    let (_, ki, ni) = (dims(m)?, dims(k)?, dims(n)?);
    let y_size = if y_f32 { 4 } else { 2 };
    let x_ptr = x.device_ptr(&g.stream).0;
    if m <= QGEMV_PASSES_MAX_M {
        // Up to QGEMV_MAX_M rows a pass; each pass reads the blocks again (a few passes read fewer bytes than
        // decoding the matrix to bf16 and reading that back).
        let f = g.kernel(gemv)?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(QGEMV_WARPS) as u32, 1, 1),
            block_dim: (32 * QGEMV_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        for r0 in (0..m).step_by(QGEMV_MAX_M) {
            let rows = dims(QGEMV_MAX_M.min(m - r0))?;
            let (xr, yr) = (x_ptr + (r0 * k * 2) as u64, y_ptr + (r0 * n * y_size) as u64);
            let y_f32 = y_f32 as i32;
            // SAFETY: w holds n rows of k / block-size blocks; xr is `rows`×k of x, yr `rows`×n of y (f32 or
            // bf16 as the flag says); bias n or null.
            unsafe {
                g.stream
                    .launch_builder(f)
                    .arg(s)
                    .arg(&xr)
                    .arg(&bias_ptr)
                    .arg(&yr)
                    .arg(&y_f32)
                    .arg(&rows)
                    .arg(&ki)
                    .arg(&ni)
                    .launch(cfg)
            }
            .map_err(|e| g.err("qgemv", e))?;
        }
        return Ok(());
    }
    // Prefill: a band of weight rows at a time, decoded to bf16, then one GEMM into the band's columns of y.
    // Bands of a multiple of 64 rows keep the GEMM's shapes and the output columns aligned.
    let band = (BAND_BYTES / (2 * k.max(1)) / 64 * 64).clamp(64, n.max(64)).min(n.max(1));
    g.ctx.bind_to_thread().map_err(|e| g.err("bind", e))?;
    for c0 in (0..n).step_by(band) {
        let cols = band.min(n - c0);
        let wb = dequantize(w, None, c0, cols, k, DType::BF16)?;
        let w_ptr = wb.bf16(OP)?.device_ptr(&g.stream).0;
        // Column-major as cuBLAS sees it: yᵀ[cols, m] (leading dimension n) = W_band[cols, k] · xᵀ[k, m].
        blas::gemm_batched(
            &g,
            true,
            (cols, m, k),
            (w_ptr, k, 0),
            (x_ptr, k, 0),
            (y_ptr + (c0 * y_size) as u64, y_f32, n, 0),
            1,
        )?;
    }
    if let Some(b) = bias {
        super::linear::add_bias(&g, b.bf16(OP)?, out, m, n)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model keeps a matrix as its blocks where the CPU's kernels run its format (`cpu::quant::supported`),
    /// on either device: the device must run every such format.
    #[test]
    fn the_device_runs_every_block_format_the_cpu_runs() {
        for ty in GgmlType::ALL {
            assert_eq!(kernels(ty).is_some(), crate::cpu::quant::supported(ty), "{ty}");
        }
    }
}
