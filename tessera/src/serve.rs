//! `tessera serve`: the OpenAI-compatible server on one replica (this process, or `--tp N` local worker
//! processes), with no etcd and no other moving parts.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;

use tessera_coordinator::{
    api::{self, AppState, chat_template::ChatTemplate},
    engine::backend::Backend,
    lora::LoraSettings,
    metrics::Metrics,
    replicas::Replicas,
    scheduler::SchedulerConfig,
    tokenizer::Tokenizer,
    tool_calls::Format,
};

use crate::{
    runner::{ModelArgs, Runner},
    supervisor::{Started, Supervisor},
};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// Whether a replica's steps overlap its engine loop's planning (`--overlap`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlap {
    Auto,
    On,
    Off,
}

/// The HTTP side, the same for `tessera serve` and `tessera coordinator`.
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Address to listen on (0.0.0.0 to accept connections from other machines).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients send in `model` (default: the model directory's name, or the GGUF file's
    /// without its extension).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Most sequences decoding at once (per replica).
    #[arg(long, default_value_t = 128)]
    pub max_num_seqs: usize,
    /// Most tokens computed in one step; prompts longer than this are prefilled in chunks. At least
    /// `--max-num-seqs`.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Plan each step (take requests in, allocate blocks, build the message) while the workers run the
    /// step before, and deliver its tokens while they run the next: `on`, `off`, or `auto` (on, but where
    /// the workers are processes computing on this machine's CPU, which take every core and leave the
    /// planning none of its own). An engine in this process never overlaps.
    #[arg(long, value_enum, default_value_t = Overlap::Auto)]
    pub overlap: Overlap,
    /// Requests allowed to wait for a slot; more get 429 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Most client connections open at once (lowered to fit `ulimit -n`); more wait until one closes.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds a connection has to send a request's head, from its opening or from the end of its previous
    /// response; a connection idle for longer is closed (so this is also the keep-alive timeout).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub header_timeout: f64,
    /// Seconds a request has to send its body once its head has arrived; slower ones get 408.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub body_timeout: f64,
    /// Seconds a response may wait for its client to take any of it; a client that reads nothing for
    /// longer loses its connection.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub write_timeout: f64,
    /// JSON file of API keys (see `tessera keys create`); without it the API is open to anyone who can
    /// reach it.
    #[arg(long, value_name = "FILE")]
    pub api_keys: Option<std::path::PathBuf>,
    /// SQLite file of per-request usage (created if missing): one row per request, written when it ends.
    /// `tessera usage --db FILE` and `GET /v1/usage` (admin keys) read it.
    #[arg(long, value_name = "FILE")]
    pub usage_db: Option<std::path::PathBuf>,
    /// A Jinja chat template file to use instead of the one in the model's `tokenizer_config.json`.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<std::path::PathBuf>,
    /// The format the model writes tool calls in, for `tool_choice: "auto"` (default: read from the chat
    /// template, when it shows one).
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(Format::names()))]
    pub tool_call_parser: Option<String>,
    /// A LoRA adapter to serve over the model, as NAME=DIR (a PEFT adapter directory; in cluster mode
    /// as the workers see it): requests with `"model": "NAME"` use it. Repeatable; more can be loaded
    /// while serving with POST /v1/load_lora_adapter.
    #[arg(long = "lora", value_name = "NAME=DIR")]
    pub lora: Vec<String>,
    /// Most LoRA adapters loaded at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_loras: usize,
    /// Largest LoRA rank accepted.
    #[arg(long, default_value_t = 64, value_name = "R")]
    pub max_lora_rank: u32,
    /// Set from the global --log-format.
    #[arg(skip)]
    pub log_json: bool,
}

/// Largest chat template file read (`--chat-template`): the templates models ship are a few kilobytes.
const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

/// The chat template: `--chat-template`'s file, or the model's own.
fn chat_template(http: &HttpArgs, tokenizer: &Tokenizer) -> Result<Option<ChatTemplate>> {
    let (bos, eos) = (tokenizer.bos_token.as_deref(), tokenizer.eos_token.as_deref());
    let Some(path) = &http.chat_template else {
        return ChatTemplate::from_config(&tokenizer.config, bos, eos).map_err(anyhow::Error::msg);
    };
    let meta = std::fs::metadata(path).with_context(|| format!("--chat-template {}", path.display()))?;
    if !meta.is_file() || meta.len() > MAX_TEMPLATE_BYTES {
        bail!("--chat-template {}: not a file of at most {MAX_TEMPLATE_BYTES} bytes", path.display());
    }
    let source = std::fs::read_to_string(path).with_context(|| format!("--chat-template {}", path.display()))?;
    ChatTemplate::from_config(&serde_json::json!({ "chat_template": source }), bos, eos)
        .map_err(|e| anyhow::anyhow!("--chat-template {}: {e}", path.display()))
}

