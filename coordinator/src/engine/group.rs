//! The coordinator's client of one tensor-parallel group: a model replica spread over `tp` worker
//! processes.
//!
//! Forming the group: ask every worker for its collective address (`Info`), then send each its rank and
//! the full peer list in `LoadModel`, concurrently (the ranks meet in the middle). Each step goes to every
//! rank concurrently; the group waits for all and takes rank 0's tokens. Any rank's error, or a rank not
//! answering within the step deadline, fails the step with a message naming the rank and its address;
//! a group that failed once is not used again.
//!
//! A step can also be submitted and waited for apart (`Backend::submit`, `Backend::wait`): its calls are
//! put on the sockets at once, and the answers wait there while the engine loop plans the next step.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tessera_proto::auth::ClusterToken;
use tessera_proto::step::{AdapterSpec, PromptScores, Sampled, SeqSampled, StepSeq};
use tessera_proto::v1::{
    self as pb, InfoReply, InfoRequest, LoadAdapterRequest, LoadModelRequest, LoraAdapter, Rendezvous, StepRequest,
    TcpRendezvous, UnloadAdapterRequest, rendezvous::Kind, worker_client::WorkerClient,
};
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

use super::{
    backend::{Backend, ModelInfo, RankFailure, StepFailure, WorkerTiming},
    step_delta::{Sent, resend_ids},
};

/// Timeouts of a group.
#[derive(Clone, Copy, Debug)]
pub struct GroupTimeouts {
    pub connect: Duration,
    pub load: Duration,
    pub step: Duration,
}

impl Default for GroupTimeouts {
    fn default() -> Self {
        GroupTimeouts {
            connect: Duration::from_secs(10),
            load: Duration::from_secs(300),
            step: Duration::from_secs(60),
        }
    }
}

/// A worker's client: every call carries the cluster token.
type Client = WorkerClient<InterceptedService<Channel, ClusterToken>>;

struct Rank {
    addr: String,
    client: Client,
}

pub struct GroupClient {
    /// A current-thread runtime owned by the group: each step polls every rank's RPC on the calling
    /// thread, with no handoff to runtime worker threads (tens of microseconds a step on a busy machine).
    rt: tokio::runtime::Runtime,
    ranks: Vec<Rank>,
    info: ModelInfo,
    group_id: String,
    timeouts: GroupTimeouts,
    next_step: u64,
    /// Set after the first failure: the group's collectives are out of step for good.
    failed: Option<String>,
    /// Sequences finished since the last step (their worker state is dropped with the next step).
    finished: Vec<u64>,
    /// Per rank, the worker's own timing of the last successful step.
    last: Vec<WorkerTiming>,
    /// Prompt tokens rank 0 scored in the last step, until taken.
    scores: Vec<PromptScores>,
    /// LoRA adapters every rank has loaded, by id.
    adapters: std::collections::HashSet<u32>,
    /// What the ranks hold of each sequence, so steps carry what changed.
    sent: Sent,
    /// The step submitted and not yet waited for, with its sequences' ids.
    in_flight: Option<(Calls, Vec<u64>)>,
}

/// Turns of the group's runtime that get a step's calls onto their sockets ([`Backend::submit`]).
const FLUSH_TURNS: usize = 8;

fn describe(status: &tonic::Status) -> String {
    match status.code() {
        Code::Unavailable | Code::Unknown if status.message().contains("transport") || status.message().is_empty() => {
            format!("unreachable ({})", status.message())
        }
        _ => format!("{:?}: {}", status.code(), status.message()),
    }
}

impl GroupClient {
    /// Connects to `addrs` (rank order) and loads `model_path` on all of them, calling with `token`.
    /// Blocks the calling thread, which must not be inside an async runtime; so do the steps.
    pub fn connect(
        addrs: &[String],
        model_path: &str,
        kv_cache_bytes: u64,
        block_size: u32,
        group_id: &str,
        timeouts: GroupTimeouts,
        token: &ClusterToken,
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
        let connecting = Self::connect_async(addrs, model_path, kv_cache_bytes, block_size, group_id, timeouts, token);
        let (ranks, info) = rt.block_on(connecting)?;
        Ok(GroupClient {
            rt,
            ranks,
            info,
            group_id: group_id.to_string(),
            timeouts,
            next_step: 0,
            failed: None,
            finished: Vec::new(),
            last: Vec::new(),
            scores: Vec::new(),
            adapters: Default::default(),
            sent: Sent::default(),
            in_flight: None,
        })
    }

