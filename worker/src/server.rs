//! The worker's gRPC service (`tessera.v1.Worker`): loads its shard when the coordinator asks, joins the
//! group's collectives, and runs steps.
//!
//! One step runs at a time (the engine is behind a mutex and runs on a blocking thread). A step the engine
//! refuses is `INVALID_ARGUMENT` and changes nothing; a collective failure marks the worker `FAILED`
//! (`ABORTED` to the caller) until the next `LoadModel`, because its peers are out of step for good.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tessera_kernels::Device;
use tessera_proto::step::{Sampled, ScorePrompt};
use tessera_proto::v1::{
    self as pb, HealthReply, HealthRequest, InfoReply, InfoRequest, LoadAdapterReply, LoadAdapterRequest,
    LoadModelReply, LoadModelRequest, LoraAdapter, StepReply, StepRequest, UnloadAdapterReply, UnloadAdapterRequest,
    health_reply::Status as HealthStatus, rendezvous::Kind, worker_server::Worker,
};
use tonic::{Request, Response, Status};

use crate::{
    Engine, Model, SamplingParams, Shard, StepError, StepSeq,
    collective::{Collective, Single},
    kept::KeptSequences,
    kv_cache::{DEFAULT_BLOCK_SIZE, KvCache},
    nccl_collective::NcclCollective,
    tcp_collective,
};

/// Finds (writing it first if need be) the directory of a model built into the binary.
pub type LocateModel = fn() -> Result<PathBuf, String>;

/// Largest KV block `LoadModel` accepts, in tokens (the coordinator uses 16).
const MAX_BLOCK_SIZE: usize = 4096;

/// Settings of a worker process.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Where models are loaded (weights, KV cache, forward pass).
    pub device: Device,
    /// Default KV cache budget when LoadModel does not give one.
    pub kv_cache_bytes: usize,
    /// Bound on the collective rendezvous and on every collective read/write after it.
    pub collective_timeout: Duration,
    /// Model names LoadModel accepts in place of a path (`builtin:stories260K`), and how to get the
    /// directory: a model compiled into the binary needs no shared volume.
    pub builtin_models: Vec<(&'static str, LocateModel)>,
    /// The cluster token peers must prove in the collective handshake (gRPC calls are checked by the
    /// server's [`tessera_proto::auth::Guard`]).
    pub token: tessera_proto::auth::ClusterToken,
    /// Quantize a model directory's matrices as they load (`--quantize`).
    pub quantize: Option<crate::quantize::QuantizeTo>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            device: Device::Cpu,
            kv_cache_bytes: 256 << 20,
            collective_timeout: Duration::from_secs(30),
            builtin_models: Vec::new(),
            token: Default::default(),
            quantize: None,
        }
    }
}

enum State {
    Idle,
    Serving {
        engine: Box<Engine>,
        /// Block tables and sampling parameters of the sequences, for steps that carry only what changed.
        kept: KeptSequences,
        model: String,
        rank: u32,
        world: u32,
        group_id: String,
    },
    Failed(String),
}

pub struct WorkerService {
    config: WorkerConfig,
    collective_listener: Arc<tokio::net::TcpListener>,
    collective_address: String,
    state: Arc<Mutex<State>>,
    /// Serialises LoadModel calls (a load replaces the engine; two at once would race).
    loading: tokio::sync::Mutex<()>,
}

