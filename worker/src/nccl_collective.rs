//! The collective of GPU workers: NCCL, summing device tensors where they are.
//!
//! Rank 0 made the group's unique id (`InfoRequest.create_nccl_id`); the coordinator hands it to every
//! rank in `LoadModel`, and each joins with it. The coordinator only chooses NCCL when every rank has its
//! own GPU (NCCL refuses two ranks on one device); otherwise the group uses the TCP ring.

use std::time::Instant;

use tessera_kernels::{Device, Tensor, cuda::nccl::NcclComm};

use crate::collective::{Collective, CollectiveError};

pub struct NcclCollective {
    comm: NcclComm,
    busy: std::sync::Mutex<f64>,
}

impl NcclCollective {
    /// Joins the group (blocks until every rank has joined).
    pub fn new(device: Device, rank: usize, world: usize, id: &[u8]) -> Result<Self, CollectiveError> {
        let comm = NcclComm::new(device, rank, world, id).map_err(|e| CollectiveError {
            op: "nccl_init",
            rank,
            world,
            message: e.to_string(),
        })?;
        Ok(NcclCollective { comm, busy: std::sync::Mutex::new(0.0) })
    }

    fn err(&self, op: &'static str, e: tessera_kernels::KernelError) -> CollectiveError {
        CollectiveError { op, rank: self.comm.rank, world: self.comm.world, message: e.to_string() }
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) += t.elapsed().as_secs_f64();
        out
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank
    }

    fn world_size(&self) -> usize {
        self.comm.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let n = buf.len();
        let mut t = Tensor::from_f32(buf.to_vec(), &[n])
            .and_then(|t| t.to_device(self.comm_device()))
            .map_err(|e| self.err("all_reduce", e))?;
        self.all_reduce_tensor(&mut t)?;
        buf.copy_from_slice(&t.to_vec_f32().map_err(|e| self.err("all_reduce", e))?);
        Ok(())
    }

    fn all_reduce_tensor(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.timed(|| self.comm.all_reduce_sum(t)).map_err(|e| self.err("all_reduce", e))
    }

    /// Parts may differ in length (the last rank's vocabulary slice is shorter): lengths are gathered
    /// first, then every part padded to the longest.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, CollectiveError> {
        self.timed(|| {
            let lens = self.comm.all_gather(&[local.len() as f32]).map_err(|e| self.err("all_gather", e))?;
            let max = lens.iter().fold(0f32, |a, &b| a.max(b)) as usize;
            let mut padded = local.to_vec();
            padded.resize(max, 0.0);
            let all = self.comm.all_gather(&padded).map_err(|e| self.err("all_gather", e))?;
            Ok(all.chunks(max.max(1)).zip(&lens).map(|(c, &n)| c[..n as usize].to_vec()).collect())
        })
    }

    fn take_seconds(&self) -> f64 {
        std::mem::take(&mut *self.busy.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl NcclCollective {
    fn comm_device(&self) -> Device {
        self.comm.device()
    }
}