/// Everything the HTTP server needs before there is a replica: checked arguments, tokenizer, template,
/// keys, ledger, and the bound port (bound first, so a port conflict is reported at once).
pub struct Frontend {
    pub http: HttpArgs,
    pub name: String,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub keys: Option<Arc<api::auth::KeyStore>>,
    pub ledger: Option<tessera_coordinator::usage::Ledger>,
    listener: std::net::TcpListener,
}

impl Frontend {
    /// `dir` is the model directory or GGUF file; `default_model` says it is the built-in one (named after
    /// it).
    pub fn prepare(http: HttpArgs, dir: &std::path::Path, default_model: bool) -> Result<Self> {
        if http.max_num_seqs == 0 || http.max_num_batched_tokens == 0 {
            bail!("--max-num-seqs and --max-num-batched-tokens must be at least 1");
        }
        if http.max_num_batched_tokens < http.max_num_seqs {
            // Every running sequence's decode must fit one step, or the newest would wait while the oldest
            // finish.
            bail!(
                "--max-num-batched-tokens ({}) must be at least --max-num-seqs ({}): a step holds one decode of \
                 every running sequence",
                http.max_num_batched_tokens,
                http.max_num_seqs
            );
        }
        let timeouts = [
            ("--header-timeout", http.header_timeout),
            ("--body-timeout", http.body_timeout),
            ("--write-timeout", http.write_timeout),
        ];
        for (flag, v) in timeouts {
            // A day is far past any client worth waiting for, and keeps the value a valid Duration.
            if !(v > 0.0 && v <= 86_400.0) {
                bail!("{flag} must be more than 0 and at most 86400 seconds, not {v}");
            }
        }
        if http.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        if !(dir.is_dir() || dir.is_file()) {
            return Err(tessera_worker::ModelError::NoModel(dir.to_path_buf()).into());
        }
        let base_name = if dir.is_file() { dir.file_stem() } else { dir.file_name() };
        let name = match &http.served_model_name {
            Some(n) => n.clone(),
            None if default_model => crate::default_model::NAME.to_string(),
            None => base_name.map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
        };
        let keys = http.api_keys.as_deref().map(api::auth::KeyStore::open).transpose()?;
        let ledger = http.usage_db.as_deref().map(tessera_coordinator::usage::Ledger::open).transpose()?;
        let tokenizer = Tokenizer::load(dir)?;
        let chat_template =
            chat_template(&http, &tokenizer).with_context(|| format!("the chat template of {}", dir.display()))?;
        let addr: SocketAddr = format!("{}:{}", http.host, http.port)
            .parse()
            .with_context(|| format!("--host {} --port {}", http.host, http.port))?;
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        Ok(Frontend { http, name, tokenizer, chat_template, keys, ledger, listener })
    }

    /// Registers the `--lora` adapters with `replicas` (every replica added from now on loads them) and,
    /// when given, loads them on `backend` now, so that a bad adapter is an error at start naming its file.
    pub fn register_adapters(&self, replicas: &Replicas, backend: Option<&mut dyn Backend>) -> Result<()> {
        let h = &self.http;
        if h.max_loras == 0 || h.max_lora_rank == 0 {
            bail!("--max-loras and --max-lora-rank must be at least 1");
        }
        replicas.adapters.configure(LoraSettings { max_loras: h.max_loras, max_rank: h.max_lora_rank });
        let mut backend = backend;
        for arg in &h.lora {
            let Some((name, dir)) = arg.split_once('=').filter(|(n, d)| !n.is_empty() && !d.is_empty()) else {
                bail!("--lora {arg}: expected NAME=DIR");
            };
            let spec =
                replicas.adapters.reserve(name, dir, &self.name).map_err(|e| anyhow::anyhow!("--lora {arg}: {e}"))?;
            if let Some(b) = backend.as_deref_mut() {
                b.load_adapter(&spec).map_err(|e| anyhow::anyhow!("--lora {arg}: {e}"))?;
            }
            replicas.adapters.ready(name, spec.id);
        }
        Ok(())
    }