    async fn connect_async(
        addrs: &[String],
        model_path: &str,
        kv_cache_bytes: u64,
        block_size: u32,
        group_id: &str,
        timeouts: GroupTimeouts,
        token: &ClusterToken,
    ) -> Result<(Vec<Rank>, ModelInfo)> {
        if addrs.is_empty() {
            bail!("a group needs at least one worker");
        }
        let mut ranks = Vec::new();
        let mut peers = Vec::new();
        let mut devices = Vec::new();
        for (r, addr) in addrs.iter().enumerate() {
            let (client, info) = connect_rank(r, addr, timeouts, token).await?;
            peers.push(info.collective_address);
            devices.push(info.device);
            ranks.push(Rank { addr: addr.clone(), client });
        }
        let world = ranks.len() as u32;
        let kind = choose_rendezvous(&mut ranks, &devices, peers, timeouts).await?;
        let loads = ranks.iter().enumerate().map(|(r, rank)| {
            let mut client = rank.client.clone();
            let req = LoadModelRequest {
                model_path: model_path.to_string(),
                dtype: String::new(),
                rank: r as u32,
                world_size: world,
                rendezvous: Some(Rendezvous { kind: Some(kind.clone()) }),
                kv_cache_bytes,
                block_size,
                group_id: group_id.to_string(),
            };
            let addr = rank.addr.clone();
            async move {
                tokio::time::timeout(timeouts.load, client.load_model(req))
                    .await
                    .map_err(|_| {
                        anyhow!("worker rank {r} at {addr} did not load the model within {:?}", timeouts.load)
                    })?
                    .map_err(|s| anyhow!("worker rank {r} at {addr} could not load the model: {}", s.message()))
                    .map(|x| x.into_inner())
            }
        });
        let replies = futures_util::future::join_all(loads).await;
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for r in replies {
            match r {
                Ok(x) => loaded.push(x),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        let first = &loaded[0];
        let info = ModelInfo {
            vocab_size: first.vocab_size as usize,
            max_position_embeddings: first.max_position_embeddings as usize,
            // The group can only use blocks every rank has.
            num_blocks: loaded.iter().map(|l| l.num_kv_blocks as usize).min().unwrap_or(0),
            block_size: block_size as usize,
            world_size: ranks.len(),
        };
        Ok((ranks, info))
    }

    pub fn addrs(&self) -> Vec<String> {
        self.ranks.iter().map(|r| r.addr.clone()).collect()
    }

    /// Runs a step; with `return_logits` rank 0 also returns the logits rows of the sampled positions.
    /// Sequences the workers already hold go as what changed (`step_delta`); should rank 0 say it holds
    /// some of them not, those are sent again in full, once.
    pub fn step_full(
        &mut self,
        batch: &[StepSeq<'_>],
        return_logits: bool,
    ) -> Result<Vec<(SeqSampled, Vec<f32>)>, StepFailure> {
        if let Some(f) = &self.failed {
            return Err(StepFailure::Retired(f.clone()));
        }
        let finished = std::mem::take(&mut self.finished);
        let mut resent = false;
        loop {
            match self.step_once(batch, &finished, return_logits) {
                Err(Resend(ids)) if !resent => {
                    // Nothing ran, yet `Sent` recorded the whole batch as held: all of it goes again in full.
                    tracing::warn!(sequences = ?ids, "workers hold no state of these sequences: sending the step in full");
                    self.sent.forget(batch.iter().map(|s| s.id));
                    resent = true;
                }
                Err(Resend(ids)) => {
                    return Err(StepFailure::Refused(format!(
                        "worker rank 0 at {} holds no state of sequences {ids:?}, even sent in full",
                        self.ranks[0].addr
                    )));
                }
                Ok(result) => {
                    if result.is_err() {
                        // A refused step fails its sequences, and the workers drop what they held of them.
                        self.sent.forget(batch.iter().map(|s| s.id));
                    }
                    return result;
                }
            }
        }
    }

    /// One try of [`GroupClient::step_full`]; `Err(Resend)` when rank 0 asks for sequences in full.
    fn step_once(
        &mut self,
        batch: &[StepSeq<'_>],
        finished: &[u64],
        return_logits: bool,
    ) -> Result<StepResult, Resend> {
        let calls = self.calls(batch, finished, return_logits);
        // Polled on this thread, with no task to hand each call to.
        let answers = self.rt.block_on(futures_util::future::join_all(calls));
        self.answers(answers)
    }

    /// A step's call to each rank, in rank order, to be polled on the group's runtime.
    fn calls(
        &mut self,
        batch: &[StepSeq<'_>],
        finished: &[u64],
        return_logits: bool,
    ) -> Vec<impl Future<Output = Answer> + Send + 'static> {
        let req = StepRequest {
            step_id: self.next_step,
            sequences: batch.iter().map(|s| self.sent.encode(s)).collect(),
            finished_sequence_ids: finished.to_vec(),
            group_id: self.group_id.clone(),
            return_logits,
        };
        self.next_step += 1;
        let timeout = self.timeouts.step;
        self.ranks
            .iter()
            .map(|rank| {
                let mut client = rank.client.clone();
                let mut req = tonic::Request::new(req.clone());
                tessera_telemetry::inject_current(req.metadata_mut());
                async move { tokio::time::timeout(timeout, client.step(req)).await }
            })
            .collect()
    }

    /// The step's result from every rank's answer, in rank order.
    fn answers(&mut self, answers: Vec<Answer>) -> Result<StepResult, Resend> {
        let timeout = self.timeouts.step;
        let results = answers.into_iter().enumerate();
        let mut errors = Vec::new();
        let mut reply = None;
        let mut timings = vec![WorkerTiming::default(); self.ranks.len()];
        for (r, res) in results {
            let address = self.ranks[r].addr.clone();
            match res {
                Err(_) => errors.push(RankFailure::Timeout { rank: r, address, timeout }),
                // A refused step changed nothing on any rank (they all validate the same batch).
                Ok(Err(s)) if s.code() == Code::InvalidArgument && r == 0 => {
                    return Ok(Err(StepFailure::Refused(format!(
                        "worker rank 0 at {address} refused the step: {}",
                        s.message()
                    ))));
                }
                // Rank 0 holds nothing of some incremental sequences (so neither do its peers, which saw
                // the same steps): nothing ran.
                Ok(Err(s)) if s.code() == Code::FailedPrecondition && r == 0 => {
                    if let Some(ids) = resend_ids(&s) {
                        return Err(Resend(ids));
                    }
                    errors.push(RankFailure::Lost { rank: r, address, message: describe(&s) })
                }
                // A rank that died or is unreachable is the cause; its peers' collective errors follow.
                Ok(Err(s)) if s.code() == Code::Aborted => {
                    errors.push(RankFailure::CollectiveBroken { rank: r, address, message: s.message().to_string() })
                }
                Ok(Err(s)) => errors.push(RankFailure::Lost { rank: r, address, message: describe(&s) }),
                Ok(Ok(x)) => {
                    let x = x.into_inner();
                    timings[r] =
                        WorkerTiming { step_seconds: x.forward_seconds, collective_seconds: x.collective_seconds };
                    if r == 0 {
                        reply = Some(x);
                    }
                }
            }
        }
        if !errors.is_empty() {
            RankFailure::sort(&mut errors);
            let failure = StepFailure::Group(errors);
            self.failed = Some(failure.to_string());
            return Ok(Err(failure));
        }
        let Some(reply) = reply else {
            return Ok(Err(StepFailure::Internal("rank 0 sent no reply".into())));
        };
        self.last = timings;
        self.scores = reply
            .prompt_logprobs
            .iter()
            .map(|p| PromptScores {
                id: p.sequence_id,
                first_position: p.first_position as usize,
                tokens: p.tokens.iter().map(from_proto).collect(),
                ranks: p.ranks.clone(),
            })
            .collect();
        Ok(Ok(reply
            .tokens
            .into_iter()
            .map(|t| (SeqSampled { id: t.sequence_id, sampled: from_proto(&t) }, t.logits))
            .collect()))
    }
}

/// Rank 0 asked for these sequences in full.
struct Resend(Vec<u64>);

/// One rank's answer to a step: its reply, its error, or none within the step deadline.
type Answer = Result<Result<tonic::Response<pb::StepReply>, tonic::Status>, tokio::time::error::Elapsed>;

/// A step's calls, in rank order, under way as tasks on the group's runtime.
type Calls = Vec<tokio::task::JoinHandle<Answer>>;

/// What a step that ran gives: each sampled token with its logits row (when asked for), or how it failed.
type StepResult = Result<Vec<(SeqSampled, Vec<f32>)>, StepFailure>;

fn from_proto(t: &pb::SampledToken) -> Sampled {
    Sampled {
        token: t.token_id,
        logprob: Some(t.logprob),
        top_logprobs: t.top_logprobs.iter().map(|x| (x.token_id, x.logprob)).collect(),
    }
}

impl Backend for GroupClient {
    fn info(&self) -> ModelInfo {
        self.info
    }

    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, StepFailure> {
        Ok(self.step_full(batch, false)?.into_iter().map(|x| x.0).collect())
    }

    fn can_overlap(&self) -> bool {
        true
    }

    fn submit(&mut self, batch: &[StepSeq<'_>]) -> Result<(), StepFailure> {
        if let Some(f) = &self.failed {
            return Err(StepFailure::Retired(f.clone()));
        }
        if self.in_flight.is_some() {
            return Err(StepFailure::Internal("a step was submitted while another is in flight".into()));
        }
        let finished = std::mem::take(&mut self.finished);
        let calls: Calls = self.calls(batch, &finished, false).into_iter().map(|c| self.rt.spawn(c)).collect();
        // The calls go out now, not at `wait`: the runtime runs them only while it is driven, and each takes
        // a few turns (the call, the channel's buffer, the HTTP/2 connection) to reach its socket. The
        // answers then wait in the sockets while the engine loop plans the next step.
        self.rt.block_on(async {
            for _ in 0..FLUSH_TURNS {
                tokio::task::yield_now().await;
            }
        });
        self.in_flight = Some((calls, batch.iter().map(|s| s.id).collect()));
        Ok(())
    }

    fn wait(&mut self) -> Result<Vec<SeqSampled>, StepFailure> {
        let Some((calls, ids)) = self.in_flight.take() else {
            return Err(StepFailure::Internal("no step was submitted".into()));
        };
        let answers = self.rt.block_on(futures_util::future::join_all(calls));
        // A call's task panicked or was cancelled: that rank's answer is lost.
        let answers = answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|e| Ok(Err(tonic::Status::unknown(format!("the step call failed: {e}"))))))
            .collect();
        match self.answers(answers) {
            // Nothing ran: the engine loop sends the step again, these sequences in full.
            Err(Resend(unknown)) => {
                self.sent.forget(ids);
                Err(StepFailure::Resend(unknown))
            }
            Ok(result) => {
                if result.is_err() {
                    self.sent.forget(ids);
                }
                Ok(result?.into_iter().map(|x| x.0).collect())
            }
        }
    }

    fn release(&mut self, ids: &[u64]) {
        self.finished.extend_from_slice(ids);
        self.sent.forget(ids.iter().copied());
    }

    fn last_timings(&self) -> Vec<WorkerTiming> {
        self.last.clone()
    }

    fn take_prompt_scores(&mut self) -> Vec<PromptScores> {
        std::mem::take(&mut self.scores)
    }

    fn load_adapter(&mut self, spec: &AdapterSpec) -> Result<(), String> {
        if self.adapters.contains(&spec.id) {
            return Ok(());
        }
        let adapter =
            LoraAdapter { id: spec.id, name: spec.name.clone(), path: spec.path.clone(), max_rank: spec.max_rank };
        let group_id = self.group_id.clone();
        let loaded = self.on_every_rank("load the adapter", self.timeouts.load, |mut client| {
            let req = LoadAdapterRequest { adapter: Some(adapter.clone()), group_id: group_id.clone() };
            async move { client.load_adapter(req).await.map(drop) }
        });
        match loaded {
            Ok(()) => {
                self.adapters.insert(spec.id);
                Ok(())
            }
            Err(e) => {
                // Ranks that did load it forget it again: a group holds an adapter on every rank or on none.
                let _ = self.unload_adapter(spec.id);
                Err(e)
            }
        }
    }

    fn unload_adapter(&mut self, id: u32) -> Result<(), String> {
        self.adapters.remove(&id);
        let group_id = self.group_id.clone();
        self.on_every_rank("unload the adapter", self.timeouts.connect, |mut client| {
            let req = UnloadAdapterRequest { id, group_id: group_id.clone() };
            async move { client.unload_adapter(req).await.map(drop) }
        })
    }
}

impl GroupClient {
    /// Makes `call` on every rank at once, each within `timeout`; the failures, named by rank, joined.
    fn on_every_rank<F, Fut>(&self, what: &str, timeout: Duration, call: F) -> Result<(), String>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        let calls = self.ranks.iter().enumerate().map(|(r, rank)| {
            let reply = call(rank.client.clone());
            let addr = &rank.addr;
            async move {
                match tokio::time::timeout(timeout, reply).await {
                    Err(_) => Err(format!("worker rank {r} at {addr} did not {what} within {timeout:?}")),
                    Ok(Err(s)) => Err(format!("worker rank {r} at {addr}: {}", s.message())),
                    Ok(Ok(())) => Ok(()),
                }
            }
        });
        let errors: Vec<String> =
            self.rt.block_on(futures_util::future::join_all(calls)).into_iter().filter_map(Result::err).collect();
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}

/// Connects to rank `r` at `addr` and asks its `Info`, refusing a worker of another protocol.
async fn connect_rank(
    r: usize,
    addr: &str,
    timeouts: GroupTimeouts,
    token: &ClusterToken,
) -> Result<(Client, InfoReply)> {
    let endpoint = Channel::from_shared(format!("http://{addr}"))
        .with_context(|| format!("worker address {addr:?}"))?
        .connect_timeout(timeouts.connect)
        .tcp_nodelay(true);
    let channel = tessera_proto::channel::connect(endpoint)
        .await
        .with_context(|| format!("connecting to worker rank {r} at {addr}"))?;
    let mut client = WorkerClient::with_interceptor(channel, token.clone())
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let info = tokio::time::timeout(timeouts.connect, client.info(InfoRequest { create_nccl_id: false }))
        .await
        .map_err(|_| anyhow!("worker rank {r} at {addr} did not answer Info within {:?}", timeouts.connect))?
        .map_err(|s| anyhow!("worker rank {r} at {addr}: {}", describe(&s)))?
        .into_inner();
    if info.protocol != tessera_proto::PROTOCOL_VERSION {
        bail!(
            "worker rank {r} at {addr} speaks {:?}, this coordinator {:?}",
            info.protocol,
            tessera_proto::PROTOCOL_VERSION
        );
    }
    Ok((client, info))
}

/// How a group's ranks meet: NCCL when every rank is on its own GPU and rank 0 can make an NCCL id, the
/// TCP ring otherwise (with a warning when GPUs are involved, since TCP is far slower there).
async fn choose_rendezvous(
    ranks: &mut [Rank],
    devices: &[String],
    peers: Vec<String>,
    timeouts: GroupTimeouts,
) -> Result<Kind> {
    let tcp = Kind::Tcp(TcpRendezvous { peers });
    if ranks.len() < 2 || !devices.iter().all(|d| d.starts_with("cuda:")) {
        return Ok(tcp);
    }
    let host = |r: &Rank| r.addr.rsplit_once(':').map_or(r.addr.clone(), |(h, _)| h.to_string());
    for a in 0..ranks.len() {
        for b in a + 1..ranks.len() {
            if host(&ranks[a]) == host(&ranks[b]) && devices[a] == devices[b] {
                tracing::warn!(
                    "ranks {a} and {b} share {} on {}: NCCL refuses two ranks on one GPU, using TCP collectives",
                    devices[a],
                    host(&ranks[a])
                );
                return Ok(tcp);
            }
        }
    }
    let info = tokio::time::timeout(timeouts.connect, ranks[0].client.info(InfoRequest { create_nccl_id: true }))
        .await
        .map_err(|_| anyhow!("worker rank 0 at {} did not answer Info within {:?}", ranks[0].addr, timeouts.connect))?
        .map_err(|s| anyhow!("worker rank 0 at {}: {}", ranks[0].addr, describe(&s)))?
        .into_inner();
    if info.nccl_unique_id.is_empty() {
        tracing::warn!("rank 0 could not create an NCCL id (see its log): using TCP collectives between GPUs");
        return Ok(tcp);
    }
    Ok(Kind::NcclUniqueId(info.nccl_unique_id))
}
