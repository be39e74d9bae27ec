//! NCCL between the GPUs of one tensor-parallel group: in-place all-reduce of device tensors and an
//! all-gather, on the GPU's one stream (so they are ordered with the kernels around them).
//!
//! NCCL is loaded at run time like the rest of CUDA, under the name `libnccl.so` (cudarc's lookup; the
//! pip and Debian packages ship `libnccl.so.2`, so a `libnccl.so` link must be on the library path). Its
//! absence is an error the caller turns into the TCP fallback, never a panic.

use std::sync::{Arc, Mutex};

use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{DeviceData, Gpu};
use crate::{device::Device, error::KernelError, error::Result, tensor::Tensor};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// Whether NCCL can be loaded in this process.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn unavailable(device: Device, why: impl Into<String>) -> KernelError {
    KernelError::Unavailable(device, format!("NCCL: {}", why.into()))
}

/// A fresh unique id for a new group (made by the process that will be rank 0, which then hosts NCCL's
/// bootstrap for it).
pub fn new_unique_id(device: Device) -> Result<Vec<u8>> {
    if !nccl_available() {
        return Err(unavailable(device, "libnccl.so cannot be loaded"));
    }
    let id = Id::new().map_err(|e| unavailable(device, format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// One rank's NCCL communicator.
pub struct NcclComm {
    gpu: Arc<Gpu>,
    // NCCL calls on one communicator must not run concurrently; the engine is single-threaded per step,
    // the lock makes that a guarantee.
    comm: Mutex<Comm>,
    pub rank: usize,
    pub world: usize,
}

// SAFETY: the communicator handle is only used under the mutex, from one thread at a time, which NCCL
// allows; the stream and context it refers to are themselves Send + Sync.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins the group `id` as `rank` of `world` on `device`; blocks until every rank has joined.
    pub fn new(device: Device, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        let Device::Cuda(ordinal) = device else {
            return Err(KernelError::Device { op: "NCCL", device });
        };
        if !nccl_available() {
            return Err(unavailable(device, "libnccl.so cannot be loaded"));
        }
        let internal: [std::ffi::c_char; ID_BYTES] = id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| unavailable(device, format!("unique id of {} bytes, expected {ID_BYTES}", id.len())))?;
        let gpu = super::gpu(ordinal)?;
        gpu.ctx.bind_to_thread().map_err(|e| gpu.err("bind", e))?;
        let comm = Comm::from_rank(gpu.stream.clone(), rank, world, Id::uninit(internal))
            .map_err(|e| unavailable(device, format!("ncclCommInitRank (rank {rank} of {world}): {e:?}")))?;
        Ok(NcclComm { gpu, comm: Mutex::new(comm), rank, world })
    }

    /// The GPU this rank computes on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.gpu.ordinal)
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, Comm> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sums `t` over the group, in place (bf16 or f32, on this communicator's GPU).
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let n = t.numel();
        let gpu = self.gpu.clone();
        let b = t.cuda_buffer_mut().ok_or(KernelError::Device { op: "NCCL all-reduce", device: Device::Cpu })?;
        let data = Arc::get_mut(&mut b.data).ok_or_else(|| gpu.err("NCCL all-reduce", "tensor memory is shared"))?;
        let comm = self.comm();
        let r = match data {
            DeviceData::BF16(s) => comm.all_reduce_in_place(&mut s.slice_mut(0..n), &ReduceOp::Sum),
            DeviceData::F32(s) => comm.all_reduce_in_place(&mut s.slice_mut(0..n), &ReduceOp::Sum),
            DeviceData::Quant(..) => return Err(gpu.err("NCCL all-reduce", "a tensor in a block format")),
        };
        r.map(|_| ()).map_err(|e| gpu.err("ncclAllReduce", format!("{e:?}")))
    }

    /// Every rank's `local` (all of the same length), concatenated in rank order, on every rank.
    pub fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let g = &self.gpu;
        let src = g.stream.clone_htod(local).map_err(|e| g.err("copy", e))?;
        let mut dst = g.stream.alloc_zeros::<f32>(local.len() * self.world).map_err(|e| g.err("alloc", e))?;
        self.comm().all_gather(&src, &mut dst).map_err(|e| g.err("ncclAllGather", format!("{e:?}")))?;
        g.stream.clone_dtoh(&dst).map_err(|e| g.err("copy to host", e))
    }
}
