//! The ops of the forward pass on [`Tensor`]s: every op checks shapes, dtypes and devices and returns a
//! [`KernelError`] instead of panicking, then dispatches to the device's implementation.
//!
//! Activations are f32 on the CPU. Adding a device means adding an arm to each `match` below; callers do
//! not change.

use crate::{DType, Device, KernelError, Result, Tensor, cpu};

pub use crate::cpu::attention::{AttentionSeq, AttentionShape};

fn f32s<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [f32]> {
    match t.device() {
        Device::Cpu => {}
        d => return Err(KernelError::Device { op, device: d }),
    }
    t.as_f32().map_err(|_| KernelError::DType { op, expected: DType::F32, got: t.dtype() })
}

fn f32s_mut<'a>(op: &'static str, t: &'a mut Tensor) -> Result<&'a mut [f32]> {
    let got = t.dtype();
    t.as_f32_mut().map_err(|_| KernelError::DType { op, expected: DType::F32, got })
}

fn expect_rank(op: &'static str, name: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(KernelError::shape(op, format!("{name} must have rank {rank}, has shape {:?}", t.shape())));
    }
    Ok(())
}

/// `x[m, k] · w[n, k]ᵀ + bias[n]` → `[m, n]`. Weights are laid out as in Hugging Face checkpoints.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "linear";
    expect_rank(OP, "x", x, 2)?;
    expect_rank(OP, "w", w, 2)?;
    let (m, k, n) = (x.dim(0), x.dim(1), w.dim(0));
    if w.dim(1) != k {
        return Err(KernelError::shape(OP, format!("x {:?} · w {:?}ᵀ: inner dims differ", x.shape(), w.shape())));
    }
    if let Some(b) = bias
        && b.shape() != [n]
    {
        return Err(KernelError::shape(OP, format!("bias {:?} for {n} outputs", b.shape())));
    }
    let mut out = vec![0f32; m * n];
    let b = bias.map(|b| f32s(OP, b)).transpose()?;
    cpu::matmul::linear(f32s(OP, x)?, f32s(OP, w)?, b, &mut out, m, k, n);
    Tensor::from_f32(out, &[m, n])
}

/// `a[m, k] · b[k, n]` → `[m, n]`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "matmul";
    expect_rank(OP, "a", a, 2)?;
    expect_rank(OP, "b", b, 2)?;
    let (m, k, n) = (a.dim(0), a.dim(1), b.dim(1));
    if b.dim(0) != k {
        return Err(KernelError::shape(OP, format!("a {:?} · b {:?}: inner dims differ", a.shape(), b.shape())));
    }
    let mut out = vec![0f32; m * n];
    cpu::matmul::matmul(f32s(OP, a)?, f32s(OP, b)?, &mut out, m, k, n);
    Tensor::from_f32(out, &[m, n])
}

/// RMSNorm over the last dimension of `x` with a `[hidden]` weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    expect_rank(OP, "weight", weight, 1)?;
    if x.shape().last() != Some(&weight.dim(0)) {
        return Err(KernelError::shape(OP, format!("x {:?} with weight {:?}", x.shape(), weight.shape())));
    }
    let mut out = vec![0f32; x.numel()];
    cpu::norm::rms_norm(f32s(OP, x)?, f32s(OP, weight)?, eps, &mut out);
    Tensor::from_f32(out, x.shape())
}

/// Rotates `x` (`[tokens, heads, head_dim]`) in place: token `t` by `positions[t]` with the given inverse
/// frequencies (see [`crate::rope::Rope::inv_freq`]).
pub fn rope_inplace(x: &mut Tensor, positions: &[u32], inv_freq: &[f32]) -> Result<()> {
    const OP: &str = "rope";
    expect_rank(OP, "x", x, 3)?;
    let (t, h, d) = (x.dim(0), x.dim(1), x.dim(2));
    if positions.len() != t || d % 2 != 0 || inv_freq.len() != d / 2 {
        return Err(KernelError::shape(
            OP,
            format!("x {:?}, {} positions, {} frequencies", x.shape(), positions.len(), inv_freq.len()),
        ));
    }
    cpu::rope::rope_inplace(f32s_mut(OP, x)?, positions, h, d, inv_freq);
    Ok(())
}

/// `silu(gate) * up`, element-wise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "silu_mul";
    if gate.shape() != up.shape() {
        return Err(KernelError::shape(OP, format!("gate {:?} vs up {:?}", gate.shape(), up.shape())));
    }
    let mut out = vec![0f32; gate.numel()];
    cpu::elementwise::silu_mul(f32s(OP, gate)?, f32s(OP, up)?, &mut out);
    Tensor::from_f32(out, gate.shape())
}

/// Softmax over the last dimension, in place.
pub fn softmax_inplace(x: &mut Tensor) -> Result<()> {
    const OP: &str = "softmax";
    let n = *x.shape().last().ok_or_else(|| KernelError::shape(OP, "rank-0 tensor"))?;
    if n == 0 {
        return Ok(());
    }
    cpu::elementwise::softmax_rows(f32s_mut(OP, x)?, n);
    Ok(())
}

