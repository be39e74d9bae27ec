//! The CUDA implementations behind [`crate::ops`]: buffer management, the kernel launches and cuBLAS
//! GEMMs. Shapes, dtypes and indices were checked by `ops` before anything here runs; what is checked
//! here is what only the device can tell (allocation, launch and copy errors).
//!
//! Activations and weights are bf16 with f32 accumulation; logits may be produced in f32.

use std::sync::Arc;

use cudarc::{
    cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t},
    driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg},
};
use half::bf16;

use super::{Buffer, DeviceData, Gpu};
use crate::{
    DType, KernelError, Result,
    cpu::attention::{AttentionSeq, AttentionShape},
};

/// Rows of queries one prefill attention block handles (`PF_WARPS` in attention.cu).
const PREFILL_ROWS: usize = 8;
/// Keys per shared-memory tile of the prefill kernel (`PF_KEYS`).
const PREFILL_KEYS: usize = 32;
/// Keys scored per pass of the decode kernel (`DEC_CHUNK`).
const DECODE_CHUNK: usize = 2048;
/// Eight warps: their partial sums (8 × head_dim ≤ 2048 floats) fit in the score buffer.
const DECODE_THREADS: u32 = 256;
/// Projections of at most this many rows use the GEMV kernel (`GEMV_MAX_M` in gemv.cu)...
const GEMV_MAX_M: usize = 4;
/// ...in blocks of `GEMV_WARPS` warps, one output column each.
const GEMV_COLS_PER_BLOCK: usize = 4;
/// Prefill chunks at least this long go through the dense path (two cuBLAS GEMMs around a softmax)...
const DENSE_MIN_ROWS: usize = 32;
/// ...unless their score matrix (heads × rows × keys) is larger than this many elements (6 bytes each).
const DENSE_MAX_SCORES: usize = 1 << 27;

fn alloc_bf16(gpu: &Gpu, n: usize) -> Result<CudaSlice<bf16>> {
    // SAFETY: every caller launches a kernel that writes all `n` elements before anything reads them.
    unsafe { gpu.stream.alloc::<bf16>(n.max(1)) }.map_err(|e| gpu.err("alloc", e))
}

fn alloc_f32(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: as `alloc_bf16`.
    unsafe { gpu.stream.alloc::<f32>(n.max(1)) }.map_err(|e| gpu.err("alloc", e))
}

pub(crate) fn zeros(gpu: &Arc<Gpu>, n: usize, dtype: DType) -> Result<Buffer> {
    let data = match dtype {
        DType::F32 => DeviceData::F32(gpu.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| gpu.err("alloc", e))?),
        DType::BF16 => DeviceData::BF16(gpu.stream.alloc_zeros::<bf16>(n.max(1)).map_err(|e| gpu.err("alloc", e))?),
        DType::F16 => {
            return Err(KernelError::Device { op: "zeros (f16)", device: crate::Device::Cuda(gpu.ordinal) });
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
    })
}

/// Number of elements a buffer was allocated for (empty tensors hold one placeholder element).
fn len(b: &Buffer) -> usize {
    match &*b.data {
        DeviceData::F32(s) => s.len(),
        DeviceData::BF16(s) => s.len(),
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
    };
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
                device: crate::Device::Cuda(g.ordinal),
            });
        }
    };
    Ok(Buffer::new(g.clone(), data))
}

