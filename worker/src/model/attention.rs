//! A decoder block's attention: the fused q/k/v projection, RoPE, the write of this batch's keys and
//! values into the paged cache, paged attention over the cache, and the o projection (all-reduced across
//! the group: o is split by input columns).

use std::time::Instant;

use tessera_kernels::{Tensor, ops};

use super::{
    pass::{Ctx, Fused, WeightSource, optional, stack},
    shard::ShardLayout,
};
use crate::{config::ModelConfig, error::ModelError, kv_cache::KvCache, lora::Target, weights::Slice};

pub struct Attention {
    /// q, k and v one above the other: one projection.
    qkv: Fused,
    qkv_bias: Option<Tensor>,
    o: Tensor,
    /// Added by rank 0 only, before the all-reduce sums the partial outputs.
    o_bias: Option<Tensor>,
}

impl Attention {
    /// This rank's heads of layer `prefix` (`model.layers.N`).
    pub fn load(
        get: &WeightSource<'_>,
        c: &ModelConfig,
        layout: &ShardLayout,
        prefix: &str,
        first_rank: bool,
    ) -> Result<Self, ModelError> {
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let q_rows = layout.heads.start * hd..layout.heads.end * hd;
        let kv_rows = layout.kv_heads.start * hd..layout.kv_heads.end * hd;
        let p = format!("{prefix}.self_attn");
        let q = get(&format!("{p}.q_proj.weight"), &[qd, h], Slice::Rows(q_rows.clone()))?;
        let k = get(&format!("{p}.k_proj.weight"), &[kvd, h], Slice::Rows(kv_rows.clone()))?;
        let v = get(&format!("{p}.v_proj.weight"), &[kvd, h], Slice::Rows(kv_rows.clone()))?;
        let bias =
            |name: &str, rows: usize, slice| optional(get, c.qkv_bias, format!("{p}.{name}.bias"), &[rows], slice);
        let qkv_bias = match (
            bias("q_proj", qd, Slice::Rows(q_rows.clone()))?,
            bias("k_proj", kvd, Slice::Rows(kv_rows.clone()))?,
            bias("v_proj", kvd, Slice::Rows(kv_rows))?,
        ) {
            (Some(a), Some(b), Some(c)) => Some(stack(&[&a, &b, &c])?),
            _ => None,
        };
        Ok(Attention {
            qkv: Fused::new(&[&q, &k, &v])?,
            qkv_bias,
            o: get(&format!("{p}.o_proj.weight"), &[h, qd], Slice::Cols(q_rows))?,
            o_bias: optional(get, c.o_bias && first_rank, format!("{p}.o_proj.bias"), &[h], Slice::Full)?,
        })
    }

    /// Bytes of weights a decode reads.
    pub fn weight_bytes(&self) -> usize {
        self.qkv.size_in_bytes() + self.o.size_in_bytes()
    }

    /// The attention output for the normed input `h` (`[tokens, hidden]`) of layer `layer`, summed across
    /// the group. Writes the batch's keys and values into `cache` first.
    pub fn forward(
        &self,
        h: &Tensor,
        ctx: &Ctx<'_>,
        cache: &mut KvCache,
        layer: usize,
        at: &mut Instant,
    ) -> Result<Tensor, ModelError> {
        let (t, hd) = (ctx.rows, ctx.shape.head_dim);
        let (nh, nkv) = (ctx.shape.num_heads, ctx.shape.num_kv_heads);
        let mut qkv = self.qkv.linear(h, self.qkv_bias.as_ref())?;
        ctx.lap("qkv projection", at)?;
        if !ctx.lora.is_empty() {
            let targets = [(Target::Q, 0), (Target::K, nh * hd), (Target::V, (nh + nkv) * hd)];
            ctx.lora.apply(&mut qkv, h, layer, &targets)?;
            ctx.lap("qkv LoRA", at)?;
        }
        let [q, k, v]: [Tensor; 3] = ops::split_cols(&qkv, &[nh * hd, nkv * hd, nkv * hd])?
            .try_into()
            .map_err(|_| ModelError::Sharding("split of the fused qkv projection".into()))?;
        drop(qkv);
        let mut q = q.reshape(&[t, nh, hd])?;
        let mut k = k.reshape(&[t, nkv, hd])?;
        let v = v.reshape(&[t, nkv, hd])?;
        ctx.lap("qkv split", at)?;
        ops::rope_inplace(&mut q, &ctx.tokens.positions, &ctx.tokens.freqs)?;
        ops::rope_inplace(&mut k, &ctx.tokens.positions, &ctx.tokens.freqs)?;
        ctx.lap("rope", at)?;
        let (kc, vc) = cache.layer_mut(layer);
        ops::write_kv_cache(&k, &v, kc, vc, &ctx.tokens.slots)?;
        ctx.lap("kv cache write", at)?;
        let (kc, vc) = cache.layer(layer);
        let attn = ops::paged_attention(&q, kc, vc, ctx.attn_seqs, &ctx.shape)?.reshape(&[t, nh * hd])?;
        ctx.lap("attention", at)?;
        let mut o = ops::linear(&attn, &self.o, self.o_bias.as_ref())?;
        ctx.lap("o projection", at)?;
        if !ctx.lora.is_empty() {
            // This rank's columns of A: a partial delta that the all-reduce below sums with the others.
            ctx.lora.apply(&mut o, &attn, layer, &[(Target::O, 0)])?;
            ctx.lap("o LoRA", at)?;
        }
        ctx.comm.all_reduce_tensor(&mut o)?;
        ctx.lap("all-reduce", at)?;
        Ok(o)
    }
}
