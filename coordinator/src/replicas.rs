//! The replicas a server routes requests over, and what happens when one fails.
//!
//! Each replica is a model copy (one process, or a tensor-parallel group of workers) with its own engine
//! loop. `tessera serve` has one; `tessera coordinator` adds and removes them as groups form and fail.
//! A request goes to the replica with the fewest outstanding tokens (prompt + `max_tokens` of everything
//! routed to it and not finished), unless a replica recently served the same prompt prefix and is not
//! much busier: then it goes there, where the prefix is likely still in the KV cache.
//!
//! When a replica's step fails (a worker died, a collective broke, the step deadline passed) or the cluster
//! manager fails it (a lease expired), its loop hands every sequence it held back here as a [`Migrant`]:
//! prompt, tokens produced so far, and the handler's channel. Each goes to a healthy replica, which
//! recomputes the prompt and those tokens and carries on producing into the same stream, so the client
//! sees no token lost or repeated. With no healthy replica, each ends with an error, unless a replacement
//! is on its way ([`Replicas::expect_replacements`], `tessera serve` restarting its one replica): then the
//! sequences wait for it, and go on there. The failed replica is out of routing before its loop collects
//! its sequences, so nothing can be sent to it in between. Whoever replaces replicas says when it cannot
//! ([`Replicas::give_up`]): from then on the process can never serve again, and `/health` says so.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use crate::{
    engine::{
        backend::{Backend, ModelInfo},
        contract::{FinishReason, GenRequest, seq_id},
        engine_loop,
        link::{Command, Hub, LoopHost, Migrant, ReplicaStats},
        postman::Postman,
    },
    lora::{AdapterSpec, Adapters, LoraError},
    metrics::Metrics,
    scheduler::{SchedulerConfig, block_hash, prefix_root},
};

/// A replica with this many times (plus one step's budget) the least busy one's outstanding tokens is
/// "much busier": prefix affinity gives way to load.
const AFFINITY_SLACK: i64 = 2;
/// Prompt blocks remembered for affinity (oldest forgotten first).
const AFFINITY_CAPACITY: usize = 65_536;
/// Blocks of a prompt's prefix considered for affinity.
const AFFINITY_BLOCKS: usize = 16;

struct Replica {
    id: u64,
    /// Group id (or "local"), shown in metrics and `/v1/cluster`.
    name: String,
    workers: Vec<String>,
    tx: mpsc::Sender<Command>,
    stats: Arc<ReplicaStats>,
    info: ModelInfo,
}

/// A replica as `/v1/cluster` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaView {
    pub id: u64,
    pub group: String,
    pub workers: Vec<String>,
    pub running: usize,
    pub waiting: usize,
    pub outstanding_tokens: i64,
    pub requests: u64,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
}

/// Told when a replica fails, so that its workers can go back to the free pool.
pub type FailureHook = Box<dyn Fn(u64, &str) + Send + Sync>;

pub struct Replicas {
    live: Mutex<Vec<Replica>>,
    affinity: Mutex<Affinity>,
    next_request: AtomicU64,
    next_replica: AtomicU64,
    pub metrics: Arc<Metrics>,
    /// The model's shape; `num_blocks` comes from the live replicas.
    model: ModelInfo,
    on_failure: Mutex<Option<FailureHook>>,
    /// Sequences of failed replicas waiting for a replacement, once replacements are expected.
    parked: Mutex<Parking>,
    /// The LoRA adapters served over the model: every replica loads them.
    pub adapters: Adapters,
    /// Delivers every replica's events, and the failover path's.
    postman: Postman,
}

#[derive(Default)]
struct Parking {
    /// A failed replica will be replaced: its sequences wait rather than fail.
    expected: bool,
    /// Why replicas can no longer be replaced, once that is so.
    gave_up: Option<String>,
    migrants: Vec<Migrant>,
}

