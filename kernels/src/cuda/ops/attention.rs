//! Paged attention over the KV cache for a mixed batch. Each sequence goes to one of three paths: a
//! single-token decode to the decode kernel, a long prefill chunk to the dense cuBLAS path
//! ([`super::dense_attention`]), any other prefill chunk to the tiled flash-style prefill kernel. The
//! launches write disjoint rows of one output.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{dense_attention::dense_prefill, launch::alloc_bf16};
use crate::{
    cpu::attention::{AttentionSeq, AttentionShape},
    cuda::{Buffer, DeviceData, Gpu},
    error::KernelError,
    error::Result,
};

/// Rows of queries one prefill attention block handles (`PF_WARPS` in attention.cu).
const PREFILL_ROWS: usize = 8;
/// Keys per shared-memory tile of the prefill kernel (`PF_KEYS`).
const PREFILL_KEYS: usize = 32;
/// Keys scored per pass of the decode kernel (`DEC_CHUNK`).
const DECODE_CHUNK: usize = 2048;
/// Eight warps: their partial sums (8 × head_dim ≤ 2048 floats) fit in the score buffer.
const DECODE_THREADS: u32 = 256;
/// Prefill chunks at least this long go through the dense path (two cuBLAS GEMMs around a softmax)...
const DENSE_MIN_ROWS: usize = 32;
/// ...unless their score matrix (heads × rows × keys) is larger than this many elements (6 bytes each).
const DENSE_MAX_SCORES: usize = 1 << 27;

/// Paged attention for a mixed batch: single-token sequences go to the decode kernel, longer ones to the
/// tiled prefill kernel or the dense path; the launches write disjoint rows of the output.
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
    let plan = Plan::new(seqs, s, rows);
    let args = KernelArgs::upload(g, &plan, (q, kc, vc), s)?;
    if !plan.decode_rows.is_empty() {
        decode(g, &args, &plan.decode_rows, s, &mut out)?;
    }
    if !plan.tiles.is_empty() {
        prefill_tiles(g, &args, &plan.tiles, s, &mut out)?;
    }
    for seq in &plan.dense {
        dense_prefill(g, args.q, args.k, args.v, &mut out, seq, s)?;
    }
    Ok(Buffer::new(g.clone(), DeviceData::BF16(out)))
}

/// Which path each sequence of the batch takes, and the per-row metadata the two paged kernels read.
struct Plan<'a> {
    /// Position of each query row.
    row_pos: Vec<u32>,
    /// Sequence (index into `seqs`) of each query row.
    row_seq: Vec<u32>,
    /// Offset of each sequence's block table in `tables`.
    seq_bt: Vec<u32>,
    /// Every sequence's block table, one after another.
    tables: Vec<u32>,
    /// The query row of each single-token sequence.
    decode_rows: Vec<u32>,
    /// `(first row, row count)` pairs, one per block of the tiled prefill kernel.
    tiles: Vec<u32>,
    dense: Vec<AttentionSeq<'a>>,
}

impl<'a> Plan<'a> {
    fn new(seqs: &[AttentionSeq<'a>], s: &AttentionShape, rows: usize) -> Self {
        let mut plan = Plan {
            row_pos: vec![0u32; rows],
            row_seq: vec![0u32; rows],
            seq_bt: Vec::with_capacity(seqs.len()),
            tables: Vec::new(),
            decode_rows: Vec::new(),
            tiles: Vec::new(),
            dense: Vec::new(),
        };
        for (i, seq) in seqs.iter().enumerate() {
            plan.seq_bt.push(plan.tables.len() as u32);
            plan.tables.extend_from_slice(seq.block_table);
            for j in 0..seq.q_len {
                plan.row_pos[seq.q_start + j] = (seq.pos0 + j) as u32;
                plan.row_seq[seq.q_start + j] = i as u32;
            }
            if seq.q_len == 1 {
                plan.decode_rows.push(seq.q_start as u32);
            } else if seq.q_len >= DENSE_MIN_ROWS
                && s.num_heads * seq.q_len * (seq.pos0 + seq.q_len) <= DENSE_MAX_SCORES
            {
                plan.dense.push(*seq);
            } else {
                for r0 in (0..seq.q_len).step_by(PREFILL_ROWS) {
                    plan.tiles.push((seq.q_start + r0) as u32);
                    plan.tiles.push(PREFILL_ROWS.min(seq.q_len - r0) as u32);
                }
            }
        }
        plan
    }
}

/// The arguments the decode and tiled prefill kernels share, in their parameter order after the output and
/// the row list: the metadata on the device, then the shape.
struct KernelArgs<'a> {
    q: &'a CudaSlice<bf16>,
    k: &'a CudaSlice<bf16>,
    v: &'a CudaSlice<bf16>,
    pos: Arc<CudaSlice<u32>>,
    seq: Arc<CudaSlice<u32>>,
    bt_off: Arc<CudaSlice<u32>>,
    bt: Arc<CudaSlice<u32>>,
    /// Query heads, KV heads, head size, block size.
    dims: (i32, i32, i32, i32),
    scale: f32,
    /// The sliding window in positions, 0 for none.
    window: i32,
}

