//! What the sublayers of one forward pass share: where the weights come from when a model is built, and,
//! while it runs, the batch's per-token inputs, its attention layout, the group's collective and the op
//! profiler.

use std::time::Instant;

use tessera_kernels::{
    Device, Tensor,
    ops::{AttentionSeq, AttentionShape},
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