impl Replicas {
    /// No replica yet; `model` gives the vocabulary, context and block size every replica will have.
    pub fn new(model: ModelInfo, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Replicas {
            live: Mutex::new(Vec::new()),
            affinity: Mutex::new(Affinity::default()),
            next_request: AtomicU64::new(1),
            next_replica: AtomicU64::new(1),
            metrics,
            model,
            on_failure: Mutex::new(None),
            parked: Mutex::new(Parking::default()),
            adapters: Adapters::default(),
            postman: Postman::start(),
        })
    }

    /// From now on a replica that fails will be replaced: with no healthy replica left, its sequences wait
    /// for the replacement ([`Replicas::add`]) instead of failing, until [`Replicas::give_up`].
    pub fn expect_replacements(&self) {
        self.parking().expected = true;
    }

    /// No replica will be added any more (restarting failed for good): sequences waiting for one end with
    /// `reason`, and [`Replicas::gave_up`] reports it.
    pub fn give_up(&self, reason: &str) {
        let waiting = {
            let mut p = self.parking();
            p.expected = false;
            p.gave_up = Some(reason.to_string());
            std::mem::take(&mut p.migrants)
        };
        tracing::error!("no replica can be started any more: {reason}");
        for m in waiting {
            self.metrics.request_failure.get_or_create(&vec![("kind", "backend")]).inc();
            m.fail(&format!("no replica can be started any more ({reason})"), &self.postman);
        }
    }

    /// Why this process can never serve again, if it cannot (liveness).
    pub fn gave_up(&self) -> Option<String> {
        self.parking().gave_up.clone()
    }

    fn parking(&self) -> std::sync::MutexGuard<'_, Parking> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_failure_hook(&self, hook: FailureHook) {
        *self.on_failure.lock().expect("hook lock") = Some(hook);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Replica>> {
        // The routing table is plain data and every update leaves it consistent: a panic elsewhere while
        // holding the lock does not make it unusable.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts an engine loop on `backend` and routes requests to it; returns the replica's id.
    pub fn add(
        self: &Arc<Self>,
        backend: Box<dyn Backend>,
        cfg: SchedulerConfig,
        eos: Vec<u32>,
        name: &str,
        workers: Vec<String>,
        keep_alive: Box<dyn Send>,
    ) -> u64 {
        let id = self.next_replica.fetch_add(1, Ordering::Relaxed);
        let info = backend.info();
        let stats = Arc::new(ReplicaStats::default());
        stats.blocks_total.store(info.num_blocks, Ordering::Relaxed);
        let tx = engine_loop::spawn(
            backend,
            cfg,
            eos,
            self.metrics.clone(),
            keep_alive,
            Hub { replica: id, stats: stats.clone(), host: self.clone(), postman: self.postman.clone() },
        );
        let mut live = self.lock();
        // Under the routing lock, as `load_adapter` registers an adapter and walks the replicas: an adapter
        // registered before this point is queued to the new loop here, one registered after finds the
        // replica in the list. The loop loads them before any request (its channel keeps order), on its
        // own thread: a group's load is a blocking RPC, and this may be called from a runtime.
        for spec in self.adapters.specs() {
            let (reply, _) = tokio::sync::oneshot::channel();
            let _ = tx.send(Command::LoadAdapter(spec, reply));
        }
        live.push(Replica { id, name: name.to_string(), workers, tx, stats, info });
        drop(live);
        tracing::info!(replica = id, group = name, "replica serving");
        self.refresh_gauges();
        let waiting = std::mem::take(&mut self.parking().migrants);
        if !waiting.is_empty() {
            tracing::info!(replica = id, sequences = waiting.len(), "sequences that waited for a replica go on");
            self.adopt_migrants(waiting, "the replica they waited for failed too");
        }
        id
    }

    /// Loads the LoRA adapter at `path` as `name` on every live replica (and on every replica that joins
    /// later), and makes it usable once all have it; `base` is the model's own name, which no adapter may
    /// take. A replica that fails to load it leaves the adapter unregistered and loaded nowhere.
    pub async fn load_adapter(&self, name: &str, path: &str, base: &str) -> Result<AdapterSpec, LoraError> {
        let (spec, waits) = {
            // Registered and sent under the routing lock: see `add`.
            let live = self.lock();
            let spec = self.adapters.reserve(name, path, base)?;
            let mut waits = Vec::new();
            for r in live.iter() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if r.tx.send(Command::LoadAdapter(spec.clone(), tx)).is_ok() {
                    waits.push((r.name.clone(), rx));
                }
            }
            (spec, waits)
        };
        let mut error = None;
        for (replica, rx) in waits {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error = error.or(Some(e)),
                // The loop ended (a failed replica): it serves nothing, so it needs no adapter.
                Err(_) => tracing::warn!(replica, "a replica stopped while loading an adapter"),
            }
        }
        if let Some(e) = error {
            self.adapters.remove_id(name, spec.id);
            self.broadcast(|| Command::UnloadAdapter(spec.id));
            return Err(LoraError::Load(name.to_string(), e));
        }
        if !self.adapters.ready(name, spec.id) {
            // Unloaded while it loaded: the unload has already been sent.
            return Err(LoraError::NotFound(name.to_string()));
        }
        Ok(spec)
    }

    /// Stops routing requests to adapter `name`; each replica unloads it once its sequences of it finish.
    pub fn unload_adapter(&self, name: &str) -> Result<AdapterSpec, LoraError> {
        let spec = self.adapters.remove(name)?;
        self.broadcast(|| Command::UnloadAdapter(spec.id));
        Ok(spec)
    }

    fn broadcast(&self, command: impl Fn() -> Command) {
        for r in self.lock().iter() {
            let _ = r.tx.send(command());
        }
    }

    pub fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// The model's shape; `num_blocks` is the smallest pool of the live replicas (0 with none).
    pub fn info(&self) -> ModelInfo {
        let live = self.lock();
        let mut info = self.model;
        info.num_blocks = live.iter().map(|r| r.info.num_blocks).min().unwrap_or(0);
        if let Some(r) = live.first() {
            info.world_size = r.info.world_size;
        }
        info
    }

    /// Some replica is taking requests.
    pub fn is_ready(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Sequences waiting for a slot, over every replica.
    pub fn queued(&self) -> usize {
        self.lock().iter().map(|r| r.stats.waiting.load(Ordering::Relaxed)).sum()
    }

    pub fn view(&self) -> Vec<ReplicaView> {
        self.lock()
            .iter()
            .map(|r| ReplicaView {
                id: r.id,
                group: r.name.clone(),
                workers: r.workers.clone(),
                running: r.stats.running.load(Ordering::Relaxed),
                waiting: r.stats.waiting.load(Ordering::Relaxed),
                outstanding_tokens: r.stats.outstanding_tokens.load(Ordering::Relaxed),
                requests: r.stats.requests.load(Ordering::Relaxed),
                kv_blocks_used: r.stats.blocks_used.load(Ordering::Relaxed),
                kv_blocks_total: r.stats.blocks_total.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Queues a request on a replica; false if none takes it.
    pub fn submit(&self, req: GenRequest) -> bool {
        let charge = ((req.prompt.len() + req.max_tokens) * req.n) as i64;
        let hashes = prefix_hashes(prefix_root(req.adapter), &req.prompt, self.model.block_size);
        let mut live = self.lock();
        let mut cmd = Command::Submit(Box::new(req), std::time::Instant::now());
        let mut dead = Vec::new();
        let sent = loop {
            let Some(i) = self.choose(&live, &hashes) else { break false };
            let r = &live[i];
            r.stats.outstanding_tokens.fetch_add(charge, Ordering::Relaxed);
            r.stats.requests.fetch_add(1, Ordering::Relaxed);
            let (n, flow) = match &cmd {
                Command::Submit(q, _) => (q.n, q.flow.clone()),
                _ => (1, None),
            };
            r.stats.waiting.fetch_add(n, Ordering::Relaxed);
            match r.tx.send(cmd) {
                Ok(()) => {
                    // After the send: a loop that pauses for it finds the request in its channel.
                    if !r.stats.lock_flows().contains(&flow) {
                        r.stats.newcomer.store(true, Ordering::Release);
                    }
                    self.metrics.replica_requests.get_or_create(&vec![("replica", r.name.clone())]).inc();
                    self.affinity.lock().unwrap_or_else(|p| p.into_inner()).record(&hashes, r.id);
                    break true;
                }
                // A failing loop leaves routing before it lets go of its channel, so a closed channel here
                // means the loop died (a panic): retire it and try another.
                Err(mpsc::SendError(c)) => {
                    cmd = c;
                    dead.push(live.remove(i));
                }
            }
        };
        drop(live);
        self.retire_dead(dead);
        sent
    }

    fn retire_dead(&self, dead: Vec<Replica>) {
        for r in dead {
            self.retire(r.id, r.name, "its engine loop stopped unexpectedly");
        }
    }

    /// The replica for a request: least outstanding tokens, or the one that served its prefix unless that
    /// one is much busier.
    fn choose(&self, live: &[Replica], hashes: &[u64]) -> Option<usize> {
        let load = |r: &Replica| r.stats.outstanding_tokens.load(Ordering::Relaxed);
        // Ties (idle replicas) go to the one that has had fewest requests, so sequential requests spread too.
        let least = (0..live.len())
            .min_by_key(|&i| (load(&live[i]), live[i].stats.requests.load(Ordering::Relaxed), live[i].id))?;
        if live.len() == 1 || hashes.is_empty() {
            return Some(least);
        }
        let preferred = self.affinity.lock().unwrap_or_else(|p| p.into_inner()).lookup(hashes);
        if let Some(p) = preferred.and_then(|id| live.iter().position(|r| r.id == id)) {
            let slack = AFFINITY_SLACK * load(&live[least]) + self.model.block_size as i64 * 128;
            if load(&live[p]) <= slack {
                return Some(p);
            }
        }
        Some(least)
    }

    /// Stops a choice wherever it runs (the handler saw a stop string, or gave up on it).
    pub fn abort(&self, request: u64, choice: usize, reason: Option<FinishReason>) {
        let seq = seq_id(request, choice);
        for r in self.lock().iter() {
            let _ = r.tx.send(Command::Abort { seq, reason });
        }
    }

    /// Fails a replica from outside (its group lost a worker): its loop hands its sequences over.
    pub fn fail(&self, replica: u64, reason: &str) {
        if let Some(r) = self.lock().iter().find(|r| r.id == replica) {
            let _ = r.tx.send(Command::Fail(reason.to_string()));
        }
    }

    /// Called by a failing replica's loop before it collects its sequences: from here on nothing is routed
    /// to it.
    fn remove_failed(&self, replica: u64, reason: &str) {
        let name = {
            let mut live = self.lock();
            let Some(i) = live.iter().position(|r| r.id == replica) else { return };
            live.remove(i).name
        };
        self.retire(replica, name, reason);
    }

    /// What follows a replica's removal from routing: log, metrics, and the failure hook.
    fn retire(&self, replica: u64, name: String, reason: &str) {
        tracing::error!(replica, group = %name, "replica failed: {reason}");
        self.metrics.replica_failures.inc();
        self.metrics.replica_outstanding_tokens.remove(&vec![("replica", name)]);
        self.refresh_gauges();
        if let Some(hook) = &*self.on_failure.lock().unwrap_or_else(|p| p.into_inner()) {
            hook(replica, reason);
        }
    }

    /// Sequences of a failed replica: each continues on a healthy replica, or ends with an error.
    fn adopt_migrants(&self, migrants: Vec<Migrant>, reason: &str) {
        let mut live = self.lock();
        let mut dead = Vec::new();
        for m in migrants {
            if m.events_closed() {
                continue;
            }
            let charge = m.charge();
            let mut cmd = Command::Adopt(Box::new(m));
            loop {
                let least = (0..live.len())
                    .min_by_key(|&i| (live[i].stats.outstanding_tokens.load(Ordering::Relaxed), live[i].id));
                let Some(i) = least else {
                    let Command::Adopt(m) = cmd else { break };
                    let mut parking = self.parking();
                    if parking.expected {
                        parking.migrants.push(*m);
                    } else {
                        drop(parking);
                        self.metrics.request_failure.get_or_create(&vec![("kind", "backend")]).inc();
                        m.fail(&format!("no healthy replica is left ({reason})"), &self.postman);
                    }
                    break;
                };
                let r = &live[i];
                r.stats.outstanding_tokens.fetch_add(charge, Ordering::Relaxed);
                r.stats.waiting.fetch_add(1, Ordering::Relaxed);
                match r.tx.send(cmd) {
                    Ok(()) => {
                        self.metrics.migrated_sequences.inc();
                        break;
                    }
                    Err(mpsc::SendError(c)) => {
                        cmd = c;
                        dead.push(live.remove(i));
                    }
                }
            }
        }
        drop(live);
        self.retire_dead(dead);
    }

    /// Sets the summed gauges from every live replica's stats. Loops call it after publishing their own,
    /// before sending the step's events, so a client that sees its response complete also sees it counted.
    fn refresh_gauges(&self) {
        let live = self.lock();
        let m = &self.metrics;
        let sum = |f: fn(&ReplicaStats) -> usize| live.iter().map(|r| f(&r.stats)).sum::<usize>();
        m.num_requests_running.set(sum(|s| s.running.load(Ordering::Relaxed)) as i64);
        m.num_requests_waiting.set(sum(|s| s.waiting.load(Ordering::Relaxed)) as i64);
        let total = sum(|s| s.blocks_total.load(Ordering::Relaxed));
        let used = sum(|s| s.blocks_used.load(Ordering::Relaxed));
        m.kv_cache_usage_perc.set(if total == 0 { 0.0 } else { used as f64 / total as f64 });
        m.replicas_serving.set(live.len() as i64);
        for r in live.iter() {
            m.replica_outstanding_tokens
                .get_or_create(&vec![("replica", r.name.clone())])
                .set(r.stats.outstanding_tokens.load(Ordering::Relaxed));
        }
    }
}

/// What a replica's loop reports: routing stays here, the loop only says what happened.
impl LoopHost for Replicas {
    fn withdraw(&self, replica: u64, reason: &str) {
        self.remove_failed(replica, reason);
    }

    fn adopt(&self, migrants: Vec<Migrant>, reason: &str) {
        self.adopt_migrants(migrants, reason);
    }

    fn stats_changed(&self) {
        self.refresh_gauges();
    }
}

/// Chained hashes of a prompt's first full blocks (the prefix cache's own keys).
fn prefix_hashes(root: u64, prompt: &[u32], block_size: usize) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut prev = root;
    prompt
        .chunks_exact(block_size)
        .take(AFFINITY_BLOCKS)
        .map(|b| {
            prev = block_hash(prev, b);
            prev
        })
        .collect()
}

/// Which replica last served each prompt prefix block.
#[derive(Default)]
struct Affinity {
    owner: HashMap<u64, (u64, u64)>,
    clock: u64,
}

impl Affinity {
    /// The replica that served the longest of these prefixes.
    fn lookup(&self, hashes: &[u64]) -> Option<u64> {
        hashes.iter().rev().find_map(|h| self.owner.get(h).map(|&(r, _)| r))
    }

    fn record(&mut self, hashes: &[u64], replica: u64) {
        self.clock += 1;
        for &h in hashes {
            self.owner.insert(h, (replica, self.clock));
        }
        if self.owner.len() > AFFINITY_CAPACITY {
            // Forget the older half at once: amortised O(1) per insert.
            let mut ages: Vec<u64> = self.owner.values().map(|&(_, t)| t).collect();
            let mid = ages.len() / 2;
            let (_, &mut cut, _) = ages.select_nth_unstable(mid);
            self.owner.retain(|_, &mut (_, t)| t > cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::WorkerTiming;
    use tessera_proto::step::{SamplingParams, SeqSampled, StepSeq};

    /// A backend whose first step panics, killing its engine loop (on a compute pool's thread when
    /// `on_cpu`, as an in-process CPU engine's loop runs, or on a thread of its own).
    struct Panics {
        on_cpu: bool,
    }

    impl Backend for Panics {
        fn info(&self) -> ModelInfo {
            ModelInfo { vocab_size: 32, max_position_embeddings: 64, num_blocks: 8, block_size: 4, world_size: 1 }
        }
        fn step(&mut self, _: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, crate::engine::backend::StepFailure> {
            panic!("a bug in the backend");
        }
        fn release(&mut self, _: &[u64]) {}
        fn last_timings(&self) -> Vec<WorkerTiming> {
            Vec::new()
        }
        fn computes_on_cpu(&self) -> bool {
            self.on_cpu
        }
    }

    fn request(r: &Replicas) -> (GenRequest, tokio::sync::mpsc::UnboundedReceiver<crate::engine::contract::Event>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = GenRequest {
            ignore_eos: true,
            ..GenRequest::one(r.next_request_id(), vec![1, 2, 3], SamplingParams::greedy(), 4, tx)
        };
        (req, rx)
    }

    #[test]
    fn a_replica_whose_loop_died_is_retired_and_reported() {
        for on_cpu in [false, true] {
            a_replica_whose_loop_died(on_cpu);
        }
    }

    fn a_replica_whose_loop_died(on_cpu: bool) {
        let info = Panics { on_cpu }.info();
        let r = Replicas::new(info, Arc::new(Metrics::new("m")));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let seen = failed.clone();
        r.set_failure_hook(Box::new(move |id, why| seen.lock().unwrap().push((id, why.to_string()))));
        let cfg = SchedulerConfig { max_num_seqs: 4, max_batched_tokens: 64, max_model_len: 64, overlap: true };
        let id = r.add(Box::new(Panics { on_cpu }), cfg, vec![], "g1", vec![], Box::new(()));
        let (req, mut rx) = request(&r);
        assert!(r.submit(req));
        // The loop panics in its first step: the request's channel closes without an event.
        assert_eq!(rx.blocking_recv(), None);
        assert!(r.is_ready(), "nothing has noticed yet");
        let (req, _rx) = request(&r);
        assert!(!r.submit(req), "no replica is left to take it");
        assert!(!r.is_ready());
        assert_eq!(*failed.lock().unwrap(), [(id, "its engine loop stopped unexpectedly".to_string())]);
        assert_eq!(r.metrics.replica_failures.get(), 1);
    }

    #[test]
    fn affinity_finds_the_longest_served_prefix() {
        let mut a = Affinity::default();
        let p: Vec<u32> = (0..64).collect();
        let h = prefix_hashes(0, &p, 16);
        assert_eq!(h.len(), 4);
        a.record(&h[..2], 7);
        a.record(&h, 9);
        assert_eq!(a.lookup(&h), Some(9));
        let mut other = p.clone();
        other[40] = 1000;
        let h2 = prefix_hashes(0, &other, 16);
        assert_eq!(h2[..2], h[..2]);
        assert_ne!(h2[2], h[2]);
        // Shares two blocks with a prompt replica 9 served last.
        assert_eq!(a.lookup(&h2), Some(9));
        assert_eq!(a.lookup(&prefix_hashes(0, &[5; 32], 16)), None);
        assert!(prefix_hashes(0, &p[..15], 16).is_empty());
    }

    #[test]
    fn affinity_forgets_the_oldest_when_full() {
        let mut a = Affinity::default();
        for i in 0..(AFFINITY_CAPACITY as u64 + 1) {
            a.record(&[i], i);
        }
        assert!(a.owner.len() <= AFFINITY_CAPACITY / 2 + 1);
        assert_eq!(a.lookup(&[AFFINITY_CAPACITY as u64]), Some(AFFINITY_CAPACITY as u64));
        assert_eq!(a.lookup(&[0]), None);
    }
}