/// `x[m, k] · w[n, k]ᵀ (+ bias)` through cuBLAS (bf16 inputs, f32 accumulation), output in `out_dtype`.
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
    let (xs, ws) = (x.bf16(OP)?, w.bf16(OP)?);
    let out = match out_dtype {
        DType::BF16 => DeviceData::BF16(alloc_bf16(g, m * n)?),
        DType::F32 => DeviceData::F32(alloc_f32(g, m * n)?),
        DType::F16 => return Err(KernelError::Device { op: "linear to f16", device: crate::Device::Cuda(g.ordinal) }),
    };
    let mut out = Buffer::new(g.clone(), out);
    if m == 0 || n == 0 {
        return Ok(out);
    }
    if m <= GEMV_MAX_M && k.is_multiple_of(8) && n <= i32::MAX as usize {
        gemv(g, xs, ws, bias, &mut out, m, k, n)?;
        return Ok(out);
    }
    let (alpha, beta) = (1.0f32, 0.0f32);
    let to_i32 =
        |v: usize| i32::try_from(v).map_err(|_| KernelError::shape(OP, format!("dimension {v} too large for cuBLAS")));
    let (mi, ki, ni) = (to_i32(m)?, to_i32(k)?, to_i32(n)?);
    g.ctx.bind_to_thread().map_err(|e| g.err("bind", e))?;
    {
        let data = Arc::get_mut(&mut out.data).expect("fresh buffer");
        let (a_ptr, _a) = ws.device_ptr(&g.stream);
        let (b_ptr, _b) = xs.device_ptr(&g.stream);
        let (c_ptr, c_type, _c) = match data {
            DeviceData::BF16(c) => {
                let (p, s) = c.device_ptr_mut(&g.stream);
                (p, cudaDataType_t::CUDA_R_16BF, s)
            }
            DeviceData::F32(c) => {
                let (p, s) = c.device_ptr_mut(&g.stream);
                (p, cudaDataType_t::CUDA_R_32F, s)
            }
        };
        // Row-major y[m, n] is column-major yᵀ[n, m] = W[n, k] (column-major Wᵀ, transposed) · xᵀ[k, m].
        // SAFETY: pointers cover w (n·k), x (m·k) and y (m·n) elements, as the leading dimensions say.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *g.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha) as *const f32 as *const _,
                a_ptr as *const _,
                cudaDataType_t::CUDA_R_16BF,
                ki,
                b_ptr as *const _,
                cudaDataType_t::CUDA_R_16BF,
                ki,
                (&beta) as *const f32 as *const _,
                c_ptr as *mut _,
                c_type,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| g.err("cublasGemmEx", e))?;
    }
    if let Some(b) = bias {
        let bs = b.bf16(OP)?;
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
        }
        .map_err(|e| g.err("bias_add", e))?;
    }
    Ok(out)
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

fn row_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn rms_norm(x: &Buffer, w: &Buffer, eps: f32, rows: usize, h: usize) -> Result<Buffer> {
    const OP: &str = "rms_norm";
    let g = &x.gpu;
    let mut out = alloc_bf16(g, rows * h)?;
    if rows > 0 {
        let f = g.kernel("rms_norm_bf16")?;
        let hi = h as i32;
        // SAFETY: one block per row of h elements.
        unsafe {
            g.stream
                .launch_builder(f)
                .arg(x.bf16(OP)?)
                .arg(w.bf16(OP)?)
                .arg(&mut out)
                .arg(&hi)
                .arg(&eps)
                .launch(row_cfg(rows, 256))
        }
        .map_err(|e| g.err(OP, e))?;
    }
    Ok(Buffer::new(g.clone(), DeviceData::BF16(out)))
}

pub(crate) fn add_rms_norm(
    resid: &mut Buffer,
    delta: &Buffer,
    w: &Buffer,
    eps: f32,
    rows: usize,
    h: usize,
) -> Result<Buffer> {
    const OP: &str = "add_rms_norm";
    let g = resid.gpu.clone();
    let mut out = alloc_bf16(&g, rows * h)?;
    if rows > 0 {
        let f = g.kernel("add_rms_norm_bf16")?;
        let hi = h as i32;
        let (d, wt) = (delta.bf16(OP)?, w.bf16(OP)?);
        let r = resid.bf16_mut(OP)?;
        // SAFETY: one block per row of h elements.
        unsafe {
            g.stream.launch_builder(f).arg(r).arg(d).arg(wt).arg(&mut out).arg(&hi).arg(&eps).launch(row_cfg(rows, 256))
        }
        .map_err(|e| g.err(OP, e))?;
    }
    Ok(Buffer::new(g.clone(), DeviceData::BF16(out)))
}

/// Rotary embedding in place; `inv_freq` holds `head_dim / 2` values shared by every token, or that many
/// per token.
pub(crate) fn rope(x: &mut Buffer, positions: &[u32], inv_freq: &[f32], heads: usize, hd: usize) -> Result<()> {
    const OP: &str = "rope";
    let g = x.gpu.clone();
    let t = positions.len();
    if t == 0 {
        return Ok(());
    }
    let pos = g.upload_cached("rope.positions", positions)?;
    let freq = g.upload_cached_f32("rope.freq", inv_freq)?;
    let stride = if inv_freq.len() == hd / 2 { 0i32 } else { (hd / 2) as i32 };
    let (hi, hdi) = (heads as i32, hd as i32);
    let f = g.kernel("rope_bf16")?;
    let xs = x.bf16_mut(OP)?;
    // SAFETY: one block per token of heads·hd elements; positions and frequencies sized by `ops::rope`.
    unsafe {
        g.stream
            .launch_builder(f)
            .arg(xs)
            .arg(&*pos)
            .arg(&*freq)
            .arg(&stride)
            .arg(&hi)
            .arg(&hdi)
            .launch(row_cfg(t, 128))
    }
    .map_err(|e| g.err(OP, e))?;
    Ok(())
}

