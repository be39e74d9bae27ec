//! The `tessera` command line: argument parsing and the subcommands' glue. Errors are printed as one
//! `error:` line (with their causes) and a non-zero exit status; nothing here panics on bad input.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tessera_worker::{Engine, Model, SamplingParams, Shard, collective::Single, kv_cache::KvCache};

use crate::{
    backend::{Backend, LocalBackend},
    default_model,
    generate::{GenerateRequest, generate, validate_prompt},
    group::{GroupClient, GroupTimeouts},
    local_cluster::LocalCluster,
    tokenizer::Tokenizer,
};

#[derive(Parser, Debug)]
#[command(name = "tessera", version, about = "Tessera: a distributed LLM server for the Llama family")]
pub struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for log pipelines.
    /// Filter with RUST_LOG (default: info for tessera serve and worker, warn otherwise).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this collector (default: OTEL_EXPORTER_OTLP_ENDPOINT; unset: none).
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces to sample when exporting (requests with a sampled traceparent always are).
    #[arg(long, global = true, default_value_t = 1.0, value_name = "RATIO")]
    pub otlp_sampling_ratio: f64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a completion for one prompt and print it (streamed, or as JSON).
    Generate(GenerateArgs),
    /// Benchmarks: the engine against the memory-bandwidth roofline; `cluster` (worker processes); `serve` (load generator).
    Bench(crate::bench::BenchArgs),
    /// Serve one tensor-parallel shard to a coordinator over gRPC.
    Worker(crate::worker_cmd::WorkerArgs),
    /// Serve the OpenAI-compatible HTTP API on a model (in process, or on --tp N local worker processes).
    Serve(crate::serve::ServeArgs),
    /// Serve the OpenAI-compatible HTTP API over the replicas formed from workers registered in etcd.
    Coordinator(crate::coordinator_cmd::CoordinatorArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Usage totals from a ledger (`tessera serve --usage-db FILE`), by key, tenant, model or day.
    Usage(crate::usage::UsageArgs),
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a new key: prints the secret once, and the entry to add to the --api-keys file.
    Create {
        /// Tenant the key belongs to.
        #[arg(long)]
        tenant: String,
        /// Key id (default: derived from the secret's hash).
        #[arg(long)]
        id: Option<String>,
        /// Models the key may use, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
    },
}

fn keys_create(tenant: &str, id: Option<&str>, models: Option<Vec<String>>) -> Result<()> {
    if tenant.is_empty() {
        bail!("--tenant must not be empty");
    }
    let (secret, entry) = crate::api::auth::create(tenant, id, models);
    println!("secret (shown once, store it now): {secret}");
    println!("add this entry to the \"keys\" list of the --api-keys file:");
    println!("{}", serde_json::to_string(&entry)?);
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (default: the built-in stories260K).
    #[arg(long, value_name = "DIR")]
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
    /// Arguments every local worker gets (log format, OTLP export), from the global options.
    #[arg(skip)]
    pub worker_args: Vec<String>,
}

