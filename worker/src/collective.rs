//! Collectives between the ranks of one tensor-parallel group, behind one trait.
//!
//! The forward pass calls [`Collective::all_reduce_sum`] after each row-parallel projection and
//! [`Collective::all_gather`] on the vocab-parallel logits. [`Single`] is the group of one. The TCP ring
//! for CPU worker processes and NCCL for GPUs implement the same trait.

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
