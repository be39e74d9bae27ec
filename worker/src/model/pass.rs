//! What the sublayers of one forward pass share: where the weights come from when a model is built, and,
//! while it runs, the batch's per-token inputs, its attention layout, the group's collective and the op
//! profiler.

use std::time::Instant;

use tessera_kernels::{
    Device, Tensor,
    ops::{self, AttentionSeq, AttentionShape},
};

use super::profile::OpProfile;
use crate::{collective::Collective, error::ModelError, lora::LoraBatch, weights::Slice};

/// Where a model's weights come from: `(name, full shape, this rank's slice)` → the slice, on the device.
pub type WeightSource<'a> = dyn Fn(&str, &[usize], Slice) -> Result<Tensor, ModelError> + 'a;

/// An optional weight (a bias): read only when `present`.
pub fn optional(
    get: &WeightSource<'_>,
    present: bool,
    name: String,
    shape: &[usize],
    slice: Slice,
) -> Result<Option<Tensor>, ModelError> {
    if present { get(&name, shape, slice).map(Some) } else { Ok(None) }
}

/// The projections' weights (or biases) one above the other: one fused projection (one GEMM, one launch,
/// one pass over the activations instead of several).
pub fn stack(parts: &[&Tensor]) -> Result<Tensor, ModelError> {
    Ok(Tensor::concat_rows(parts)?)
}

/// Projections of one input (q/k/v, gate/up) as one matrix, or, when their weights are in different formats
/// (a `Q4_K_M` file keeps some layers' v in Q6_K beside q and k in Q4_K), as one matrix per run of
/// neighbours in the same format (q and k stacked, v apart) whose outputs are put side by side: the same
/// `[tokens, Σ outputs]` either way.
pub enum Fused {
    One(Tensor),
    Parts(Vec<Tensor>),
}

impl Fused {
    pub fn new(parts: &[&Tensor]) -> Result<Self, ModelError> {
        let mut runs = parts.chunk_by(|a, b| a.dtype() == b.dtype()).map(stack).collect::<Result<Vec<_>, _>>()?;
        if runs.len() == 1 { Ok(Fused::One(runs.remove(0))) } else { Ok(Fused::Parts(runs)) }
    }

    /// Bytes of the weights.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Fused::One(w) => w.size_in_bytes(),
            Fused::Parts(ws) => ws.iter().map(Tensor::size_in_bytes).sum(),
        }
    }

    /// `x · wᵀ + bias` for the stacked `w` (`bias` covering all outputs).
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, ModelError> {
        let ws = match self {
            Fused::One(w) => return Ok(ops::linear(x, w, bias)?),
            Fused::Parts(ws) => ws,
        };
        let mut outs = Vec::with_capacity(ws.len());
        let mut row0 = 0;
        for w in ws {
            let rows = w.dim(0);
            let b = bias.map(|b| b.narrow_rows(row0, row0 + rows)).transpose()?;
            outs.push(ops::linear(x, w, b.as_ref())?);
            row0 += rows;
        }
        Ok(ops::concat_cols(&outs.iter().collect::<Vec<_>>())?)
    }
}

/// Per token of the batch: its position, its cache slot, and its RoPE frequencies (one table shared by
/// every token, or one per token when the scaling depends on the sequence's length).
pub struct TokenInputs {
    pub positions: Vec<u32>,
    pub slots: Vec<usize>,
    pub freqs: Vec<f32>,
}

/// One pass's shared inputs, lent to each sublayer.
pub struct Ctx<'a> {
    pub tokens: &'a TokenInputs,
    /// Each sequence's rows, first position and block table.
    pub attn_seqs: &'a [AttentionSeq<'a>],
    pub shape: AttentionShape,
    /// RMSNorm's epsilon.
    pub eps: f32,
    /// Tokens in the batch.
    pub rows: usize,
    pub comm: &'a dyn Collective,
    /// Which rows use which LoRA adapter (empty: the base model for every row).
    pub lora: &'a LoraBatch<'a>,
    pub device: Device,
    pub profile: &'a OpProfile,
}

impl Ctx<'_> {
    /// Records an op's device time when profiling.
    pub fn lap(&self, name: &'static str, at: &mut Instant) -> Result<(), ModelError> {
        self.profile.lap(self.device, name, at)
    }
}
