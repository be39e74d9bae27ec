//! A decoder block's MLP: the fused gate/up projection, SiLU(gate)·up, and the down projection
//! (all-reduced across the group: down is split by input columns).

use std::time::Instant;

use tessera_kernels::{Tensor, ops};

use super::{
    pass::{Ctx, Fused, WeightSource, optional, stack},
    shard::ShardLayout,
};
use crate::{config::ModelConfig, error::ModelError, lora::Target, weights::Slice};

pub struct Mlp {
    /// gate and up one above the other: one projection.
    gate_up: Fused,
    gate_up_bias: Option<Tensor>,
    down: Tensor,
    /// Added by rank 0 only, before the all-reduce sums the partial outputs.
    down_bias: Option<Tensor>,
}

impl Mlp {
    /// This rank's intermediate features of layer `prefix` (`model.layers.N`).
    pub fn load(
        get: &WeightSource<'_>,
        c: &ModelConfig,
        layout: &ShardLayout,
        prefix: &str,
        first_rank: bool,
    ) -> Result<Self, ModelError> {
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let p = format!("{prefix}.mlp");
        let rows = Slice::Rows(layout.intermediate.clone());
        let gate = get(&format!("{p}.gate_proj.weight"), &[inter, h], rows.clone())?;
        let up = get(&format!("{p}.up_proj.weight"), &[inter, h], rows.clone())?;
        let gate_up_bias = match (
            optional(get, c.mlp_bias, format!("{p}.gate_proj.bias"), &[inter], rows.clone())?,
            optional(get, c.mlp_bias, format!("{p}.up_proj.bias"), &[inter], rows)?,
        ) {
            (Some(a), Some(b)) => Some(stack(&[&a, &b])?),
            _ => None,
        };
        let cols = Slice::Cols(layout.intermediate.clone());
        Ok(Mlp {
            gate_up: Fused::new(&[&gate, &up])?,
            gate_up_bias,
            down: get(&format!("{p}.down_proj.weight"), &[h, inter], cols)?,
            down_bias: optional(get, c.mlp_bias && first_rank, format!("{p}.down_proj.bias"), &[h], Slice::Full)?,
        })
    }

    /// Bytes of weights a decode reads.
    pub fn weight_bytes(&self) -> usize {
        self.gate_up.size_in_bytes() + self.down.size_in_bytes()
    }

    /// The MLP's output for the normed input `h`, summed across the group.
    pub fn forward(&self, h: &Tensor, ctx: &Ctx<'_>, layer: usize, at: &mut Instant) -> Result<Tensor, ModelError> {
        let mut gate_up = self.gate_up.linear(h, self.gate_up_bias.as_ref())?;
        ctx.lap("gate/up projection", at)?;
        if !ctx.lora.is_empty() {
            let inter = gate_up.dim(1) / 2;
            ctx.lora.apply(&mut gate_up, h, layer, &[(Target::Gate, 0), (Target::Up, inter)])?;
            ctx.lap("gate/up LoRA", at)?;
        }
        let act = ops::silu_mul_packed(&gate_up)?;
        drop(gate_up);
        ctx.lap("silu * up", at)?;
        let mut down = ops::linear(&act, &self.down, self.down_bias.as_ref())?;
        ctx.lap("down projection", at)?;
        if !ctx.lora.is_empty() {
            // A partial delta, as for o: the all-reduce completes it.
            ctx.lora.apply(&mut down, &act, layer, &[(Target::Down, 0)])?;
            ctx.lap("down LoRA", at)?;
        }
        ctx.comm.all_reduce_tensor(&mut down)?;
        ctx.lap("all-reduce", at)?;
        Ok(down)
    }
}
