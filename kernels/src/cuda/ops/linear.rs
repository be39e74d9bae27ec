//! Projections, `x · wᵀ (+ bias)`: few-row inputs (decode) through the GEMV kernel, which streams the
//! weights at full bandwidth, everything else through one cuBLAS GEMM and a bias kernel.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{
    blas,
    launch::{alloc_bf16, alloc_f32},
};
use crate::{
    cuda::{Buffer, DeviceData, Gpu},
    dtype::DType,
    error::KernelError,
    error::Result,
};

/// Projections of at most this many rows use the GEMV kernel (`GEMV_MAX_M` in gemv.cu)...
const GEMV_MAX_M: usize = 4;
/// ...in blocks of `GEMV_WARPS` warps, one output column each.
const GEMV_COLS_PER_BLOCK: usize = 4;

/// `x[m, k] · w[n, k]ᵀ (+ bias)` (bf16 inputs, f32 accumulation), output in `out_dtype`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    x: &Buffer,
    w: &Buffer,
    bias: Option<&Buffer>,
    out_dtype: DType,
    m: usize,
    k: usize,
    n: usize,
) -> Result<Buffer> {
    const OP: &str = "linear";
    let g = &x.gpu;
    let xs = x.bf16(OP)?;
    let mut out = alloc_output(g, out_dtype, m * n)?;
    if m == 0 || n == 0 {
        return Ok(out);
    }
    if let DType::Quant(_) = w.dtype() {
        super::quant::qlinear(xs, w, bias, &mut out, m, k, n)?;
        return Ok(out);
    }
    let ws = w.bf16(OP)?;
    if m <= GEMV_MAX_M && k.is_multiple_of(8) && n <= i32::MAX as usize {
        gemv(g, xs, ws, bias, &mut out, m, k, n)?;
        return Ok(out);
    }
    gemm(g, xs, ws, &mut out, m, k, n)?;
    if let Some(b) = bias {
        add_bias(g, b.bf16(OP)?, &mut out, m, n)?;
    }
    Ok(out)
}

/// An uninitialised output of `len` elements in the projection's dtype (every path writes all of them).
pub(super) fn alloc_output(g: &Arc<Gpu>, dtype: DType, len: usize) -> Result<Buffer> {
    let data = match dtype {
        DType::BF16 => DeviceData::BF16(alloc_bf16(g, len)?),
        DType::F32 => DeviceData::F32(alloc_f32(g, len)?),
        DType::F16 | DType::Quant(_) => {
            return Err(KernelError::Device {
                op: "linear to f16 or a quantized type",
                device: crate::device::Device::Cuda(g.ordinal),
            });
        }
    };
    Ok(Buffer::new(g.clone(), data))
}

/// The cuBLAS path; cuBLAS takes `i32` dimensions, so larger ones are a shape error rather than a wrap.
fn gemm(
    g: &Gpu,
    xs: &CudaSlice<bf16>,
    ws: &CudaSlice<bf16>,
    out: &mut Buffer,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let to_i32 = |v: usize| {
        i32::try_from(v).map_err(|_| KernelError::shape("linear", format!("dimension {v} too large for cuBLAS")))
    };
    let dims = (to_i32(m)?, to_i32(k)?, to_i32(n)?);
    g.ctx.bind_to_thread().map_err(|e| g.err("bind", e))?;
    let data = Arc::get_mut(&mut out.data).expect("fresh buffer");
    blas::gemm_x_wt(g, xs, ws, data, dims)
}

/// Adds the bias row to each of the `m` output rows (the GEMV kernel adds its own).
pub(super) fn add_bias(g: &Gpu, bs: &CudaSlice<bf16>, out: &mut Buffer, m: usize, n: usize) -> Result<()> {
    let (rows, cols) = (m as u64, n as u64);
    let cfg = Gpu::elementwise_cfg(m * n);
    let data = Arc::get_mut(&mut out.data).expect("fresh buffer");
    // SAFETY: m·n outputs, n bias elements.
    match data {
        DeviceData::BF16(c) => {
            let f = g.kernel("bias_add_bf16")?;
            unsafe { g.stream.launch_builder(f).arg(c).arg(bs).arg(&rows).arg(&cols).launch(cfg) }
        }
        DeviceData::F32(c) => {
            let f = g.kernel("bias_add_f32")?;
            unsafe { g.stream.launch_builder(f).arg(c).arg(bs).arg(&rows).arg(&cols).launch(cfg) }
        }
        DeviceData::Quant(..) => unreachable!("outputs are bf16 or f32"),
    }
    .map_err(|e| g.err("bias_add", e))?;
    Ok(())
}

/// The few-row projection kernel (see gemv.cu): weights read once at full width, cuBLAS's GEMM reaches only
/// about half the copy bandwidth on one row.
#[allow(clippy::too_many_arguments)]
fn gemv(
    g: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    bias: Option<&Buffer>,
    out: &mut Buffer,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let f = g.kernel("gemv_bf16")?;
    let bias_ptr = match bias {
        Some(b) => b.bf16("linear")?.device_ptr(&g.stream).0,
        None => 0u64,
    };
    let data = Arc::get_mut(&mut out.data).expect("fresh buffer");
    let (y_ptr, y_f32) = match data {
        DeviceData::BF16(c) => (c.device_ptr_mut(&g.stream).0, 0i32),
        DeviceData::F32(c) => (c.device_ptr_mut(&g.stream).0, 1i32),
        DeviceData::Quant(..) => unreachable!("outputs are bf16 or f32"),
    };
    let (mi, ki, ni) = (m as i32, k as i32, n as i32);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(GEMV_COLS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * GEMV_COLS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x is m×k, w is n×k, y is m×n (f32 or bf16 as the flag says), bias n or null; k % 8 == 0 and
    // every buffer starts at an allocation, so the 16-byte loads are aligned.
    unsafe {
        g.stream
            .launch_builder(f)
            .arg(x)
            .arg(w)
            .arg(&bias_ptr)
            .arg(&y_ptr)
            .arg(&y_f32)
            .arg(&mi)
            .arg(&ki)
            .arg(&ni)
            .launch(cfg)
    }
    .map_err(|e| g.err("gemv", e))?;
    Ok(())
}
