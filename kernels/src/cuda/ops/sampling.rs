//! Picking the next token on the device from f32 logits (sampling.cu): greedy argmax, or a temperature /
//! top-k / top-p draw; only the chosen ids are copied back.

use cudarc::driver::PushKernelArg;

use super::launch::row_cfg;
use crate::{cuda::Buffer, error::Result};

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
