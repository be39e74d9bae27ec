//! This process's place in its tensor-parallel group, and which heads, KV heads, features and vocabulary
//! rows that gives it (Megatron-style: q/k/v and gate/up split by output rows, o and down by input columns,
//! `lm_head` by vocabulary).

use std::ops::Range;

use crate::{config::ModelConfig, error::ModelError};

/// This process's place in its tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };
}

/// Which heads, KV heads, features and vocabulary rows one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub heads: Range<usize>,
    pub kv_heads: Range<usize>,
    pub intermediate: Range<usize>,
    pub vocab: Range<usize>,
}

impl ShardLayout {
    /// Splits `cfg` for `shard`, refusing splits that do not divide evenly or break the GQA grouping.
    pub fn new(cfg: &ModelConfig, shard: Shard) -> Result<Self, ModelError> {
        let Shard { rank, world } = shard;
        if world == 0 || rank >= world {
            return Err(ModelError::Sharding(format!("rank {rank} is not in a group of {world}")));
        }
        if !cfg.num_heads.is_multiple_of(world) {
            return Err(ModelError::Sharding(format!(
                "tp = {world} does not divide num_attention_heads = {}",
                cfg.num_heads
            )));
        }
        if !cfg.intermediate_size.is_multiple_of(world) {
            return Err(ModelError::Sharding(format!(
                "tp = {world} does not divide intermediate_size = {}",
                cfg.intermediate_size
            )));
        }
        let per = cfg.num_heads / world;
        let group = cfg.num_heads / cfg.num_kv_heads;
        let heads = rank * per..(rank + 1) * per;
        // The KV heads this rank's query heads read: an even split when tp divides them, otherwise the
        // shared KV head is replicated on every rank that needs it.
        let kv_heads = heads.start / group..(heads.end - 1) / group + 1;
        let local_group = per / kv_heads.len().max(1);
        let consistent = per.is_multiple_of(kv_heads.len())
            && heads.clone().all(|h| h / group - kv_heads.start == (h - heads.start) / local_group);
        if !consistent {
            return Err(ModelError::Sharding(format!(
                "tp = {world} splits the {} query heads across the {} KV-head groups unevenly",
                cfg.num_heads, cfg.num_kv_heads
            )));
        }
        let inter = cfg.intermediate_size / world;
        let v = cfg.vocab_size.div_ceil(world);
        let vocab = (rank * v).min(cfg.vocab_size)..((rank + 1) * v).min(cfg.vocab_size);
        Ok(ShardLayout { heads, kv_heads, intermediate: rank * inter..(rank + 1) * inter, vocab })
    }
}
