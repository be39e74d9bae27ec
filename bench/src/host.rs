//! What the benchmarks need from the binary that runs them: its built-in model, and its ways of starting a
//! model in this process or on local worker processes. The `tessera` binary implements [`Host`]; the
//! benchmarks stay independent of its wiring.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tessera_coordinator::engine::backend::Backend;

/// A started model: the backend its steps run on, and what must outlive it (worker processes).
pub struct Running {
    pub backend: Box<dyn Backend>,
    /// Dropped after the backend (field order): a group's connections close before its workers stop.
    pub keep_alive: Box<dyn Send>,
}

pub trait Host {
    /// The built-in model: its name and a directory holding it.
    fn default_model(&self) -> Result<(String, PathBuf)>;
    /// An engine in this process, on the CPU, with `kv_cache_mib` of KV cache.
    fn in_process(&self, dir: &Path, kv_cache_mib: usize) -> Result<Running>;
    /// `tp` worker processes on loopback, on the CPU, as one tensor-parallel group.
    fn workers(&self, dir: &Path, tp: usize, kv_cache_mib: usize) -> Result<Running>;
}
