//! The ops of the forward pass on [`Tensor`]s: every op checks shapes, dtypes and devices and returns a
//! [`KernelError`] instead of panicking, then dispatches to the device's implementation.
//!
//! Activations are f32 on the CPU and bf16 on CUDA (weights too, with f32 accumulation). Every tensor of
//! one call must be on the same device; the CUDA arm of each op is in [`crate::cuda`].

use crate::{cpu, device::Device, dtype::DType, error::KernelError, error::Result, tensor::Tensor};

#[cfg(feature = "cuda")]
use crate::cuda::ops as gpu;

/// The CUDA buffers of tensors that must all live on the same GPU, or `None` when they are all on the CPU.
#[cfg(feature = "cuda")]
fn cuda_all<'a, const N: usize>(op: &'static str, ts: [&'a Tensor; N]) -> Result<Option<[&'a crate::cuda::Buffer; N]>> {
    let dev = ts[0].device();
    if let Some(t) = ts.iter().find(|t| t.device() != dev) {
        return Err(KernelError::shape(op, format!("tensors on {dev} and {}", t.device())));
    }
    if dev == Device::Cpu {
        return Ok(None);
    }
    Ok(Some(ts.map(|t| t.cuda_buffer().expect("device is cuda"))))
}

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

/// `x[m, k] · w[n, k]ᵀ + bias[n]` → `[m, n]`. Weights are laid out as in Hugging Face checkpoints; on the CPU
/// they may be a quantized matrix ([`Tensor::from_quant`]), multiplied by [`cpu::quant`].
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_to(x, w, bias, x.dtype())
}