pub(crate) fn silu_mul(gate: &Buffer, up: &Buffer, n: usize) -> Result<Buffer> {
    const OP: &str = "silu_mul";
    let g = &gate.gpu;
    let mut out = alloc_bf16(g, n)?;
    if n > 0 {
        let f = g.kernel("silu_mul_bf16")?;
        let n64 = n as u64;
        // SAFETY: n elements each.
        unsafe {
            g.stream
                .launch_builder(f)
                .arg(gate.bf16(OP)?)
                .arg(up.bf16(OP)?)
                .arg(&mut out)
                .arg(&n64)
                .launch(Gpu::elementwise_cfg(n))
        }
        .map_err(|e| g.err(OP, e))?;
    }
    Ok(Buffer::new(g.clone(), DeviceData::BF16(out)))
}

/// Columns `[col0, col0 + width)` of a row-major `[rows, cols]` bf16 matrix.
pub(crate) fn copy_cols(x: &Buffer, rows: usize, cols: usize, col0: usize, width: usize) -> Result<Buffer> {
    let g = &x.gpu;
    let n = rows * width;
    let mut out = alloc_bf16(g, n)?;
    if n > 0 {
        let f = g.kernel("copy_cols_bf16")?;
        let (r, c, c0, w) = (rows as u64, cols as u64, col0 as u64, width as u64);
        // SAFETY: reads inside [rows, cols] (col0 + width <= cols, checked by `ops::split_cols`).
        unsafe {
            g.stream
                .launch_builder(f)
                .arg(x.bf16("split_cols")?)
                .arg(&mut out)
                .arg(&r)
                .arg(&c)
                .arg(&c0)
                .arg(&w)
                .launch(Gpu::elementwise_cfg(n))
        }
        .map_err(|e| g.err("split_cols", e))?;
    }
    Ok(Buffer::new(g.clone(), DeviceData::BF16(out)))
}

pub(crate) fn silu_mul_packed(gu: &Buffer, rows: usize, inter: usize) -> Result<Buffer> {
    let g = &gu.gpu;
    let n = rows * inter;
    let mut out = alloc_bf16(g, n)?;
    if n > 0 {
        let f = g.kernel("silu_mul_packed_bf16")?;
        let (r, i) = (rows as u64, inter as u64);
        // SAFETY: reads rows × 2·inter, writes rows × inter.
        unsafe {
            g.stream
                .launch_builder(f)
                .arg(gu.bf16("silu_mul_packed")?)
                .arg(&mut out)
                .arg(&r)
                .arg(&i)
                .launch(Gpu::elementwise_cfg(n))
        }
        .map_err(|e| g.err("silu_mul_packed", e))?;
    }
    Ok(Buffer::new(g.clone(), DeviceData::BF16(out)))
}

/// The first `n` elements of each buffer, one after another (same dtype, same GPU).
pub(crate) fn concat(parts: &[(&Buffer, usize)]) -> Result<Buffer> {
    let g = &parts[0].0.gpu;
    let total: usize = parts.iter().map(|(_, n)| n).sum();
    let mut data = match *parts[0].0.data {
        DeviceData::BF16(_) => DeviceData::BF16(alloc_bf16(g, total)?),
        DeviceData::F32(_) => DeviceData::F32(alloc_f32(g, total)?),
    };
    let mut at = 0;
    for &(p, n) in parts {
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
            _ => return Err(KernelError::DType { op: "concat_rows", expected: parts[0].0.dtype(), got: p.dtype() }),
        }
        .map_err(|e| g.err("copy", e))?;
        at += n;
    }
    Ok(Buffer::new(g.clone(), data))
}

