//! RMS norm, alone or fused with the residual add that precedes it (norm.cu): one block per row.

use cudarc::driver::PushKernelArg;

use super::launch::{alloc_bf16, row_cfg};
use crate::{
    cuda::{Buffer, DeviceData},
    error::Result,
};

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
