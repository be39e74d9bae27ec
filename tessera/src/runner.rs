//! Where a command's steps run: an engine in this process (tp = 1), or a local cluster of `tp` worker
//! processes of this same binary on loopback, connected as one tensor-parallel group. `generate`, `serve`
//! and `bench cluster` start their model through [`Runner`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_coordinator::engine::{
    backend::Backend,
    group::{GroupClient, GroupTimeouts},
};
use tessera_worker::{Engine, Model, Shard, collective::Single, kv_cache::KvCache, quantize::QuantizeTo};

use crate::{default_model, local_backend::LocalBackend, local_cluster::LocalCluster};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory, or a GGUF file (default: the built-in stories260K).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// KV cache budget in MiB (per worker).
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub kv_cache_mib: usize,
    /// Tensor-parallel degree: with N > 1, start N worker processes on loopback and split the model
    /// across them.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub tp: usize,
    /// Compute device: `cpu`, or `cuda:N` (bf16 on the GPU; with --tp every worker uses this GPU, so the
    /// group falls back to TCP collectives).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Quantize a model directory's matrices as they load: q8_0, q4_0 or q4_k (llama.cpp's block formats;
    /// the output projection takes Q6_K for q4_0 and q4_k); on a GPU the blocks are uploaded. GGUF files
    /// run as they are.
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<QuantizeTo>,
    /// Arguments every local worker gets (log format, OTLP export), from the global options.
    #[arg(skip)]
    pub worker_args: Vec<String>,
}

impl ModelArgs {
    /// Whether steps run on this machine's CPU: with `--tp` > 1 its worker processes then take every core
    /// (`cores / tp` threads each), and the engine loop's planning has none to overlap them on.
    pub fn computes_on_cpu(&self) -> bool {
        self.device.parse::<tessera_kernels::Device>().is_ok_and(|d| d == tessera_kernels::Device::Cpu)
    }

    pub fn dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => default_model::path(),
        }
    }
}

/// `--kv-cache-mib` in bytes; a value past what a machine could hold is an error rather than a wrap.
pub fn mib_to_bytes(mib: usize) -> Result<usize> {
    mib.checked_mul(1 << 20)
        .with_context(|| format!("--kv-cache-mib {mib} is more memory than this machine can address"))
}

/// Loads a model (directory or GGUF file) into an in-process engine on `device` with `kv_cache_mib` of KV cache,
/// its matrices quantized to `quantize` if given.
pub fn load_local(
    dir: &Path,
    kv_cache_mib: usize,
    device: tessera_kernels::Device,
    quantize: Option<QuantizeTo>,
) -> Result<LocalBackend> {
    let model = Model::load_with(dir, Shard::WHOLE, device, quantize)
        .with_context(|| format!("loading model {}", dir.display()))?;
    let cache = KvCache::with_budget(
        &model.kv_geometry(),
        mib_to_bytes(kv_cache_mib)?,
        tessera_worker::kv_cache::DEFAULT_BLOCK_SIZE,
    )?;
    Ok(LocalBackend::new(Engine::new(model, cache, Box::new(Single))))
}

/// Where a command's steps run: in this process (tp = 1) or on a local cluster of worker processes.
pub struct Runner {
    pub backend: Box<dyn Backend>,
    // Dropped after the backend (field order): the group's connections close before the workers stop.
    _cluster: Option<LocalCluster>,
}

impl Runner {
    /// The backend, and the worker processes to keep alive as long as it is used.
    pub fn into_parts(self) -> (Box<dyn Backend>, Option<LocalCluster>) {
        (self.backend, self._cluster)
    }

    /// In this process for tp = 1, else on a local cluster of worker processes.
    pub fn start(args: &ModelArgs, dir: &Path) -> Result<Self> {
        if args.tp == 1 {
            let backend = load_local(dir, args.kv_cache_mib, args.device.parse()?, args.quantize)?;
            Ok(Runner { backend: Box::new(backend), _cluster: None })
        } else {
            Self::start_workers(args, dir)
        }
    }

    /// An engine in this process, on the CPU.
    pub fn in_process(dir: &Path, kv_cache_mib: usize) -> Result<Self> {
        let backend = load_local(dir, kv_cache_mib, tessera_kernels::Device::Cpu, None)?;
        Ok(Runner { backend: Box::new(backend), _cluster: None })
    }

    /// `args.tp` worker processes on loopback, even for tp = 1.
    pub fn start_workers(args: &ModelArgs, dir: &Path) -> Result<Self> {
        if args.tp == 0 {
            bail!("--tp must be at least 1");
        }
        // Refuse a split the model cannot take before starting any process.
        let device: tessera_kernels::Device = args.device.parse()?;
        Model::check_split(dir, args.tp)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tessera_kernels::ensure_available(device)?;
        let mut extra = args.worker_args.clone();
        extra.extend(["--device".to_string(), device.to_string()]);
        if let Some(q) = args.quantize {
            extra.extend(["--quantize".to_string(), q.to_string()]);
        }
        // A fresh token for these workers alone: other users of the machine can reach loopback ports.
        let token = tessera_proto::auth::ClusterToken::generate();
        let cluster = LocalCluster::start(args.tp, (cores / args.tp).max(1), args.kv_cache_mib, &extra, &token)?;
        let abs = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
        let group = GroupClient::connect(
            &cluster.addrs,
            &abs.to_string_lossy(),
            mib_to_bytes(args.kv_cache_mib)? as u64,
            tessera_worker::kv_cache::DEFAULT_BLOCK_SIZE as u32,
            &format!("local-{}", std::process::id()),
            GroupTimeouts::default(),
            &token,
        )?;
        Ok(Runner { backend: Box::new(group), _cluster: Some(cluster) })
    }
}