/// `x += y`, element-wise (the residual connection).
pub fn add_inplace(x: &mut Tensor, y: &Tensor) -> Result<()> {
    const OP: &str = "add";
    if x.shape() != y.shape() {
        return Err(KernelError::shape(OP, format!("{:?} += {:?}", x.shape(), y.shape())));
    }
    let y = f32s(OP, y)?;
    cpu::elementwise::add_inplace(f32s_mut(OP, x)?, y);
    Ok(())
}

/// Rows of a `[vocab, hidden]` table for each id → `[ids, hidden]`.
pub fn embedding(ids: &[u32], table: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    expect_rank(OP, "table", table, 2)?;
    let (vocab, h) = (table.dim(0), table.dim(1));
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(KernelError::index(OP, format!("token id {bad} outside vocabulary of {vocab}")));
    }
    let mut out = vec![0f32; ids.len() * h];
    cpu::elementwise::embedding(ids, f32s(OP, table)?, h, &mut out);
    Tensor::from_f32(out, &[ids.len(), h])
}

/// Stores `k`, `v` (`[tokens, num_kv_heads, head_dim]`) into one layer's paged caches
/// (`[num_blocks, block_size, num_kv_heads, head_dim]`) at flat slots `block * block_size + offset`.
pub fn write_kv_cache(
    k: &Tensor,
    v: &Tensor,
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    slots: &[usize],
) -> Result<()> {
    const OP: &str = "write_kv_cache";
    expect_rank(OP, "k", k, 3)?;
    expect_rank(OP, "k_cache", k_cache, 4)?;
    if k.shape() != v.shape() || k_cache.shape() != v_cache.shape() {
        return Err(KernelError::shape(OP, "k/v or k_cache/v_cache shapes differ"));
    }
    let row = k.dim(1) * k.dim(2);
    if k.dim(0) != slots.len() || k_cache.dim(2) * k_cache.dim(3) != row {
        return Err(KernelError::shape(
            OP,
            format!("k {:?} into cache {:?} at {} slots", k.shape(), k_cache.shape(), slots.len()),
        ));
    }
    let capacity = k_cache.dim(0) * k_cache.dim(1);
    if let Some(&bad) = slots.iter().find(|&&s| s >= capacity) {
        return Err(KernelError::index(OP, format!("slot {bad} beyond cache of {capacity}")));
    }
    let (k, v) = (f32s(OP, k)?, f32s(OP, v)?);
    let kc = f32s_mut(OP, k_cache)?;
    let vc = f32s_mut(OP, v_cache)?;
    cpu::attention::write_kv(k, v, kc, vc, slots, row);
    Ok(())
}

/// Causal (optionally sliding-window) grouped-query attention of `q` (`[tokens, num_heads, head_dim]`)
/// over paged caches, for a batch of sequences each owning a contiguous run of query rows.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[AttentionSeq<'_>],
    shape: &AttentionShape,
) -> Result<Tensor> {
    const OP: &str = "paged_attention";
    expect_rank(OP, "q", q, 3)?;
    expect_rank(OP, "k_cache", k_cache, 4)?;
    let s = shape;
    if q.dim(1) != s.num_heads || q.dim(2) != s.head_dim {
        return Err(KernelError::shape(OP, format!("q {:?} for {} heads of {}", q.shape(), s.num_heads, s.head_dim)));
    }
    if s.num_kv_heads == 0 || !s.num_heads.is_multiple_of(s.num_kv_heads) {
        return Err(KernelError::shape(OP, format!("{} heads over {} kv heads", s.num_heads, s.num_kv_heads)));
    }
    let want = [k_cache.dim(0), s.block_size, s.num_kv_heads, s.head_dim];
    if k_cache.shape() != want || v_cache.shape() != want {
        return Err(KernelError::shape(
            OP,
            format!("caches {:?}/{:?}, expected {want:?}", k_cache.shape(), v_cache.shape()),
        ));
    }
    let num_blocks = k_cache.dim(0);
    let mut next_row = 0;
    for (i, seq) in seqs.iter().enumerate() {
        if seq.q_start != next_row || seq.q_len == 0 {
            return Err(KernelError::shape(
                OP,
                format!("sequence {i} covers rows {}+{}, expected to start at {next_row}", seq.q_start, seq.q_len),
            ));
        }
        next_row += seq.q_len;
        let needed = (seq.pos0 + seq.q_len).div_ceil(s.block_size);
        if seq.block_table.len() < needed {
            return Err(KernelError::index(
                OP,
                format!("sequence {i} needs {needed} blocks, table has {}", seq.block_table.len()),
            ));
        }
        if let Some(&b) = seq.block_table[..needed].iter().find(|&&b| b as usize >= num_blocks) {
            return Err(KernelError::index(OP, format!("sequence {i}: block {b} beyond cache of {num_blocks}")));
        }
    }
    if next_row != q.dim(0) {
        return Err(KernelError::shape(OP, format!("sequences cover {next_row} rows, q has {}", q.dim(0))));
    }
    let mut out = vec![0f32; q.numel()];
    cpu::attention::paged_attention(f32s(OP, q)?, f32s(OP, k_cache)?, f32s(OP, v_cache)?, seqs, s, &mut out);
    Tensor::from_f32(out, q.shape())
}