impl<'a> KernelArgs<'a> {
    fn upload(
        g: &Gpu,
        plan: &Plan<'_>,
        (q, kc, vc): (&'a Buffer, &'a Buffer, &'a Buffer),
        s: &AttentionShape,
    ) -> Result<Self> {
        const OP: &str = "paged_attention";
        let pos = g.upload_cached("attn.pos", &plan.row_pos)?;
        let seq = g.upload_cached("attn.seq", &plan.row_seq)?;
        let bt_off = g.upload_cached("attn.bt_off", &plan.seq_bt)?;
        let bt = g.upload_cached("attn.tables", &plan.tables)?;
        Ok(KernelArgs {
            q: q.bf16(OP)?,
            k: kc.bf16(OP)?,
            v: vc.bf16(OP)?,
            pos,
            seq,
            bt_off,
            bt,
            dims: (s.num_heads as i32, s.num_kv_heads as i32, s.head_dim as i32, s.block_size as i32),
            scale: s.scale,
            window: s.sliding_window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
        })
    }
}

/// One block per (single-token sequence, head); the shared memory holds the query and a chunk of scores.
fn decode(
    g: &Gpu,
    args: &KernelArgs<'_>,
    decode_rows: &[u32],
    s: &AttentionShape,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let dev_rows = g.upload_cached("attn.decode_rows", decode_rows)?;
    let cfg = LaunchConfig {
        grid_dim: (decode_rows.len() as u32, s.num_heads as u32, 1),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: ((s.head_dim + 2 * DECODE_CHUNK) * 4) as u32,
    };
    launch_paged(g, ("attention_decode_bf16", "attention_decode"), args, out, &dev_rows, cfg)
}

/// One block per (tile of up to `PREFILL_ROWS` query rows, head); the shared memory holds the tile's queries
/// and scores and two tiles of keys and values.
fn prefill_tiles(
    g: &Gpu,
    args: &KernelArgs<'_>,
    tiles: &[u32],
    s: &AttentionShape,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let dev_tiles = g.upload_cached("attn.tiles", tiles)?;
    let smem = PREFILL_ROWS * s.head_dim * 4 + PREFILL_KEYS * 4 + 2 * PREFILL_KEYS * (s.head_dim + 2) * 2;
    let cfg = LaunchConfig {
        grid_dim: ((tiles.len() / 2) as u32, s.num_heads as u32, 1),
        block_dim: ((PREFILL_ROWS * 32) as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    launch_paged(g, ("attention_prefill_bf16", "attention_prefill"), args, out, &dev_tiles, cfg)
}

/// Launches `kernel` (named `what` in errors); `rows` is the kernel's own work list (decode rows or tiles).
fn launch_paged(
    g: &Gpu,
    (kernel, what): (&'static str, &str),
    a: &KernelArgs<'_>,
    out: &mut CudaSlice<bf16>,
    rows: &CudaSlice<u32>,
    cfg: LaunchConfig,
) -> Result<()> {
    let f = g.kernel(kernel)?;
    let (nh, nkv, hd, bs) = a.dims;
    // SAFETY: rows, positions and block tables were validated by `ops::paged_attention`.
    unsafe {
        g.stream
            .launch_builder(f)
            .arg(a.q)
            .arg(a.k)
            .arg(a.v)
            .arg(out)
            .arg(rows)
            .arg(&*a.pos)
            .arg(&*a.seq)
            .arg(&*a.bt_off)
            .arg(&*a.bt)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&bs)
            .arg(&a.scale)
            .arg(&a.window)
            .launch(cfg)
    }
    .map_err(|e| g.err(what, e))?;
    Ok(())
}
