//! Attention of one long prefill chunk on the tensor cores: the sequence's keys and values are gathered
//! from the paged cache into contiguous rows, scores come from one batched GEMM per query head of each KV
//! group, a softmax kernel applies the causal (and window) mask, and a second GEMM writes the output rows
//! in place. Worth it once a chunk has enough rows to fill the GEMMs; [`super::attention`] decides.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

use super::{
    blas::gemm_batched,
    launch::{alloc_bf16, alloc_f32, row_cfg},
};
use crate::{
    cpu::attention::{AttentionSeq, AttentionShape},
    cuda::Gpu,
    error::Result,
};

/// Writes the output rows of `seq` (all heads) into `out`.
pub(super) fn dense_prefill(
    g: &Gpu,
    q: &CudaSlice<bf16>,
    kc: &CudaSlice<bf16>,
    vc: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    seq: &AttentionSeq<'_>,
    s: &AttentionShape,
) -> Result<()> {
    let (k, v) = gather_kv(g, kc, vc, seq, s)?;
    let scores_n = s.num_heads * seq.q_len * (seq.pos0 + seq.q_len);
    let mut scores = alloc_f32(g, scores_n)?;
    let mut probs = alloc_bf16(g, scores_n)?;
    g.ctx.bind_to_thread().map_err(|e| g.err("bind", e))?;
    scores_gemm(g, q, &k, &mut scores, seq, s)?;
    causal_softmax(g, &scores, &mut probs, seq, s)?;
    output_gemm(g, &v, &probs, out, seq, s)
}

/// The sequence's keys and values, `[keys, kv_heads · head_dim]` each, copied out of the paged cache.
fn gather_kv(
    g: &Gpu,
    kc: &CudaSlice<bf16>,
    vc: &CudaSlice<bf16>,
    seq: &AttentionSeq<'_>,
    s: &AttentionShape,
) -> Result<(CudaSlice<bf16>, CudaSlice<bf16>)> {
    let keys = seq.pos0 + seq.q_len;
    let slots: Vec<u32> = (0..keys)
        .map(|p| (seq.block_table[p / s.block_size] as usize * s.block_size + p % s.block_size) as u32)
        .collect();
    let dev_slots = g.upload_u32(&slots)?;
    let row = s.num_kv_heads * s.head_dim;
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
    Ok((k, v))
}

/// Raw f32 scores, laid out `[group index, kv head, rows, keys]`, i.e. by query head within each KV group.
fn scores_gemm(
    g: &Gpu,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    scores: &mut CudaSlice<f32>,
    seq: &AttentionSeq<'_>,
    s: &AttentionShape,
) -> Result<()> {
    let (nh, nkv, hd) = (s.num_heads, s.num_kv_heads, s.head_dim);
    let (group, row) = (nh / nkv, nkv * hd);
    let (rows, keys) = (seq.q_len, seq.pos0 + seq.q_len);
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
    Ok(())
}

/// Scaled, masked softmax of each score row into bf16 probabilities.
fn causal_softmax(
    g: &Gpu,
    scores: &CudaSlice<f32>,
    probs: &mut CudaSlice<bf16>,
    seq: &AttentionSeq<'_>,
    s: &AttentionShape,
) -> Result<()> {
    let softmax = g.kernel("causal_softmax_bf16")?;
    let rows = seq.q_len;
    let (qi, ki, p0) = (rows as i32, (seq.pos0 + rows) as i32, seq.pos0 as u32);
    let window = s.sliding_window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
    // SAFETY: one block per score row of `keys` elements.
    unsafe {
        g.stream
            .launch_builder(softmax)
            .arg(scores)
            .arg(probs)
            .arg(&qi)
            .arg(&ki)
            .arg(&p0)
            .arg(&s.scale)
            .arg(&window)
            .launch(row_cfg(s.num_heads * rows, 256))
    }
    .map_err(|e| g.err("causal_softmax", e))?;
    Ok(())
}

/// `P · V` per head, written straight into the sequence's rows of the attention output.
fn output_gemm(
    g: &Gpu,
    v: &CudaSlice<bf16>,
    probs: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    seq: &AttentionSeq<'_>,
    s: &AttentionShape,
) -> Result<()> {
    let (nh, nkv, hd) = (s.num_heads, s.num_kv_heads, s.head_dim);
    let (group, row) = (nh / nkv, nkv * hd);
    let (rows, keys) = (seq.q_len, seq.pos0 + seq.q_len);
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
