//! The KV cache pool of one worker: per layer, a key and a value tensor of fixed-size blocks,
//! `[num_blocks, block_size, local_kv_heads, head_dim]`, on the model's device.
//!
//! The pool does not know which sequence owns which block: block tables come with every step from the
//! coordinator's block manager, and this side only bounds-checks them.

use tessera_kernels::{DType, Device, Tensor};

use crate::{error::ModelError, model::Model};

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl KvCache {
    /// Bytes one block takes across all layers (keys and values) for `model`'s shard.
    pub fn bytes_per_block(model: &Model, block_size: usize) -> usize {
        let c = &model.config;
        2 * c.num_layers * block_size * model.local_kv_heads() * c.head_dim * Self::dtype(model).size()
    }

    /// f32 on the CPU, bf16 on CUDA (as the activations are).
    fn dtype(model: &Model) -> DType {
        if model.device == Device::Cpu { DType::F32 } else { DType::BF16 }
    }

    /// A pool of `num_blocks` blocks for `model`'s shard, on the model's device.
    pub fn new(model: &Model, num_blocks: usize, block_size: usize) -> Result<Self, ModelError> {
        if block_size == 0 || num_blocks == 0 {
            return Err(ModelError::Sharding(format!(
                "KV cache needs at least one block of at least one token (got {num_blocks} × {block_size})"
            )));
        }
        let shape = [num_blocks, block_size, model.local_kv_heads(), model.config.head_dim];
        let layers = model.config.num_layers;
        let mk = || Tensor::zeros(&shape, Self::dtype(model), model.device);
        Ok(KvCache {
            block_size,
            num_blocks,
            k: (0..layers).map(|_| mk()).collect::<Result<_, _>>()?,
            v: (0..layers).map(|_| mk()).collect::<Result<_, _>>()?,
        })
    }

    /// As many blocks as fit in `bytes` (at least one).
    pub fn with_budget(model: &Model, bytes: usize, block_size: usize) -> Result<Self, ModelError> {
        let per = Self::bytes_per_block(model, block_size).max(1);
        Self::new(model, (bytes / per).max(1), block_size)
    }

    pub fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        (&self.k[i], &self.v[i])
    }

    pub fn layer_mut(&mut self, i: usize) -> (&mut Tensor, &mut Tensor) {
        (&mut self.k[i], &mut self.v[i])
    }
}
