//! What `tessera bench` lends the benchmarks (`tessera_bench::Host`): the built-in model and this binary's
//! ways of starting a model, in this process or on local worker processes.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tessera_bench::{Host as BenchHost, Running};

use crate::{
    default_model,
    runner::{ModelArgs, Runner},
};

/// The `tessera` binary as the benchmarks' host.
pub struct Host;

impl Host {
    fn running(runner: Runner) -> Running {
        let (backend, cluster) = runner.into_parts();
        Running { backend, keep_alive: Box::new(cluster) }
    }
}

impl BenchHost for Host {
    fn default_model(&self) -> Result<(String, PathBuf)> {
        Ok((default_model::NAME.to_string(), default_model::path()?))
    }

    fn in_process(&self, dir: &Path, kv_cache_mib: usize) -> Result<Running> {
        Ok(Self::running(Runner::in_process(dir, kv_cache_mib)?))
    }

    fn workers(&self, dir: &Path, tp: usize, kv_cache_mib: usize) -> Result<Running> {
        let args = ModelArgs {
            model: Some(dir.to_path_buf()),
            kv_cache_mib,
            tp,
            device: "cpu".into(),
            quantize: None,
            worker_args: vec![],
        };
        Ok(Self::running(Runner::start_workers(&args, dir)?))
    }
}
