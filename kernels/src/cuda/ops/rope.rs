//! Rotary position embedding, applied in place to the query or key rows (rope.cu).

use cudarc::driver::PushKernelArg;

use super::launch::row_cfg;
use crate::{cuda::Buffer, error::Result};

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
