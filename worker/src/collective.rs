//! Collectives between the ranks of one tensor-parallel group, behind one trait.
//!
//! The forward pass calls [`Collective::all_reduce_tensor`] after each row-parallel projection and
//! [`Collective::all_gather`] on the vocab-parallel logits. [`Single`] is the group of one. The TCP ring
//! for CPU worker processes and NCCL for GPUs implement the same trait.

use tessera_kernels::{DType, Device, Tensor};

/// A collective failed: a peer died, timed out or sent something inconsistent. The group is unusable.
#[derive(Debug, thiserror::Error)]
#[error("collective {op} failed (rank {rank} of {world}): {message}")]
pub struct CollectiveError {
    pub op: &'static str,
    pub rank: usize,
    pub world: usize,
    pub message: String,
}

pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, left in `buf` on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every rank's `local` (lengths may differ), in rank order, on every rank.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, CollectiveError>;
    /// Element-wise sum of a tensor over all ranks, in place, wherever it lives. The default moves a device
    /// tensor through the host ([`Collective::all_reduce_sum`]); NCCL sums on the GPUs.
    fn all_reduce_tensor(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let err = |e: tessera_kernels::KernelError| CollectiveError {
            op: "all_reduce",
            rank: self.rank(),
            world: self.world_size(),
            message: e.to_string(),
        };
        if t.device() == Device::Cpu && t.dtype() == DType::F32 {
            return self.all_reduce_sum(t.as_f32_mut().map_err(err)?);
        }
        let mut host = t.to_vec_f32().map_err(err)?;
        self.all_reduce_sum(&mut host)?;
        *t = Tensor::from_f32(host, t.shape())
            .and_then(|h| h.to_dtype(t.dtype()))
            .and_then(|h| h.to_device(t.device()))
            .map_err(err)?;
        Ok(())
    }
    /// Seconds spent in collectives since the last call (for per-step metrics).
    fn take_seconds(&self) -> f64 {
        0.0
    }
}

/// The group of one: nothing to exchange.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, CollectiveError> {
        Ok(vec![local.to_vec()])
    }
}
