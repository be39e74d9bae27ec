//! Elementwise ops of the MLP and the residual stream (elementwise.cu): SiLU-gated products, in-place add,
//! and copying a column range out of a fused projection.

use cudarc::driver::PushKernelArg;

use super::launch::alloc_bf16;
use crate::{
    cuda::{Buffer, DeviceData, Gpu},
    error::Result,
};

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

/// `y[rows[r], col0 + c] += scale · d[r, c]` (bf16): a LoRA delta added to one adapter's rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rows_scaled(
    y: &mut Buffer,
    y_cols: usize,
    rows: &[u32],
    col0: usize,
    d: &Buffer,
    w: usize,
    scale: f32,
) -> Result<()> {
    const OP: &str = "add_rows_scaled";
    let g = y.gpu.clone();
    let n = rows.len() * w;
    if n == 0 {
        return Ok(());
    }
    let idx = g.upload_u32(rows)?;
    let f = g.kernel("add_rows_scaled_bf16")?;
    let (nr, yc, c0, w64) = (rows.len() as u64, y_cols as u64, col0 as u64, w as u64);
    let ds = d.bf16(OP)?;
    let ys = y.bf16_mut(OP)?;
    // SAFETY: rows are distinct and inside y, and col0 + w <= y_cols (checked by `ops::add_rows_scaled`).
    unsafe {
        g.stream
            .launch_builder(f)
            .arg(ys)
            .arg(ds)
            .arg(&idx)
            .arg(&nr)
            .arg(&yc)
            .arg(&c0)
            .arg(&w64)
            .arg(&scale)
            .launch(Gpu::elementwise_cfg(n))
    }
    .map_err(|e| g.err(OP, e))?;
    Ok(())
}