pub(crate) fn add_inplace(x: &mut Buffer, y: &Buffer, n: usize) -> Result<()> {
    const OP: &str = "add";
    let g = x.gpu.clone();
    if n == 0 {
        return Ok(());
    }
    let f = g.kernel("add_bf16")?;
    let n64 = n as u64;
    let ys = y.bf16(OP)?;
    let xs = x.bf16_mut(OP)?;
    // SAFETY: n elements each.
    unsafe { g.stream.launch_builder(f).arg(xs).arg(ys).arg(&n64).launch(Gpu::elementwise_cfg(n)) }
        .map_err(|e| g.err(OP, e))?;
    Ok(())
}

pub(crate) fn embedding(ids: &[u32], table: &Buffer, h: usize) -> Result<Buffer> {
    const OP: &str = "embedding";
    let g = &table.gpu;
    let n = ids.len() * h;
    let mut out = alloc_bf16(g, n)?;
    if n > 0 {
        let dev_ids = g.upload_u32(ids)?;
        let f = g.kernel("embedding_bf16")?;
        let (ni, h64) = (ids.len() as u64, h as u64);
        // SAFETY: ids were bounds-checked against the table's rows by `ops::embedding`.
        unsafe {
            g.stream
                .launch_builder(f)
                .arg(&dev_ids)
                .arg(table.bf16(OP)?)
                .arg(&mut out)
                .arg(&ni)
                .arg(&h64)
                .launch(Gpu::elementwise_cfg(n))
        }
        .map_err(|e| g.err(OP, e))?;
    }
    Ok(Buffer::new(g.clone(), DeviceData::BF16(out)))
}

pub(crate) fn gather_rows(x: &Buffer, rows: &[u32], w: usize) -> Result<Buffer> {
    let g = &x.gpu;
    let n = rows.len() * w;
    let idx = g.upload_u32(rows)?;
    let (nr, w64) = (rows.len() as u64, w as u64);
    let cfg = Gpu::elementwise_cfg(n);
    // SAFETY: row indices were bounds-checked by `ops::gather_rows`.
    let data = match &*x.data {
        DeviceData::BF16(s) => {
            let mut out = alloc_bf16(g, n)?;
            if n > 0 {
                let f = g.kernel("gather_rows_bf16")?;
                unsafe { g.stream.launch_builder(f).arg(s).arg(&idx).arg(&mut out).arg(&nr).arg(&w64).launch(cfg) }
                    .map_err(|e| g.err("gather_rows", e))?;
            }
            DeviceData::BF16(out)
        }
        DeviceData::F32(s) => {
            let mut out = alloc_f32(g, n)?;
            if n > 0 {
                let f = g.kernel("gather_rows_f32")?;
                unsafe { g.stream.launch_builder(f).arg(s).arg(&idx).arg(&mut out).arg(&nr).arg(&w64).launch(cfg) }
                    .map_err(|e| g.err("gather_rows", e))?;
            }
            DeviceData::F32(out)
        }
    };
    Ok(Buffer::new(g.clone(), data))
}

pub(crate) fn write_kv(
    k: &Buffer,
    v: &Buffer,
    kc: &mut Buffer,
    vc: &mut Buffer,
    slots: &[u32],
    row: usize,
) -> Result<()> {
    const OP: &str = "write_kv_cache";
    let g = k.gpu.clone();
    let n = slots.len() * row;
    if n == 0 {
        return Ok(());
    }
    let dev_slots = g.upload_cached("kv.slots", slots)?;
    let f = g.kernel("write_kv_bf16")?;
    let (t64, r64) = (slots.len() as u64, row as u64);
    let (ks, vs) = (k.bf16(OP)?, v.bf16(OP)?);
    let kcs = kc.bf16_mut(OP)?;
    let vcs = vc.bf16_mut(OP)?;
    // SAFETY: slots were bounds-checked against the cache capacity by `ops::write_kv_cache`.
    unsafe {
        g.stream
            .launch_builder(f)
            .arg(ks)
            .arg(vs)
            .arg(kcs)
            .arg(vcs)
            .arg(&*dev_slots)
            .arg(&t64)
            .arg(&r64)
            .launch(Gpu::elementwise_cfg(n))
    }
    .map_err(|e| g.err(OP, e))?;
    Ok(())
}

