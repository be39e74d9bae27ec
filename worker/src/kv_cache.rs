//! The KV cache pool of one worker: per layer, a key and a value tensor of fixed-size blocks,
//! `[num_blocks, block_size, local_kv_heads, head_dim]`, on the model's device.
//!
//! The pool does not know which sequence owns which block: block tables come with every step from the
//! coordinator's block manager, and this side only bounds-checks them.

use tessera_kernels::{DType, Device, Tensor};

use crate::error::ModelError;

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// What a pool's tensors look like: one shard's layers and KV heads, on its device (the model says:
/// `Model::kv_geometry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    pub layers: usize,
    /// KV heads of this rank's shard.
    pub kv_heads: usize,
    pub head_dim: usize,
    pub device: Device,
}

impl KvGeometry {
    /// f32 on the CPU, bf16 on CUDA (as the activations are).
    fn dtype(&self) -> DType {
        if self.device == Device::Cpu { DType::F32 } else { DType::BF16 }
    }
}

pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl KvCache {
    /// Bytes one block takes across all layers (keys and values).
    pub fn bytes_per_block(g: &KvGeometry, block_size: usize) -> usize {
        [2, g.layers, block_size, g.kv_heads, g.head_dim, g.dtype().bytes_for(1)]
            .into_iter()
            .fold(1, usize::saturating_mul)
    }

    /// A pool of `num_blocks` blocks of `g`'s shape, on its device.
    pub fn new(g: &KvGeometry, num_blocks: usize, block_size: usize) -> Result<Self, ModelError> {
        if block_size == 0 || num_blocks == 0 {
            return Err(ModelError::Sharding(format!(
                "KV cache needs at least one block of at least one token (got {num_blocks} × {block_size})"
            )));
        }
        let shape = [num_blocks, block_size, g.kv_heads, g.head_dim];
        let layers = g.layers;
        let mk = || Tensor::zeros(&shape, g.dtype(), g.device);
        Ok(KvCache {
            block_size,
            num_blocks,
            k: (0..layers).map(|_| mk()).collect::<Result<_, _>>()?,
            v: (0..layers).map(|_| mk()).collect::<Result<_, _>>()?,
        })
    }

    /// As many blocks as fit in `bytes` (at least one).
    pub fn with_budget(g: &KvGeometry, bytes: usize, block_size: usize) -> Result<Self, ModelError> {
        let per = Self::bytes_per_block(g, block_size).max(1);
        Self::new(g, (bytes / per).max(1), block_size)
    }

    pub fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        (&self.k[i], &self.v[i])
    }

    pub fn layer_mut(&mut self, i: usize) -> (&mut Tensor, &mut Tensor) {
        (&mut self.k[i], &mut self.v[i])
    }
}