/// [`linear`] with the output in `out` (CUDA computes bf16 inputs into bf16 or f32; the CPU is f32).
pub fn linear_to(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out: DType) -> Result<Tensor> {
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
    if let Some(q) = w.quant_matrix() {
        if out != DType::F32 {
            return Err(KernelError::DType { op: OP, expected: DType::F32, got: out });
        }
        let mut out = vec![0f32; m * n];
        let b = bias.map(|b| f32s(OP, b)).transpose()?;
        cpu::quant::linear(f32s(OP, x)?, q, b, &mut out, m);
        return Tensor::from_f32(out, &[m, n]);
    }
    #[cfg(feature = "cuda")]
    if let Some([xb, wb]) = cuda_all(OP, [x, w])? {
        let bb = bias.map(|b| cuda_all(OP, [x, b])).transpose()?.flatten().map(|[_, b]| b);
        return Ok(Tensor::from_cuda(gpu::linear(xb, wb, bb, out, m, k, n)?, &[m, n]));
    }
    if out != DType::F32 {
        return Err(KernelError::DType { op: OP, expected: DType::F32, got: out });
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
    #[cfg(feature = "cuda")]
    if let Some([xb, wb]) = cuda_all(OP, [x, weight])? {
        let h = weight.dim(0);
        return Ok(Tensor::from_cuda(gpu::rms_norm(xb, wb, eps, x.numel() / h.max(1), h)?, x.shape()));
    }
    let mut out = vec![0f32; x.numel()];
    cpu::norm::rms_norm(f32s(OP, x)?, f32s(OP, weight)?, eps, &mut out);
    Tensor::from_f32(out, x.shape())
}

/// The residual connection and the next norm in one pass: `resid += delta`, then returns
/// `rms_norm(resid, weight)`.
pub fn add_rms_norm(resid: &mut Tensor, delta: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "add_rms_norm";
    expect_rank(OP, "weight", weight, 1)?;
    if resid.shape() != delta.shape() || resid.shape().last() != Some(&weight.dim(0)) {
        return Err(KernelError::shape(
            OP,
            format!("residual {:?} + {:?} with weight {:?}", resid.shape(), delta.shape(), weight.shape()),
        ));
    }
    #[cfg(feature = "cuda")]
    if cuda_all(OP, [&*resid, delta, weight])?.is_some() {
        let h = weight.dim(0);
        let rows = resid.numel() / h.max(1);
        let (d, w) = (delta.cuda_buffer().expect("checked"), weight.cuda_buffer().expect("checked"));
        let shape = resid.shape().to_vec();
        let r = resid.cuda_buffer_mut().expect("checked");
        return Ok(Tensor::from_cuda(gpu::add_rms_norm(r, d, w, eps, rows, h)?, &shape));
    }
    add_inplace(resid, delta)?;
    rms_norm(resid, weight, eps)
}

/// Rotates `x` (`[tokens, heads, head_dim]`) in place: token `t` by `positions[t]` with the given inverse
/// frequencies (see [`crate::rope::Rope::inv_freq`]): `head_dim / 2` of them shared by every token, or
/// that many per token (dynamic scaling, where each sequence has its own).
pub fn rope_inplace(x: &mut Tensor, positions: &[u32], inv_freq: &[f32]) -> Result<()> {
    const OP: &str = "rope";
    expect_rank(OP, "x", x, 3)?;
    let (t, h, d) = (x.dim(0), x.dim(1), x.dim(2));
    let freq_ok = inv_freq.len() == d / 2 || (t > 1 && inv_freq.len() == t * (d / 2));
    if positions.len() != t || d % 2 != 0 || !freq_ok {
        return Err(KernelError::shape(
            OP,
            format!("x {:?}, {} positions, {} frequencies", x.shape(), positions.len(), inv_freq.len()),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(b) = x.cuda_buffer_mut() {
        return gpu::rope(b, positions, inv_freq, h, d);
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
    #[cfg(feature = "cuda")]
    if let Some([g, u]) = cuda_all(OP, [gate, up])? {
        return Ok(Tensor::from_cuda(gpu::silu_mul(g, u, gate.numel())?, gate.shape()));
    }
    let mut out = vec![0f32; gate.numel()];
    cpu::elementwise::silu_mul(f32s(OP, gate)?, f32s(OP, up)?, &mut out);
    Tensor::from_f32(out, gate.shape())
}

/// `silu(x[:, :i]) * x[:, i:]` of a `[t, 2i]` tensor holding the gate and up projections side by side
/// (one fused GEMM) → `[t, i]`.
pub fn silu_mul_packed(gate_up: &Tensor) -> Result<Tensor> {
    const OP: &str = "silu_mul_packed";
    expect_rank(OP, "gate_up", gate_up, 2)?;
    let (t, w) = (gate_up.dim(0), gate_up.dim(1));
    if w % 2 != 0 {
        return Err(KernelError::shape(OP, format!("{w} columns do not split into gate and up halves")));
    }
    let inter = w / 2;
    #[cfg(feature = "cuda")]
    if let Some(b) = gate_up.cuda_buffer() {
        return Ok(Tensor::from_cuda(gpu::silu_mul_packed(b, t, inter)?, &[t, inter]));
    }
    let x = f32s(OP, gate_up)?;
    let mut out = vec![0f32; t * inter];
    for (o, row) in out.chunks_exact_mut(inter.max(1)).zip(x.chunks_exact(w.max(1))) {
        let (g, u) = row.split_at(inter);
        cpu::elementwise::silu_mul(g, u, o);
    }
    Tensor::from_f32(out, &[t, inter])
}

/// Splits the columns of a rank-2 tensor into consecutive blocks of the given widths (the q, k and v
/// parts of a fused projection).
pub fn split_cols(x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    const OP: &str = "split_cols";
    expect_rank(OP, "x", x, 2)?;
    let (rows, cols) = (x.dim(0), x.dim(1));
    if widths.iter().sum::<usize>() != cols {
        return Err(KernelError::shape(OP, format!("widths {widths:?} do not add up to {cols} columns")));
    }
    let mut out = Vec::with_capacity(widths.len());
    let mut col0 = 0;
    for &w in widths {
        #[cfg(feature = "cuda")]
        if let Some(b) = x.cuda_buffer() {
            out.push(Tensor::from_cuda(gpu::copy_cols(b, rows, cols, col0, w)?, &[rows, w]));
            col0 += w;
            continue;
        }
        let xs = f32s(OP, x)?;
        let part: Vec<f32> = (0..rows).flat_map(|r| &xs[r * cols + col0..r * cols + col0 + w]).copied().collect();
        out.push(Tensor::from_f32(part, &[rows, w])?);
        col0 += w;
    }
    Ok(out)
}

/// The rank-2 CPU f32 tensors side by side: `[rows, Σ widths]`, the inverse of [`split_cols`].
pub fn concat_cols(parts: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "concat_cols";
    let rows = parts.first().map_or(0, |p| p.shape().first().copied().unwrap_or(0));
    let mut xs = Vec::with_capacity(parts.len());
    for p in parts {
        expect_rank(OP, "part", p, 2)?;
        if p.dim(0) != rows {
            return Err(KernelError::shape(OP, format!("{:?} beside {rows} rows", p.shape())));
        }
        xs.push((f32s(OP, p)?, p.dim(1)));
    }
    let cols: usize = xs.iter().map(|(_, w)| w).sum();
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for (x, w) in &xs {
            out.extend_from_slice(&x[r * w..(r + 1) * w]);
        }
    }
    Tensor::from_f32(out, &[rows, cols])
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
    #[cfg(feature = "cuda")]
    if cuda_all(OP, [&*x, y])?.is_some() {
        let n = x.numel();
        let yb = y.cuda_buffer().expect("checked");
        return gpu::add_inplace(x.cuda_buffer_mut().expect("checked"), yb, n);
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
    #[cfg(feature = "cuda")]
    if let Some(b) = table.cuda_buffer() {
        return Ok(Tensor::from_cuda(gpu::embedding(ids, b, h)?, &[ids.len(), h]));
    }
    let mut out = vec![0f32; ids.len() * h];
    if let Some(q) = table.quant_matrix() {
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(h)) {
            q.dequantize_rows(id as usize, id as usize + 1, row)
                .map_err(|e| KernelError::Unsupported { op: OP, detail: e.to_string() })?;
        }
        return Tensor::from_f32(out, &[ids.len(), h]);
    }
    cpu::elementwise::embedding(ids, f32s(OP, table)?, h, &mut out);
    Tensor::from_f32(out, &[ids.len(), h])
}

/// Rows `rows[i]` of a rank-2 `x`, in that order → `[rows.len(), width]`.
pub fn gather_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    expect_rank(OP, "x", x, 2)?;
    let (n, w) = (x.dim(0), x.dim(1));
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
        return Err(KernelError::index(OP, format!("row {bad} of {n}")));
    }
    #[cfg(feature = "cuda")]
    if let Some(b) = x.cuda_buffer() {
        return Ok(Tensor::from_cuda(gpu::gather_rows(b, rows, w)?, &[rows.len(), w]));
    }
    let xs = f32s(OP, x)?;
    let out: Vec<f32> = rows.iter().flat_map(|&r| &xs[r as usize * w..(r as usize + 1) * w]).copied().collect();
    Tensor::from_f32(out, &[rows.len(), w])
}

/// `y[rows[i], col0 + j] += scale · d[i, j]`: a low-rank (LoRA) delta `d` `[rows.len(), w]` added to some rows
/// and a band of columns of `y` (one adapter's rows of a batch, one projection of a fused output). `rows`
/// must be strictly increasing, so that no element is written twice.
pub fn add_rows_scaled(y: &mut Tensor, rows: &[u32], col0: usize, d: &Tensor, scale: f32) -> Result<()> {
    const OP: &str = "add_rows_scaled";
    expect_rank(OP, "y", y, 2)?;
    expect_rank(OP, "d", d, 2)?;
    let (n, cols) = (y.dim(0), y.dim(1));
    let w = d.dim(1);
    if d.dim(0) != rows.len() || col0 + w > cols {
        return Err(KernelError::shape(
            OP,
            format!("d {:?} for {} rows at column {col0} of y {:?}", d.shape(), rows.len(), y.shape()),
        ));
    }
    if rows.windows(2).any(|p| p[0] >= p[1]) {
        return Err(KernelError::index(OP, "rows must be strictly increasing".to_string()));
    }
    if let Some(&bad) = rows.last().filter(|&&r| r as usize >= n) {
        return Err(KernelError::index(OP, format!("row {bad} of {n}")));
    }
    #[cfg(feature = "cuda")]
    if cuda_all(OP, [&*y, d])?.is_some() {
        let db = d.cuda_buffer().expect("checked");
        return gpu::add_rows_scaled(y.cuda_buffer_mut().expect("checked"), cols, rows, col0, db, w, scale);
    }
    let ds = f32s(OP, d)?;
    let ys = f32s_mut(OP, y)?;
    for (i, &r) in rows.iter().enumerate() {
        let dst = &mut ys[r as usize * cols + col0..r as usize * cols + col0 + w];
        for (a, &b) in dst.iter_mut().zip(&ds[i * w..(i + 1) * w]) {
            *a += scale * b;
        }
    }
    Ok(())
}

/// One adapter's LoRA delta for [`add_lora`]: rows of the batch (strictly increasing), the first column of
/// the output band, the adapter's `a` (`[rank, in]`) and `b` (`[out, rank]`), and its scale.
pub struct LoraJob<'a> {
    pub rows: &'a [u32],
    pub col0: usize,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f32,
}

/// `y[rows, col0..col0 + out] += scale · (x[rows]·aᵀ)·bᵀ` for every job: the LoRA deltas of one projection
/// (`x` its input, `y` its output), for each adapter of a batch and each target of a fused projection.
pub fn add_lora(y: &mut Tensor, x: &Tensor, jobs: &[LoraJob<'_>]) -> Result<()> {
    const OP: &str = "add_lora";
    expect_rank(OP, "y", y, 2)?;
    expect_rank(OP, "x", x, 2)?;
    let (n, y_cols, x_cols) = (y.dim(0), y.dim(1), x.dim(1));
    if x.dim(0) != n {
        return Err(KernelError::shape(OP, format!("x {:?} for y {:?}", x.shape(), y.shape())));
    }
    for j in jobs {
        expect_rank(OP, "a", j.a, 2)?;
        expect_rank(OP, "b", j.b, 2)?;
        let (r, out) = (j.a.dim(0), j.b.dim(0));
        if j.a.dim(1) != x_cols || j.b.dim(1) != r || j.col0 + out > y_cols {
            return Err(KernelError::shape(
                OP,
                format!(
                    "a {:?}, b {:?} at column {} for x {:?}, y {:?}",
                    j.a.shape(),
                    j.b.shape(),
                    j.col0,
                    x.shape(),
                    y.shape()
                ),
            ));
        }
        if j.rows.windows(2).any(|p| p[0] >= p[1]) {
            return Err(KernelError::index(OP, "rows must be strictly increasing".to_string()));
        }
        if let Some(&bad) = j.rows.last().filter(|&&r| r as usize >= n) {
            return Err(KernelError::index(OP, format!("row {bad} of {n}")));
        }
    }
    #[cfg(feature = "cuda")]
    if y.device() != Device::Cpu {
        // On the GPU each job is a gather, two cuBLAS GEMMs and a scaled add.
        for j in jobs.iter().filter(|j| !j.rows.is_empty()) {
            let u = linear(&gather_rows(x, j.rows)?, j.a, None)?;
            add_rows_scaled(y, j.rows, j.col0, &linear(&u, j.b, None)?, j.scale)?;
        }
        return Ok(());
    }
    let xs = f32s(OP, x)?;
    let cpu_jobs = jobs
        .iter()
        .map(|j| {
            Ok(cpu::lora::Job {
                rows: j.rows,
                col0: j.col0,
                a: f32s(OP, j.a)?,
                b: f32s(OP, j.b)?,
                rank: j.a.dim(0),
                out: j.b.dim(0),
                scale: j.scale,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    cpu::lora::add_lora(f32s_mut(OP, y)?, y_cols, xs, x_cols, &cpu_jobs);
    Ok(())
}

/// Index of the largest value of each row of f32 logits `[rows, vocab]` (the first on ties).
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    const OP: &str = "argmax_rows";
    expect_rank(OP, "logits", logits, 2)?;
    let (rows, vocab) = (logits.dim(0), logits.dim(1));
    if vocab == 0 {
        return Err(KernelError::shape(OP, "empty vocabulary"));
    }
    #[cfg(feature = "cuda")]
    if let Some(b) = logits.cuda_buffer() {
        return gpu::argmax(b, rows, vocab);
    }
    Ok(f32s(OP, logits)?.chunks_exact(vocab).map(cpu::sampling::argmax).collect())
}

/// Per-row parameters of [`sample_rows`].
#[derive(Clone, Copy, Debug)]
pub struct RowSampling {
    /// Above zero.
    pub temperature: f32,
    /// 0 for no limit.
    pub top_k: u32,
    /// In (0, 1]; 1 for no limit.
    pub top_p: f32,
    /// The row's uniform number in [0, 1), drawn by the caller from the request's seeded generator.
    pub uniform: f32,
}

/// One token per row of f32 logits: temperature, top-k, top-p, then a draw with the row's uniform number
/// (see [`cpu::sampling::sample`] for the exact definition both devices follow).
pub fn sample_rows(logits: &Tensor, params: &[RowSampling]) -> Result<Vec<u32>> {
    const OP: &str = "sample_rows";
    expect_rank(OP, "logits", logits, 2)?;
    let (rows, vocab) = (logits.dim(0), logits.dim(1));
    if rows != params.len() || vocab == 0 {
        return Err(KernelError::shape(OP, format!("{rows} rows of {vocab} logits, {} parameter sets", params.len())));
    }
    if let Some((i, p)) = params
        .iter()
        .enumerate()
        .find(|(_, p)| !(p.temperature > 0.0 && p.top_p > 0.0 && p.top_p <= 1.0 && (0.0..1.0).contains(&p.uniform)))
    {
        return Err(KernelError::index(OP, format!("row {i}: parameters out of range: {p:?}")));
    }
    #[cfg(feature = "cuda")]
    if let Some(b) = logits.cuda_buffer() {
        let t: Vec<f32> = params.iter().map(|p| p.temperature).collect();
        let k: Vec<u32> = params.iter().map(|p| p.top_k).collect();
        let tp: Vec<f32> = params.iter().map(|p| p.top_p).collect();
        let u: Vec<f32> = params.iter().map(|p| p.uniform).collect();
        return gpu::sample(b, vocab, &t, &k, &tp, &u);
    }
    Ok(f32s(OP, logits)?
        .chunks_exact(vocab)
        .zip(params)
        .map(|(row, p)| cpu::sampling::sample(row, p.temperature, p.top_k, p.top_p, p.uniform))
        .collect())
}

/// Overwrites every element with NaN: tests poison output buffers so that an element a kernel failed to
/// write shows up (see [`count_nonfinite`]).
pub fn poison(t: &mut Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(b) = t.cuda_buffer_mut() {
        let bits = if b.dtype() == DType::BF16 { 0x7fc0 } else { 0x7fc0_0000 };
        return crate::cuda::ops::fill_bits(b, bits);
    }
    let dtype = t.dtype();
    let shape = t.shape().to_vec();
    *t = Tensor::from_f32(vec![f32::NAN; t.numel()], &shape)?.to_dtype(dtype)?;
    Ok(())
}

/// Number of NaN or infinite elements.
pub fn count_nonfinite(t: &Tensor) -> Result<usize> {
    #[cfg(feature = "cuda")]
    if let Some(b) = t.cuda_buffer() {
        return Ok(crate::cuda::ops::count_nonfinite(b, t.numel())? as usize);
    }
    Ok(t.to_vec_f32()?.iter().filter(|v| !v.is_finite()).count())
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
    #[cfg(feature = "cuda")]
    if cuda_all(OP, [k, v, &*k_cache, &*v_cache])?.is_some() {
        let slots: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
        let (kb, vb) = (k.cuda_buffer().expect("checked"), v.cuda_buffer().expect("checked"));
        let kcb = k_cache.cuda_buffer_mut().expect("checked");
        let vcb = v_cache.cuda_buffer_mut().expect("checked");
        return gpu::write_kv(kb, vb, kcb, vcb, &slots, row);
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
    #[cfg(feature = "cuda")]
    if let Some([qb, kb, vb]) = cuda_all(OP, [q, k_cache, v_cache])? {
        return Ok(Tensor::from_cuda(gpu::paged_attention(qb, kb, vb, seqs, s, q.dim(0))?, q.shape()));
    }
    let mut out = vec![0f32; q.numel()];
    cpu::attention::paged_attention(f32s(OP, q)?, f32s(OP, k_cache)?, f32s(OP, v_cache)?, seqs, s, &mut out);
    Tensor::from_f32(out, q.shape())
}