/// Paged attention for a mixed batch: single-token sequences go to the decode kernel, longer ones to the
/// tiled prefill kernel; the two launches write disjoint rows of the output.
pub(crate) fn paged_attention(
    q: &Buffer,
    kc: &Buffer,
    vc: &Buffer,
    seqs: &[AttentionSeq<'_>],
    s: &AttentionShape,
    rows: usize,
) -> Result<Buffer> {
    const OP: &str = "paged_attention";
    let g = &q.gpu;
    if s.head_dim > 256 || !s.head_dim.is_multiple_of(2) {
        return Err(KernelError::shape(
            OP,
            format!("head_dim {} (the CUDA kernels take even sizes up to 256)", s.head_dim),
        ));
    }
    let mut out = alloc_bf16(g, rows * s.num_heads * s.head_dim)?;
    if rows == 0 {
        return Ok(Buffer::new(g.clone(), DeviceData::BF16(out)));
    }
    let mut row_pos = vec![0u32; rows];
    let mut row_seq = vec![0u32; rows];
    let mut seq_bt = Vec::with_capacity(seqs.len());
    let mut tables = Vec::new();
    let mut decode_rows = Vec::new();
    let mut tiles = Vec::new();
    let mut dense = Vec::new();
    for (i, seq) in seqs.iter().enumerate() {
        seq_bt.push(tables.len() as u32);
        tables.extend_from_slice(seq.block_table);
        for j in 0..seq.q_len {
            row_pos[seq.q_start + j] = (seq.pos0 + j) as u32;
            row_seq[seq.q_start + j] = i as u32;
        }
        if seq.q_len == 1 {
            decode_rows.push(seq.q_start as u32);
        } else if seq.q_len >= DENSE_MIN_ROWS && s.num_heads * seq.q_len * (seq.pos0 + seq.q_len) <= DENSE_MAX_SCORES {
            dense.push(*seq);
        } else {
            for r0 in (0..seq.q_len).step_by(PREFILL_ROWS) {
                tiles.push((seq.q_start + r0) as u32);
                tiles.push(PREFILL_ROWS.min(seq.q_len - r0) as u32);
            }
        }
    }
    let pos = g.upload_cached("attn.pos", &row_pos)?;
    let seq = g.upload_cached("attn.seq", &row_seq)?;
    let bt_off = g.upload_cached("attn.bt_off", &seq_bt)?;
    let bt = g.upload_cached("attn.tables", &tables)?;
    let (qs, ks, vs) = (q.bf16(OP)?, kc.bf16(OP)?, vc.bf16(OP)?);
    let (nh, nkv, hd, bs) = (s.num_heads as i32, s.num_kv_heads as i32, s.head_dim as i32, s.block_size as i32);
    let window = s.sliding_window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
    let scale = s.scale;
    if !decode_rows.is_empty() {
        let dev_rows = g.upload_cached("attn.decode_rows", &decode_rows)?;
        let f = g.kernel("attention_decode_bf16")?;
        let cfg = LaunchConfig {
            grid_dim: (decode_rows.len() as u32, s.num_heads as u32, 1),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: ((s.head_dim + 2 * DECODE_CHUNK) * 4) as u32,
        };
        // SAFETY: rows, positions and block tables were validated by `ops::paged_attention`.
        unsafe {
            g.stream
                .launch_builder(f)
                .arg(qs)
                .arg(ks)
                .arg(vs)
                .arg(&mut out)
                .arg(&*dev_rows)
                .arg(&*pos)
                .arg(&*seq)
                .arg(&*bt_off)
                .arg(&*bt)
                .arg(&nh)
                .arg(&nkv)
                .arg(&hd)
                .arg(&bs)
                .arg(&scale)
                .arg(&window)
                .launch(cfg)
        }
        .map_err(|e| g.err("attention_decode", e))?;
    }
    if !tiles.is_empty() {
        let dev_tiles = g.upload_cached("attn.tiles", &tiles)?;
        let f = g.kernel("attention_prefill_bf16")?;
        let smem = PREFILL_ROWS * s.head_dim * 4 + PREFILL_KEYS * 4 + 2 * PREFILL_KEYS * (s.head_dim + 2) * 2;
        let cfg = LaunchConfig {
            grid_dim: ((tiles.len() / 2) as u32, s.num_heads as u32, 1),
            block_dim: ((PREFILL_ROWS * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: as above.
        unsafe {
            g.stream
                .launch_builder(f)
                .arg(qs)
                .arg(ks)
                .arg(vs)
                .arg(&mut out)
                .arg(&*dev_tiles)
                .arg(&*pos)
                .arg(&*seq)
                .arg(&*bt_off)
                .arg(&*bt)
                .arg(&nh)
                .arg(&nkv)
                .arg(&hd)
                .arg(&bs)
                .arg(&scale)
                .arg(&window)
                .launch(cfg)
        }
        .map_err(|e| g.err("attention_prefill", e))?;
    }
    for seq in &dense {
        dense_prefill(g, qs, ks, vs, &mut out, seq, s)?;
    }
    Ok(Buffer::new(g.clone(), DeviceData::BF16(out)))
}

/// One strided-batched GEMM on raw device pointers (bf16 inputs, f32 accumulation), column-major as cuBLAS
/// sees it: `C[m, n] = op(A)[m, k] · op(B)[k, n]` for `batch` matrices `stride_*` elements apart.
#[allow(clippy::too_many_arguments)]
fn gemm_batched(
    g: &Gpu,
    trans_a: bool,
    (m, n, k): (usize, usize, usize),
    (a, lda, stride_a): (u64, usize, usize),
    (b, ldb, stride_b): (u64, usize, usize),
    (c, c_f32, ldc, stride_c): (u64, bool, usize, usize),
    batch: usize,
) -> Result<()> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    let op_a = if trans_a { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let c_type = if c_f32 { cudaDataType_t::CUDA_R_32F } else { cudaDataType_t::CUDA_R_16BF };
    let i = |v: usize| v as i32;
    // SAFETY: the caller passes pointers to buffers that hold every element the dimensions, leading
    // dimensions and strides address.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *g.blas.handle(),
            op_a,
            cublasOperation_t::CUBLAS_OP_N,
            i(m),
            i(n),
            i(k),
            (&alpha) as *const f32 as *const _,
            a as *const _,
            cudaDataType_t::CUDA_R_16BF,
            i(lda),
            stride_a as i64,
            b as *const _,
            cudaDataType_t::CUDA_R_16BF,
            i(ldb),
            stride_b as i64,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            c_type,
            i(ldc),
            stride_c as i64,
            i(batch),
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| g.err("cublasGemmStridedBatchedEx", e))
}

/// Attention of one long prefill chunk on the tensor cores: the sequence's keys and values are gathered
/// from the paged cache into contiguous rows, scores come from one batched GEMM per query head of each KV
/// group, a softmax kernel applies the causal (and window) mask, and a second GEMM writes the output rows
/// in place.
fn dense_prefill(
    g: &Gpu,
    q: &CudaSlice<bf16>,
    kc: &CudaSlice<bf16>,
    vc: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    seq: &AttentionSeq<'_>,
    s: &AttentionShape,
) -> Result<()> {
    let (nh, nkv, hd) = (s.num_heads, s.num_kv_heads, s.head_dim);
    let group = nh / nkv;
    let (rows, keys) = (seq.q_len, seq.pos0 + seq.q_len);
    let slots: Vec<u32> = (0..keys)
        .map(|p| (seq.block_table[p / s.block_size] as usize * s.block_size + p % s.block_size) as u32)
        .collect();
    let dev_slots = g.upload_u32(&slots)?;
    let row = nkv * hd;
    let gather = g.kernel("gather_rows_bf16")?;
    let (mut k, mut v) = (alloc_bf16(g, keys * row)?, alloc_bf16(g, keys * row)?);
    let (n64, w64) = (keys as u64, row as u64);
    for (src, dst) in [(kc, &mut k), (vc, &mut v)] {
        // SAFETY: slots address rows of the cache (validated block tables); `dst` holds keys × row.
        unsafe {
            g.stream
                .launch_builder(gather)
                .arg(src)
                .arg(&dev_slots)
                .arg(dst)
                .arg(&n64)
                .arg(&w64)
                .launch(Gpu::elementwise_cfg(keys * row))
        }
        .map_err(|e| g.err("gather_rows", e))?;
    }
    let scores_n = nh * rows * keys;
    let mut scores = alloc_f32(g, scores_n)?;
    let mut probs = alloc_bf16(g, scores_n)?;
    g.ctx.bind_to_thread().map_err(|e| g.err("bind", e))?;
    {
        let (kp, _k) = k.device_ptr(&g.stream);
        let (qp, _q) = q.device_ptr(&g.stream);
        let (sp, _s) = scores.device_ptr_mut(&g.stream);
        let q0 = qp + (seq.q_start * nh * hd * 2) as u64;
        for gi in 0..group {
            // Heads h = kvh * group + gi for kvh in 0..nkv: S_hᵀ[keys, rows] = K_kvh · Q_hᵀ.
            gemm_batched(
                g,
                true,
                (keys, rows, hd),
                (kp, row, hd),
                (q0 + (gi * hd * 2) as u64, nh * hd, group * hd),
                (sp + (gi * rows * keys * 4) as u64, true, keys, group * rows * keys),
                nkv,
            )?;
        }
    }
    let softmax = g.kernel("causal_softmax_bf16")?;
    let (qi, ki, p0) = (rows as i32, keys as i32, seq.pos0 as u32);
    let window = s.sliding_window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
    // SAFETY: one block per score row of `keys` elements.
    unsafe {
        g.stream
            .launch_builder(softmax)
            .arg(&scores)
            .arg(&mut probs)
            .arg(&qi)
            .arg(&ki)
            .arg(&p0)
            .arg(&s.scale)
            .arg(&window)
            .launch(row_cfg(nh * rows, 256))
    }
    .map_err(|e| g.err("causal_softmax", e))?;
    let (vp, _v) = v.device_ptr(&g.stream);
    let (pp, _p) = probs.device_ptr(&g.stream);
    let (op, _o) = out.device_ptr_mut(&g.stream);
    let o0 = op + (seq.q_start * nh * hd * 2) as u64;
    for gi in 0..group {
        // O_hᵀ[hd, rows] = V_kvhᵀ · P_hᵀ, written into the output rows of head h.
        gemm_batched(
            g,
            false,
            (hd, rows, keys),
            (vp, row, hd),
            (pp + (gi * rows * keys * 2) as u64, keys, group * rows * keys),
            (o0 + (gi * hd * 2) as u64, false, nh * hd, group * hd),
            nkv,
        )?;
    }
    Ok(())
}

/// The index of the largest logit of each row (f32 logits `[rows, vocab]`).
pub(crate) fn argmax(logits: &Buffer, rows: usize, vocab: usize) -> Result<Vec<u32>> {
    let g = &logits.gpu;
    if rows == 0 {
        return Ok(Vec::new());
    }
    let mut out = g.stream.alloc_zeros::<u32>(rows).map_err(|e| g.err("alloc", e))?;
    let f = g.kernel("argmax_f32")?;
    let v = vocab as i32;
    // SAFETY: one block of 256 threads (SAMPLE_THREADS) per row of `vocab` logits.
    unsafe { g.stream.launch_builder(f).arg(logits.f32("argmax")?).arg(&v).arg(&mut out).launch(row_cfg(rows, 256)) }
        .map_err(|e| g.err("argmax", e))?;
    g.stream.clone_dtoh(&out).map_err(|e| g.err("copy to host", e))
}

/// Per-row temperature / top-k / top-p draw with the given uniforms (see sampling.cu).
pub(crate) fn sample(
    logits: &Buffer,
    vocab: usize,
    temperature: &[f32],
    top_k: &[u32],
    top_p: &[f32],
    uniform: &[f32],
) -> Result<Vec<u32>> {
    let g = &logits.gpu;
    let rows = temperature.len();
    if rows == 0 {
        return Ok(Vec::new());
    }
    let up = |v: &[f32]| g.stream.clone_htod(v).map_err(|e| g.err("copy", e));
    let (t, p, u) = (up(temperature)?, up(top_p)?, up(uniform)?);
    let k = g.upload_u32(top_k)?;
    let mut out = g.stream.alloc_zeros::<u32>(rows).map_err(|e| g.err("alloc", e))?;
    let f = g.kernel("sample_f32")?;
    let v = vocab as i32;
    // SAFETY: one block of 256 threads per row; every per-row array holds `rows` entries.
    unsafe {
        g.stream
            .launch_builder(f)
            .arg(logits.f32("sample")?)
            .arg(&v)
            .arg(&t)
            .arg(&k)
            .arg(&p)
            .arg(&u)
            .arg(&mut out)
            .launch(row_cfg(rows, 256))
    }
    .map_err(|e| g.err("sample", e))?;
    g.stream.clone_dtoh(&out).map_err(|e| g.err("copy to host", e))
}
