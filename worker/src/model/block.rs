//! One decoder block: RMSNorm → attention → residual add, RMSNorm → MLP → residual add. A forward pass
//! runs it as two sublayers (its attention, its MLP), the points where a pausable pass may stop.
//!
//! Each residual add is fused with the norm that follows it (the block's post-attention norm, or the next
//! block's input norm), so a sublayer takes the residual stream and its own normed input and leaves the
//! next sublayer's normed input.

use std::time::Instant;

use tessera_kernels::{Tensor, ops};

use super::{
    attention::Attention,
    mlp::Mlp,
    pass::{Ctx, WeightSource},
    shard::ShardLayout,
};
use crate::{config::ModelConfig, error::ModelError, kv_cache::KvCache, weights::Slice};

/// A half of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sublayer {
    Attention,
    Mlp,
}

impl Sublayer {
    /// Sublayer `i` of a pass: block `i / 2`'s attention, then its MLP.
    pub fn nth(i: usize) -> (usize, Sublayer) {
        (i / 2, if i.is_multiple_of(2) { Sublayer::Attention } else { Sublayer::Mlp })
    }
}

pub struct Block {
    pub input_norm: Tensor,
    attention: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

impl Block {
    /// Layer `index`'s weights for this rank.
    pub fn load(
        get: &WeightSource<'_>,
        c: &ModelConfig,
        layout: &ShardLayout,
        index: usize,
        first_rank: bool,
    ) -> Result<Self, ModelError> {
        let p = format!("model.layers.{index}");
        let h = c.hidden_size;
        Ok(Block {
            input_norm: get(&format!("{p}.input_layernorm.weight"), &[h], Slice::Full)?,
            attention: Attention::load(get, c, layout, &p, first_rank)?,
            post_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h], Slice::Full)?,
            mlp: Mlp::load(get, c, layout, &p, first_rank)?,
        })
    }

    /// Bytes of weights a decode reads.
    pub fn weight_bytes(&self) -> usize {
        self.input_norm.size_in_bytes()
            + self.attention.weight_bytes()
            + self.post_norm.size_in_bytes()
            + self.mlp.weight_bytes()
    }

    /// Runs one sublayer of block `layer`: `x` is the residual stream (updated in place), `h` the
    /// sublayer's normed input. Returns the next sublayer's normed input; `next` is the block after this
    /// one (none after the last block, whose output goes to the final norm).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        sub: Sublayer,
        x: &mut Tensor,
        h: &Tensor,
        next: Option<&Block>,
        ctx: &Ctx<'_>,
        cache: &mut KvCache,
        layer: usize,
        at: &mut Instant,
    ) -> Result<Option<Tensor>, ModelError> {
        let eps = ctx.eps;
        let out = match sub {
            Sublayer::Attention => {
                let o = self.attention.forward(h, ctx, cache, layer, at)?;
                Some(ops::add_rms_norm(x, &o, &self.post_norm, eps)?)
            }
            Sublayer::Mlp => {
                let down = self.mlp.forward(h, ctx, layer, at)?;
                match next {
                    Some(next) => Some(ops::add_rms_norm(x, &down, &next.input_norm, eps)?),
                    None => {
                        ops::add_inplace(x, &down)?;
                        None
                    }
                }
            }
        };
        ctx.lap("add + norm", at)?;
        Ok(out)
    }
}