impl ModelArgs {
    pub fn dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => default_model::path(),
        }
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (tokenized with the model's tokenizer, BOS added as the model expects).
    #[arg(long, conflicts_with = "prompt_ids", value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, used as given.
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Option<String>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0, value_name = "T")]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub min_p: f32,
    /// Divide logits of tokens already present by this (>1 discourages repetition).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repetition_penalty: f32,
    /// Subtract from logits of tokens already generated (OpenAI semantics).
    #[arg(long, default_value_t = 0.0, value_name = "X", allow_hyphen_values = true)]
    pub presence_penalty: f32,
    /// Subtract per occurrence of tokens already generated (OpenAI semantics).
    #[arg(long, default_value_t = 0.0, value_name = "X", allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    /// Seed for sampling: the same seed gives the same output.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Report the K most likely tokens and their logprobs at each position (with --json).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_logprobs: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Generate(_) | Command::Bench(_));
    let service = if matches!(cli.command, Command::Worker(_)) { "tessera-worker" } else { "tessera-coordinator" };
    let _telemetry = match init_telemetry(&cli, if quiet { "warn" } else { "info" }, service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let log_json = cli.log_format == LogFormat::Json;
    // Local workers log and export like their parent.
    let mut worker_args = Vec::new();
    if log_json {
        worker_args.extend(["--log-format".to_string(), "json".to_string()]);
    }
    if let Some(e) = &cli.otlp_endpoint {
        worker_args.extend([
            "--otlp-endpoint".to_string(),
            e.clone(),
            "--otlp-sampling-ratio".to_string(),
            cli.otlp_sampling_ratio.to_string(),
        ]);
    }
    let mut command = cli.command;
    match &mut command {
        Command::Serve(a) => a.model.worker_args = worker_args,
        Command::Generate(a) => a.model.worker_args = worker_args,
        _ => {}
    }
    let result = match command {
        Command::Generate(a) => run_generate(a),
        Command::Bench(a) => crate::bench::run(a),
        Command::Worker(a) => crate::worker_cmd::run(a),
        Command::Coordinator(mut a) => {
            a.http.log_json = log_json;
            crate::coordinator_cmd::run(a)
        }
        Command::Serve(mut a) => {
            a.http.log_json = log_json;
            crate::serve::run(a)
        }
        Command::Keys(KeysCommand::Create { tenant, id, models }) => keys_create(&tenant, id.as_deref(), models),
        Command::Usage(a) => crate::usage::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The subscriber, and with an OTLP endpoint the exporter on a small runtime of its own (its gRPC channel
/// must live on one, whatever runtime the subcommand uses), kept alive until exit.
fn init_telemetry(
    cli: &Cli,
    default: &str,
    service: &'static str,
) -> Result<(crate::telemetry::Telemetry, Option<tokio::runtime::Runtime>)> {
    let json = cli.log_format == LogFormat::Json;
    let Some(endpoint) = crate::telemetry::endpoint(&cli.otlp_endpoint) else {
        return Ok((crate::telemetry::init(json, default, None)?, None));
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tessera-otlp")
        .enable_all()
        .build()?;
    let otlp = crate::telemetry::Otlp { endpoint, sampling_ratio: cli.otlp_sampling_ratio, service_name: service };
    let t = {
        let _in_rt = rt.enter();
        crate::telemetry::init(json, default, Some(otlp))?
    };
    Ok((t, Some(rt)))
}

/// Loads a model directory into an in-process engine on `device` with `kv_cache_mib` of KV cache.
pub fn load_local(dir: &Path, kv_cache_mib: usize, device: tessera_kernels::Device) -> Result<LocalBackend> {
    let model =
        Model::load_on(dir, Shard::WHOLE, device).with_context(|| format!("loading model {}", dir.display()))?;
    let cache = KvCache::with_budget(&model, kv_cache_mib << 20, tessera_worker::kv_cache::DEFAULT_BLOCK_SIZE)?;
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
            Self::in_process_on(dir, args.kv_cache_mib, args.device.parse()?)
        } else {
            Self::start_workers(args, dir)
        }
    }

    /// An engine in this process, on the CPU.
    pub fn in_process(dir: &Path, kv_cache_mib: usize) -> Result<Self> {
        Self::in_process_on(dir, kv_cache_mib, tessera_kernels::Device::Cpu)
    }

    /// An engine in this process on `device`.
    pub fn in_process_on(dir: &Path, kv_cache_mib: usize, device: tessera_kernels::Device) -> Result<Self> {
        Ok(Runner { backend: Box::new(load_local(dir, kv_cache_mib, device)?), _cluster: None })
    }

    /// `args.tp` worker processes on loopback, even for tp = 1.
    pub fn start_workers(args: &ModelArgs, dir: &Path) -> Result<Self> {
        if args.tp == 0 {
            bail!("--tp must be at least 1");
        }
        // Refuse a split the model cannot take before starting any process.
        let config = tessera_worker::config::ModelConfig::load(dir)?;
        tessera_worker::model::ShardLayout::new(&config, Shard { rank: 0, world: args.tp })?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let device: tessera_kernels::Device = args.device.parse()?;
        device.ensure_available()?;
        let mut extra = args.worker_args.clone();
        extra.extend(["--device".to_string(), device.to_string()]);
        let cluster = LocalCluster::start(args.tp, (cores / args.tp).max(1), args.kv_cache_mib, &extra)?;
        let abs = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
        let group = GroupClient::connect(
            &cluster.addrs,
            &abs.to_string_lossy(),
            (args.kv_cache_mib as u64) << 20,
            tessera_worker::kv_cache::DEFAULT_BLOCK_SIZE as u32,
            &format!("local-{}", std::process::id()),
            GroupTimeouts::default(),
        )?;
        Ok(Runner { backend: Box::new(group), _cluster: Some(cluster) })
    }
}

pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().with_context(|| format!("--prompt-ids: {p:?} is not a token id")))
        .collect()
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
        logprobs: a.top_logprobs > 0,
        top_logprobs: a.top_logprobs,
        logit_bias: Vec::new(),
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let dir = a.model.dir()?;
    if !dir.is_dir() {
        return Err(tessera_worker::ModelError::NoDirectory(dir).into());
    }
    let tok = Tokenizer::load(&dir)?;
    let prompt_ids = match (&a.prompt, &a.prompt_ids) {
        (Some(text), None) => {
            if text.is_empty() {
                bail!("--prompt is empty");
            }
            tok.encode_prompt(text)?
        }
        (None, Some(ids)) => parse_ids(ids)?,
        _ => bail!("give the prompt with --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let mut runner = Runner::start(&a.model, &dir)?;
    let backend = runner.backend.as_mut();
    let info = backend.info();
    validate_prompt(&prompt_ids, info.vocab_size, info.max_position_embeddings)?;
    let req = GenerateRequest { prompt_ids, params, max_tokens: a.max_tokens, ignore_eos: a.ignore_eos };
    let stdout = std::io::stdout();
    if a.json {
        let out = generate(backend, &tok, &req, 0, |_| {})?;
        let mut lock = stdout.lock();
        serde_json::to_writer(&mut lock, &out)?;
        writeln!(lock)?;
    } else {
        let mut lock = stdout.lock();
        let mut io_err = None;
        generate(backend, &tok, &req, 0, |piece| {
            if io_err.is_none() {
                io_err = lock.write_all(piece.as_bytes()).and_then(|_| lock.flush()).err();
            }
        })?;
        if let Some(e) = io_err {
            return Err(e).context("writing to stdout");
        }
        writeln!(lock)?;
    }
    Ok(())
}