    /// The scheduler settings of every replica of a model with a context of `max_model_len`; `cpu_workers`
    /// when its workers are processes computing on this machine's CPU.
    pub fn scheduler_config(&self, max_model_len: usize, cpu_workers: bool) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: self.http.max_num_seqs,
            max_batched_tokens: self.http.max_num_batched_tokens,
            max_model_len,
            overlap: match self.http.overlap {
                Overlap::On => true,
                Overlap::Off => false,
                Overlap::Auto => !cpu_workers,
            },
        }
    }

    /// Serves the API over `replicas` until SIGINT or SIGTERM, on a runtime of its own; `background` is
    /// spawned on it first (cluster membership) and its `on_shutdown` awaited (3 s at most) after the HTTP
    /// server stops. `banner` is printed with the URL once listening.
    pub fn run(
        self,
        replicas: Arc<Replicas>,
        cluster: Option<Arc<dyn api::ClusterStatus>>,
        banner: &str,
        background: Option<Background>,
    ) -> Result<()> {
        let Frontend { http, name, tokenizer, chat_template, keys, ledger, listener } = self;
        let tool_format = match &http.tool_call_parser {
            Some(name) => Format::from_name(name),
            None => chat_template.as_ref().and_then(|t| Format::detect(t.source())),
        };
        let state = Arc::new(AppState {
            engine: replicas,
            tokenizer: Arc::new(tokenizer),
            chat_template,
            model_name: name.clone(),
            max_waiting: http.max_waiting,
            max_body_bytes: http.max_body_bytes,
            body_timeout: Duration::from_secs_f64(http.body_timeout),
            started: api::unix_now(),
            instance: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            keys: keys.clone(),
            limiter: Default::default(),
            ledger: ledger.clone(),
            cluster,
            grammars: Default::default(),
            tool_format,
        });
        // HTTP and SSE threads: a few more than two on a large machine, where hundreds of streams each get a
        // token per step (the engine and the compute pool have threads of their own).
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
        let engine = state.engine.clone();
        let served = rt.block_on(async move {
            let on_shutdown = background.map(|b| {
                tokio::spawn(b.run);
                b.on_shutdown
            });
            tokio::spawn(api::server::give_back_memory_when_idle(engine));
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let local = listener.local_addr()?;
            match &keys {
                Some(k) => {
                    tracing::info!(keys = k.current().len(), "API keys required (reloaded on change or SIGHUP)");
                    k.clone().watch(std::time::Duration::from_secs(1));
                }
                None => tracing::warn!("no --api-keys: the API is open to anyone who can reach this address"),
            }
            if let Some(l) = &ledger {
                tracing::info!(path = %l.path.display(), "usage ledger: one row per request");
            }
            let limits = api::server::ConnectionLimits {
                max_connections: http.max_connections,
                header_timeout: Duration::from_secs_f64(http.header_timeout),
                write_timeout: Duration::from_secs_f64(http.write_timeout),
            }
            .fitted_to_fd_limit();
            let url = format!("http://{local}/v1");
            let banner = format!("{banner} on {url}");
            if http.log_json {
                tracing::info!(model = %name, url = %url, "{banner}");
            } else {
                eprintln!("{banner}");
            }
            let served =
                api::server::serve(listener, api::router(state), limits, tessera_worker::command::shutdown_signal())
                    .await
                    .context("serving HTTP");
            if let Some(f) = on_shutdown {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(3), f).await;
            }
            served
        });
        // Preparation still running on the blocking pool (a chat template on its fuel) ends by itself;
        // the process does not wait for it.
        rt.shutdown_timeout(Duration::from_secs(1));
        served
    }
}

type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Work that runs beside the HTTP server, and what to do once it has stopped.
pub struct Background {
    pub run: BoxFuture,
    pub on_shutdown: BoxFuture,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let dir = a.model.dir()?;
    let front = Frontend::prepare(a.http, &dir, a.model.model.is_none())?;
    let start = {
        let (model, dir) = (a.model.clone(), dir.clone());
        move || -> Result<Started> {
            let (backend, mut cluster) = Runner::start(&model, &dir)?.into_parts();
            let workers = cluster.as_ref().map(|c| c.addrs.clone()).unwrap_or_default();
            let exits = cluster.as_mut().and_then(|c| c.exits());
            Ok(Started { backend, keep_alive: Box::new(cluster), workers, exits })
        }
    };
    // A model that cannot start at all is an error now, not a replica restarted in the background.
    let mut first = start()?;
    let info = first.backend.info();
    let cfg = front.scheduler_config(info.max_position_embeddings, a.model.computes_on_cpu());
    let replicas = Replicas::new(info, Arc::new(Metrics::new(&front.name)));
    front.register_adapters(&replicas, Some(first.backend.as_mut()))?;
    let eos = front.tokenizer.eos_token_ids.clone();
    Supervisor { replicas: replicas.clone(), cfg, eos, start }.run(first);
    let banner = format!("tessera serving {} (tp = {})", front.name, a.model.tp);
    front.run(replicas, None, &banner, None)
}