impl WorkerService {
    /// `collective_listener` accepts this worker's ring neighbour; `advertise` is the address peers dial.
    pub fn new(config: WorkerConfig, collective_listener: tokio::net::TcpListener, advertise: String) -> Self {
        WorkerService {
            config,
            collective_listener: Arc::new(collective_listener),
            collective_address: advertise,
            state: Arc::new(Mutex::new(State::Idle)),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// Memory for weights and KV cache on this worker's device: free GPU memory, or the host's available.
    pub fn memory_bytes(&self) -> u64 {
        match tessera_kernels::memory_info(self.config.device) {
            Ok(Some((free, _))) => free as u64,
            _ => available_memory(),
        }
    }

    /// A fresh NCCL unique id when this worker is on a GPU and NCCL loads; empty otherwise.
    fn nccl_id(&self) -> Vec<u8> {
        let Device::Cuda(_) = self.config.device else { return Vec::new() };
        tessera_kernels::cuda::nccl::new_unique_id(self.config.device).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no NCCL unique id: the group will use TCP collectives");
            Vec::new()
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the engine in an unknown state: treat it as failed.
        self.state.lock().unwrap_or_else(|p| {
            let mut g = p.into_inner();
            *g = State::Failed("an earlier step panicked".into());
            g
        })
    }

    /// This rank's collective for a group of `world`: none for a group of one, else the TCP ring or NCCL
    /// as the request's rendezvous says (blocking until every rank has joined).
    async fn join_group(
        &self,
        r: &mut LoadModelRequest,
        rank: usize,
        world: usize,
    ) -> Result<Box<dyn Collective>, Status> {
        if world == 1 {
            return Ok(Box::new(Single));
        }
        let device = self.config.device;
        Ok(match r.rendezvous.take().and_then(|z| z.kind) {
            Some(Kind::Tcp(t)) if t.peers.len() == world => Box::new(
                tcp_collective::rendezvous(
                    &self.collective_listener,
                    rank,
                    &t.peers,
                    &r.group_id,
                    self.config.collective_timeout,
                    &self.config.token,
                )
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?,
            ),
            Some(Kind::Tcp(t)) => {
                return Err(Status::invalid_argument(format!(
                    "{} peer addresses for a group of {world}",
                    t.peers.len()
                )));
            }
            Some(Kind::NcclUniqueId(_)) if device == Device::Cpu => {
                return Err(Status::invalid_argument(
                    "NCCL rendezvous on a CPU worker; this worker uses TCP collectives",
                ));
            }
            Some(Kind::NcclUniqueId(id)) => {
                // Blocks until every rank has joined; the coordinator's load timeout bounds the wait.
                let c = tokio::task::spawn_blocking(move || NcclCollective::new(device, rank, world, &id))
                    .await
                    .map_err(|e| Status::internal(format!("joining the NCCL group panicked: {e}")))?
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                tracing::info!(rank, world, %device, "joined the NCCL group");
                Box::new(c)
            }
            None => return Err(Status::invalid_argument("a group of more than one rank needs a rendezvous")),
        })
    }
}

/// Device memory a GPU worker keeps free of KV cache for activations and attention scratch.
const GPU_HEADROOM: usize = 3 << 30;

fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn to_params(p: Option<&pb::SamplingParams>) -> SamplingParams {
    let Some(p) = p else { return SamplingParams::greedy() };
    SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as usize,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        logprobs: p.logprobs,
        top_logprobs: p.top_logprobs as usize,
        logit_bias: p.logit_bias.iter().map(|(&t, &b)| (t, b)).collect(),
        prompt_logprobs: None,
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn info(&self, req: Request<InfoRequest>) -> Result<Response<InfoReply>, Status> {
        let mut reply = InfoReply {
            protocol: tessera_proto::PROTOCOL_VERSION.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device: self.config.device.to_string(),
            memory_bytes: self.memory_bytes(),
            collective_address: self.collective_address.clone(),
            ..Default::default()
        };
        if req.get_ref().create_nccl_id {
            reply.nccl_unique_id = self.nccl_id();
        }
        if let State::Serving { engine, model, rank, world, .. } = &*self.lock() {
            reply.model = model.clone();
            reply.rank = *rank;
            reply.world_size = *world;
            reply.num_kv_blocks = engine.cache.num_blocks as u32;
            reply.block_size = engine.cache.block_size as u32;
        }
        Ok(Response::new(reply))
    }

    async fn load_model(&self, req: Request<LoadModelRequest>) -> Result<Response<LoadModelReply>, Status> {
        let _one_at_a_time = self.loading.lock().await;
        let started = Instant::now();
        let mut r = req.into_inner();
        let (rank, world) = (r.rank as usize, r.world_size as usize);
        if world == 0 || rank >= world {
            return Err(Status::invalid_argument(format!("rank {rank} is not in a group of {world}")));
        }
        let device = self.config.device;
        let quantize = self.config.quantize;
        let native = if device == Device::Cpu { "f32" } else { "bf16" };
        if !(r.dtype.is_empty() || r.dtype == native) {
            return Err(Status::invalid_argument(format!(
                "dtype {:?} is not supported on {device}; use {native}",
                r.dtype
            )));
        }
        // Drop any previous model first: its memory and its collective connections.
        *self.lock() = State::Idle;
        let comm = self.join_group(&mut r, rank, world).await?;
        let path = match self.config.builtin_models.iter().find(|(name, _)| *name == r.model_path) {
            Some((_, locate)) => locate().map_err(|e| Status::internal(format!("{}: {e}", r.model_path)))?,
            None => PathBuf::from(&r.model_path),
        };
        let asked = r.kv_cache_bytes as usize;
        let default_bytes = self.config.kv_cache_bytes;
        let block_size = if r.block_size > 0 { r.block_size as usize } else { DEFAULT_BLOCK_SIZE };
        if block_size > MAX_BLOCK_SIZE {
            return Err(Status::invalid_argument(format!(
                "block_size {block_size} is more than {MAX_BLOCK_SIZE} tokens a block"
            )));
        }
        let engine = tokio::task::spawn_blocking(move || -> Result<Engine, crate::ModelError> {
            let model = Model::load_with(&path, Shard { rank, world }, device, quantize)?;
            let kv_bytes = match tessera_kernels::memory_info(device)? {
                _ if asked > 0 => asked,
                // On a GPU, 0 means: what the weights left, less room for activations and the dense
                // prefill's score matrices.
                Some((free, _)) if asked == 0 => (free as f64 * 0.9) as usize - GPU_HEADROOM.min(free / 2),
                _ => default_bytes,
            };
            let cache = KvCache::with_budget(&model.kv_geometry(), kv_bytes, block_size)?;
            Ok(Engine::new(model, cache, comm))
        })
        .await
        .map_err(|e| Status::internal(format!("loading panicked: {e}")))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let c = &engine.model.config;
        let reply = LoadModelReply {
            num_kv_blocks: engine.cache.num_blocks as u32,
            vocab_size: c.vocab_size as u32,
            max_position_embeddings: c.max_position_embeddings as u32,
            load_seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(model = %r.model_path, rank, world, blocks = reply.num_kv_blocks, "model loaded");
        *self.lock() = State::Serving {
            engine: Box::new(engine),
            kept: KeptSequences::default(),
            model: r.model_path,
            rank: r.rank,
            world: r.world_size,
            group_id: r.group_id,
        };
        Ok(Response::new(reply))
    }

    async fn load_adapter(&self, req: Request<LoadAdapterRequest>) -> Result<Response<LoadAdapterReply>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let a = r.adapter.ok_or_else(|| Status::invalid_argument("no adapter"))?;
        let state = self.state.clone();
        // Loading reads files: off the async threads, holding the engine (no step runs meanwhile).
        tokio::task::spawn_blocking(move || {
            let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
            let (engine, _) = serving(&mut guard, &r.group_id, "adapter load")?;
            load_adapter(engine, &a).map_err(|e| Status::invalid_argument(e.to_string()))?;
            tracing::info!(adapter = %a.name, id = a.id, path = %a.path, "LoRA adapter loaded");
            Ok(Response::new(LoadAdapterReply { load_seconds: started.elapsed().as_secs_f64() }))
        })
        .await
        .map_err(|e| Status::internal(format!("loading panicked: {e}")))?
    }

    async fn unload_adapter(&self, req: Request<UnloadAdapterRequest>) -> Result<Response<UnloadAdapterReply>, Status> {
        let r = req.into_inner();
        let state = self.state.clone();
        // The engine's lock is held for a whole step: wait for it off the async threads.
        tokio::task::spawn_blocking(move || {
            let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
            let (engine, _) = serving(&mut guard, &r.group_id, "unload")?;
            let was_loaded = engine.unload_adapter(r.id).map_err(|e| Status::failed_precondition(e.to_string()))?;
            tracing::info!(id = r.id, was_loaded, "LoRA adapter unloaded");
            Ok(Response::new(UnloadAdapterReply { was_loaded }))
        })
        .await
        .map_err(|e| Status::internal(format!("unloading panicked: {e}")))?
    }

    async fn step(&self, req: Request<StepRequest>) -> Result<Response<StepReply>, Status> {
        let r = req.into_inner();
        let state = self.state.clone();
        let started = Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let span = tracing::info_span!(target: "tessera::worker", "worker.step", step_id = r.step_id, sequences = r.sequences.len());
        // Straight onto the compute pool: one handoff (tokio → rayon) instead of two via a blocking thread.
        rayon::spawn(move || {
            let _ = tx.send(span.in_scope(|| run_step(&state, r, started)));
        });
        let result = rx.await.map_err(|_| Status::internal("step panicked"))?;
        result.map(Response::new)
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        let (status, message) = match &*self.lock() {
            State::Idle => (HealthStatus::Idle, String::new()),
            State::Serving { .. } => (HealthStatus::Serving, String::new()),
            State::Failed(m) => (HealthStatus::Failed, m.clone()),
        };
        Ok(Response::new(HealthReply { status: status as i32, message }))
    }
}

/// Runs one step on the engine (on a rayon thread).
/// The engine of a worker serving `group_id` (empty matches a group of one), or why there is none.
/// A call (`what`) for group `group_id`: a step one rank runs and its peers do not breaks the group's
/// collectives for every later step, so a rank of a group only takes calls addressed to that group.
fn serving<'a>(
    state: &'a mut State,
    group_id: &str,
    what: &str,
) -> Result<(&'a mut Engine, &'a mut KeptSequences), Status> {
    match state {
        State::Serving { engine, kept, group_id: g, world, .. } => {
            if (*world > 1 || !group_id.is_empty()) && group_id != g {
                return Err(Status::failed_precondition(format!(
                    "{what} for group {group_id} but this worker serves group {g}"
                )));
            }
            Ok((engine, kept))
        }
        State::Idle => Err(Status::failed_precondition("no model loaded")),
        State::Failed(m) => Err(Status::failed_precondition(format!("worker failed earlier: {m}"))),
    }
}

fn load_adapter(engine: &mut Engine, a: &LoraAdapter) -> Result<(), crate::ModelError> {
    let limits = crate::lora::AdapterLimits { max_rank: a.max_rank as usize };
    engine.load_adapter(a.id, &a.name, std::path::Path::new(&a.path), limits)
}

fn run_step(state: &Mutex<State>, r: StepRequest, started: Instant) -> Result<StepReply, Status> {
    let mut guard = state.lock().map_err(|_| Status::internal("worker state poisoned by a panic"))?;
    let (engine, kept) = serving(&mut guard, &r.group_id, "step")?;
    check_incremental(&r)?;
    for id in &r.finished_sequence_ids {
        engine.release(*id);
    }
    kept.release(r.finished_sequence_ids.iter().copied());
    let expanded = kept.apply(&r.sequences, |p| to_params(Some(p))).map_err(|unknown| resend(&unknown))?;
    let batch: Vec<StepSeq> = r
        .sequences
        .iter()
        .zip(expanded.tables.iter().zip(&expanded.sampling))
        .map(|(s, ((_, table), p))| StepSeq {
            id: s.sequence_id,
            tokens: &s.token_ids,
            start_pos: s.start_position as usize,
            block_table: table,
            sample: p.as_ref(),
            penalty_context: &s.penalty_context,
            output_context: &s.output_context,
            starts: s.starts,
            score_prompt: s
                .prompt_logprobs
                .map(|top| ScorePrompt { top: top as usize, next_token: s.next_prompt_token }),
            allowed: (!s.allowed_tokens.is_empty()).then_some(&s.allowed_tokens[..]),
            adapter: s.adapter_id,
        })
        .collect();
    let result = engine.step_with_logits(&batch);
    drop(batch);
    let ids: Vec<u64> = expanded.tables.iter().map(|(id, _)| *id).collect();
    kept.restore(expanded.tables);
    let (sampled, logits) = match result {
        Ok(x) => x,
        Err(StepError::Invalid(m)) => {
            // The coordinator fails a refused step's sequences: what was kept of them goes too.
            kept.release(ids);
            return Err(Status::invalid_argument(m));
        }
        Err(e @ StepError::Collective(_)) => {
            let m = e.to_string();
            *guard = State::Failed(m.clone());
            return Err(Status::aborted(m));
        }
        Err(e) => return Err(Status::internal(e.to_string())),
    };
    Ok(reply(engine, sampled, logits.filter(|_| r.return_logits), started))
}

/// An incremental sequence carries appended blocks and never begins; a full one carries its block table.
fn check_incremental(r: &StepRequest) -> Result<(), Status> {
    match r
        .sequences
        .iter()
        .find(|s| if s.incremental { !s.block_table.is_empty() || s.starts } else { !s.appended_blocks.is_empty() })
    {
        Some(s) => Err(Status::invalid_argument(format!(
            "sequence {}: an incremental step carries appended_blocks and never begins a sequence; a full one \
             carries block_table",
            s.sequence_id
        ))),
        None => Ok(()),
    }
}

/// The refusal of incremental steps for sequences this worker holds nothing of: the coordinator reads
/// `tessera-resend` and sends them in full.
fn resend(unknown: &[u64]) -> Status {
    let ids = unknown.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut status = Status::failed_precondition(format!(
        "incremental steps of sequences this worker holds nothing of: {ids}; send them in full"
    ));
    if let Ok(v) = ids.parse() {
        status.metadata_mut().insert("tessera-resend", v);
    }
    status
}

/// A step's reply: the sampled tokens (with their logits rows, where `logits` is given) and the prompt
/// scores.
fn reply(
    engine: &mut Engine,
    sampled: Vec<tessera_proto::step::SeqSampled>,
    logits: Option<tessera_kernels::Tensor>,
    started: Instant,
) -> StepReply {
    let vocab = engine.model.config.vocab_size;
    let rows = logits.as_ref().and_then(|l| l.as_f32().ok());
    let tokens = sampled
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let logits = rows.map_or_else(Vec::new, |rows| rows[i * vocab..(i + 1) * vocab].to_vec());
            to_pb_token(s.id, &s.sampled, logits)
        })
        .collect();
    let prompt_logprobs = engine
        .take_prompt_scores()
        .into_iter()
        .map(|p| pb::PromptLogprobs {
            sequence_id: p.id,
            first_position: p.first_position as u32,
            tokens: p.tokens.iter().map(|t| to_pb_token(p.id, t, Vec::new())).collect(),
            ranks: p.ranks,
        })
        .collect();
    StepReply {
        tokens,
        forward_seconds: started.elapsed().as_secs_f64(),
        sample_seconds: 0.0,
        collective_seconds: engine.take_collective_seconds(),
        prompt_logprobs,
    }
}

fn to_pb_token(sequence_id: u64, s: &Sampled, logits: Vec<f32>) -> pb::SampledToken {
    pb::SampledToken {
        sequence_id,
        token_id: s.token,
        logprob: s.logprob.unwrap_or(0.0),
        top_logprobs: s
            .top_logprobs
            .iter()
            .map(|&(token_id, logprob)| pb::TokenLogprob { token_id, logprob })
            .collect(),
        logits,
    }
}
