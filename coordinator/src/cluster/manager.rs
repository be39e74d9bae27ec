//! From registered workers to serving replicas, and back.
//!
//! Every worker is in one state: free, forming a group, serving in one, suspect (it was in a group that
//! failed and has not answered since), or ignored (its record is unusable). Free workers, in id order,
//! are taken `tp` at a time to form a group: rank order is id order, the group is connected and loaded
//! on a thread of its own (loading can take minutes), and added to routing when every rank is ready. A
//! group fails when a worker's record goes away (its lease expired: it died or lost etcd for a TTL) or
//! when its replica fails a step; its in-flight requests move to other replicas (see
//! [`crate::replicas`]) and its workers are probed: those that answer are free again, the others stay out
//! until they answer or their record expires. All state changes happen on one task, one message at a
//! time, so there are no partial updates to reason about.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use tessera_proto::{
    record::{self, WorkerRecord},
    v1::{InfoRequest, worker_client::WorkerClient},
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::{claims, membership::Change};
use crate::{
    engine::group::{GroupClient, GroupTimeouts},
    replicas::Replicas,
    scheduler::SchedulerConfig,
};

/// How long a suspect worker waits between probes.
const PROBE_EVERY: Duration = Duration::from_secs(3);
/// How long formation waits after a claim could not be made.
const CLAIM_RETRY: Duration = Duration::from_secs(1);
/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct ManagerConfig {
    pub cluster: String,
    pub tp: usize,
    /// What workers are told to load (a path they can read, or `builtin:NAME`).
    pub model_path: String,
    /// KV cache per worker (0: the worker decides).
    pub kv_cache_bytes: u64,
    pub block_size: u32,
    pub sched: SchedulerConfig,
    pub eos: Vec<u32>,
    pub timeouts: GroupTimeouts,
    /// Carried on every call to a worker.
    pub token: tessera_proto::auth::ClusterToken,
    /// Makes group ids unique across coordinator restarts.
    pub instance: String,
}

pub enum Msg {
    Membership(Change),
    Formed {
        group: String,
        result: Result<Box<GroupClient>, String>,
    },
    /// A replica failed (reported by its loop, whatever the cause).
    Failed {
        replica: u64,
        reason: String,
    },
    Probed {
        id: String,
        address: String,
        alive: bool,
    },
    /// What the claims session says (claims made, or lost).
    Claims(claims::Answer),
    Tick,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Free,
    Forming(String),
    Serving(String),
    /// Out of formation until a probe answers; `probing` while one is under way.
    Suspect {
        probing: bool,
    },
    Ignored(String),
}

impl State {
    fn label(&self) -> &'static str {
        match self {
            State::Free => "free",
            State::Forming(_) => "forming",
            State::Serving(_) => "serving",
            State::Suspect { .. } => "suspect",
            State::Ignored(_) => "ignored",
        }
    }

    fn group(&self) -> Option<&str> {
        match self {
            State::Forming(g) | State::Serving(g) => Some(g),
            _ => None,
        }
    }
}

struct Worker {
    record: Option<WorkerRecord>,
    state: State,
    /// Groups with this worker that failed to form in a row, the last error, and when it may be tried
    /// again: a worker that answers but cannot load (a wrong model path) is retried with backoff, not in
    /// a loop.
    failed_formations: u32,
    last_error: Option<String>,
    not_before: Option<Instant>,
}

impl Worker {
    fn new(record: Option<WorkerRecord>, state: State) -> Self {
        Worker { record, state, failed_formations: 0, last_error: None, not_before: None }
    }
}

/// Wait before a worker joins another group after `n` failed formations in a row: 1 s doubling to 60 s.
fn formation_backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

struct Group {
    workers: Vec<String>,
    addrs: Vec<String>,
    replica: Option<u64>,
    formed_at: Instant,
}

/// What `/v1/cluster` shows; rebuilt after every change.
pub struct Board {
    pub status: Mutex<serde_json::Value>,
    pub etcd_connected: Arc<AtomicBool>,
}

impl crate::api::ClusterStatus for Board {
    fn status(&self) -> serde_json::Value {
        let mut v = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v["etcd_connected"] = self.etcd_connected.load(Ordering::Relaxed).into();
        v
    }
}

pub struct Manager {
    cfg: ManagerConfig,
    prefix: String,
    claims_prefix: String,
    /// Worker id → the coordinator instance that claimed it (as etcd says).
    claims: HashMap<String, String>,
    claimer: UnboundedSender<claims::Request>,
    /// No groups are formed before this (a claim just failed).
    hold_until: Option<Instant>,
    replicas: Arc<Replicas>,
    workers: BTreeMap<String, Worker>,
    groups: HashMap<String, Group>,
    next_group: u64,
    tx: UnboundedSender<Msg>,
    board: Arc<Board>,
}

impl Manager {
    /// A manager adding replicas to `replicas`; `tx` is the sending side of the channel [`Manager::run`]
    /// reads (membership changes arrive on it, and the manager's own threads report on it).
    pub fn new(
        cfg: ManagerConfig,
        replicas: Arc<Replicas>,
        tx: UnboundedSender<Msg>,
        claimer: UnboundedSender<claims::Request>,
        board: Arc<Board>,
    ) -> Self {
        let hook_tx = tx.clone();
        replicas.set_failure_hook(Box::new(move |replica, reason| {
            let _ = hook_tx.send(Msg::Failed { replica, reason: reason.to_string() });
        }));
        Manager {
            prefix: record::prefix(&cfg.cluster),
            claims_prefix: claims::prefix(&cfg.cluster),
            claims: HashMap::new(),
            claimer,
            hold_until: None,
            cfg,
            replicas,
            workers: BTreeMap::new(),
            groups: HashMap::new(),
            next_group: 1,
            tx,
            board,
        }
    }

    /// Handles messages until every sender is gone. Boxed so that its body is compiled once, in this crate,
    /// rather than again in every crate that awaits it.
    pub fn run(mut self, mut rx: UnboundedReceiver<Msg>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.publish();
            while let Some(m) = rx.recv().await {
                self.handle(m);
                self.form_groups();
                self.publish();
            }
        })
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Membership(Change::Snapshot(kvs)) => {
                let (claims, kvs): (Vec<_>, Vec<_>) =
                    kvs.into_iter().partition(|(k, _)| k.starts_with(self.claims_prefix.as_bytes()));
                self.claims = claims
                    .into_iter()
                    .filter_map(|(k, v)| {
                        let id = record::id_of(&self.claims_prefix, &k)?.to_string();
                        Some((id, String::from_utf8_lossy(&v).into_owned()))
                    })
                    .collect();
                let present: Vec<String> =
                    kvs.iter().filter_map(|(k, _)| record::id_of(&self.prefix, k).map(str::to_string)).collect();
                let gone: Vec<String> = self.workers.keys().filter(|id| !present.contains(id)).cloned().collect();
                for id in gone {
                    self.remove(&id, "is no longer registered");
                }
                for (k, v) in kvs {
                    self.upsert(&k, &v);
                }
            }
            Msg::Membership(Change::Put(k, v)) => {
                if let Some(id) = record::id_of(&self.claims_prefix, &k) {
                    self.claims.insert(id.to_string(), String::from_utf8_lossy(&v).into_owned());
                } else {
                    self.upsert(&k, &v)
                }
            }
            Msg::Membership(Change::Delete(k)) => {
                if let Some(id) = record::id_of(&self.claims_prefix, &k) {
                    self.claims.remove(id);
                } else if let Some(id) = record::id_of(&self.prefix, &k).map(str::to_string) {
                    self.remove(&id, "left (its lease expired or it deregistered)");
                }
            }
            Msg::Claims(claims::Answer::Claimed { group, ok, conflict }) => self.claimed(&group, ok, conflict),
            Msg::Claims(claims::Answer::ClaimLost { worker }) => {
                if let Some(State::Serving(g)) = self.workers.get(&worker).map(|w| w.state.clone()) {
                    self.fail_group(&g, &format!("worker {worker} was claimed by another coordinator"));
                }
            }
            Msg::Formed { group, result } => self.formed(&group, result),
            Msg::Failed { replica, reason } => self.replica_failed(replica, &reason),
            Msg::Probed { id, address, alive } => {
                let Some(w) = self.workers.get_mut(&id) else { return };
                if w.record.as_ref().map(|r| r.address.as_str()) != Some(address.as_str())
                    || !matches!(w.state, State::Suspect { .. })
                {
                    return;
                }
                if alive {
                    tracing::info!(worker = %id, "worker answers again: free");
                    w.state = State::Free;
                } else {
                    w.state = State::Suspect { probing: false };
                    self.tick_after(PROBE_EVERY);
                }
            }
            Msg::Tick => {
                let due: Vec<String> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.state == State::Suspect { probing: false })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in due {
                    self.probe(&id);
                }
            }
        }
    }

    fn upsert(&mut self, key: &[u8], value: &[u8]) {
        let Some(id) = record::id_of(&self.prefix, key).map(str::to_string) else {
            tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring a key that is not a worker record");
            return;
        };
        match record::parse(&self.prefix, key, value) {
            Err(e) => {
                if self.workers.get(&id).is_some_and(|w| w.state == State::Ignored(e.clone())) {
                    return;
                }
                self.remove(&id, "re-registered with a record that cannot be used");
                tracing::warn!(worker = %id, "ignoring worker: {e}");
                self.workers.insert(id, Worker::new(None, State::Ignored(e)));
            }
            Ok(rec) => {
                if let Some(w) = self.workers.get_mut(&id)
                    && let Some(old) = &w.record
                    && old.address == rec.address
                {
                    // The same worker renewing its registration (a new lease after an etcd outage).
                    w.record = Some(rec);
                    return;
                }
                self.remove(&id, "re-registered at another address");
                tracing::info!(worker = %id, address = %rec.address, device = %rec.device, "worker registered");
                self.workers.insert(id, Worker::new(Some(rec), State::Free));
            }
        }
    }

    /// Forgets a worker; a group it serves in fails.
    fn remove(&mut self, id: &str, why: &str) {
        let Some(w) = self.workers.remove(id) else { return };
        if self.claims.get(id) == Some(&self.cfg.instance) {
            let _ = self.claimer.send(claims::Request::Release(vec![id.to_string()]));
        }
        if w.record.is_some() {
            tracing::info!(worker = %id, "worker {why}");
        }
        if let State::Serving(g) = &w.state {
            self.fail_group(g, &format!("worker {id} {why}"));
        }
        // A group still forming notices when it is formed (its workers are checked then).
    }

    fn fail_group(&mut self, group: &str, reason: &str) {
        if let Some(replica) = self.groups.get(group).and_then(|g| g.replica) {
            // The replica's loop hands its requests over, then reports back (Msg::Failed).
            self.replicas.fail(replica, reason);
        }
    }

    fn replica_failed(&mut self, replica: u64, reason: &str) {
        let Some(gid) = self.groups.iter().find(|(_, g)| g.replica == Some(replica)).map(|(id, _)| id.clone()) else {
            return;
        };
        let g = self.groups.remove(&gid).expect("found above");
        tracing::warn!(group = %gid, served_s = g.formed_at.elapsed().as_secs(), "group failed: {reason}");
        // Released: the survivors may as well join another coordinator's group.
        let _ = self.claimer.send(claims::Request::Release(g.workers.clone()));
        for id in g.workers {
            if self.workers.get(&id).is_some_and(|w| w.state == State::Serving(gid.clone())) {
                self.probe(&id);
            }
        }
    }

    /// Marks a worker suspect and asks it, off this task, whether it still answers.
    fn probe(&mut self, id: &str) {
        let Some(w) = self.workers.get_mut(id) else { return };
        let Some(address) = w.record.as_ref().map(|r| r.address.clone()) else { return };
        w.state = State::Suspect { probing: true };
        let tx = self.tx.clone();
        let id = id.to_string();
        let token = self.cfg.token.clone();
        tokio::spawn(async move {
            let alive = tokio::time::timeout(PROBE_TIMEOUT, async {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}")).ok()?;
                let mut c = WorkerClient::with_interceptor(tessera_proto::channel::connect(channel).await.ok()?, token);
                c.info(InfoRequest { create_nccl_id: false }).await.ok()
            })
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get_ref().protocol == tessera_proto::PROTOCOL_VERSION);
            let _ = tx.send(Msg::Probed { id, address, alive });
        });
    }

    fn tick_after(&self, d: Duration) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            let _ = tx.send(Msg::Tick);
        });
    }

    /// Forms as many groups as the free workers allow.
    fn form_groups(&mut self) {
        let now = Instant::now();
        if self.hold_until.is_some_and(|t| now < t) {
            return;
        }
        loop {
            let free: Vec<String> = self
                .workers
                .iter()
                .filter(|(id, w)| {
                    w.state == State::Free
                        && w.not_before.is_none_or(|t| t <= now)
                        && self.claims.get(*id).is_none_or(|o| *o == self.cfg.instance)
                })
                .map(|(id, _)| id.clone())
                .take(self.cfg.tp)
                .collect();
            if free.len() < self.cfg.tp {
                return;
            }
            let gid = format!("{}-g{}", self.cfg.instance, self.next_group);
            self.next_group += 1;
            let addrs: Vec<String> = free
                .iter()
                .map(|id| self.workers[id].record.as_ref().expect("free workers have records").address.clone())
                .collect();
            for id in &free {
                self.workers.get_mut(id).expect("listed").state = State::Forming(gid.clone());
            }
            tracing::info!(group = %gid, workers = ?free, "forming a group");
            let _ = self.claimer.send(claims::Request::Claim { group: gid.clone(), workers: free.clone() });
            self.groups.insert(gid, Group { workers: free, addrs, replica: None, formed_at: Instant::now() });
        }
    }

    /// The claims for a forming group are in: connect and load it, or give its workers back.
    fn claimed(&mut self, gid: &str, ok: bool, conflict: bool) {
        let Some(g) = self.groups.get(gid) else { return };
        if !ok {
            let g = self.groups.remove(gid).expect("found above");
            for id in g.workers {
                if let Some(w) = self.workers.get_mut(&id)
                    && w.state == State::Forming(gid.to_string())
                {
                    w.state = State::Free;
                }
            }
            if conflict {
                tracing::info!(group = %gid, "a worker was claimed by another coordinator first");
            }
            // No new claims for a moment (etcd may be away): the tick retries.
            self.hold_until = Some(Instant::now() + CLAIM_RETRY);
            self.tick_after(CLAIM_RETRY);
            return;
        }
        let (tx, model, kv, block, timeouts, token) = (
            self.tx.clone(),
            self.cfg.model_path.clone(),
            self.cfg.kv_cache_bytes,
            self.cfg.block_size,
            self.cfg.timeouts,
            self.cfg.token.clone(),
        );
        let (gid, addrs) = (gid.to_string(), g.addrs.clone());
        // Connecting and loading block (GroupClient has a runtime of its own): a plain thread.
        std::thread::Builder::new()
            .name("tessera-form".into())
            .spawn(move || {
                let result = GroupClient::connect(&addrs, &model, kv, block, &gid, timeouts, &token)
                    .map(Box::new)
                    .map_err(|e| format!("{e:#}"));
                let _ = tx.send(Msg::Formed { group: gid, result });
            })
            .expect("spawning a thread");
    }

    fn formed(&mut self, gid: &str, result: Result<Box<GroupClient>, String>) {
        let Some(g) = self.groups.get_mut(gid) else { return };
        let intact =
            g.workers.iter().all(|id| self.workers.get(id).is_some_and(|w| w.state == State::Forming(gid.into())));
        match result {
            Ok(client) if intact => {
                let id =
                    self.replicas.add(client, self.cfg.sched, self.cfg.eos.clone(), gid, g.addrs.clone(), Box::new(()));
                g.replica = Some(id);
                tracing::info!(group = %gid, replica = id, load_s = g.formed_at.elapsed().as_secs_f64(), "group serving");
                g.formed_at = Instant::now();
                for w in &g.workers {
                    let w = self.workers.get_mut(w).expect("intact");
                    w.state = State::Serving(gid.to_string());
                    (w.failed_formations, w.last_error, w.not_before) = (0, None, None);
                }
            }
            other => {
                let error = match &other {
                    Err(e) => {
                        tracing::error!(group = %gid, "forming the group failed: {e}");
                        Some(e.clone())
                    }
                    Ok(_) => {
                        tracing::warn!(group = %gid, "a worker left while the group was forming; dropping it");
                        None
                    }
                };
                let g = self.groups.remove(gid).expect("found above");
                let _ = self.claimer.send(claims::Request::Release(g.workers.clone()));
                let mut wait = Duration::ZERO;
                for id in g.workers {
                    let Some(w) = self.workers.get_mut(&id) else { continue };
                    if w.state != State::Forming(gid.into()) {
                        continue;
                    }
                    if let Some(e) = &error {
                        w.failed_formations += 1;
                        w.last_error = Some(e.clone());
                        let d = formation_backoff(w.failed_formations);
                        w.not_before = Some(Instant::now() + d);
                        wait = wait.max(d);
                    }
                    // Whoever answers is free again (after the backoff); whoever does not was the cause.
                    self.probe(&id);
                }
                if !wait.is_zero() {
                    self.tick_after(wait);
                }
            }
        }
    }

    fn publish(&self) {
        let m = &self.replicas.metrics;
        let mut counts: HashMap<&'static str, i64> =
            ["free", "forming", "serving", "suspect", "ignored", "elsewhere"].into_iter().map(|s| (s, 0)).collect();
        let workers: Vec<serde_json::Value> = self
            .workers
            .iter()
            .map(|(id, w)| {
                // A free worker another coordinator claimed serves there.
                let owner = self.claims.get(id).filter(|o| **o != self.cfg.instance);
                let label = if w.state == State::Free && owner.is_some() { "elsewhere" } else { w.state.label() };
                *counts.entry(label).or_default() += 1;
                let mut v = serde_json::json!({
                    "id": id,
                    "state": label,
                    "group": w.state.group(),
                    "claimed_by": self.claims.get(id),
                });
                if let Some(r) = &w.record {
                    v["address"] = r.address.clone().into();
                    v["device"] = r.device.clone().into();
                    v["memory_bytes"] = r.memory_bytes.into();
                    v["version"] = r.version.clone().into();
                }
                if let State::Ignored(why) = &w.state {
                    v["reason"] = why.clone().into();
                }
                if let Some(e) = &w.last_error {
                    v["last_error"] = e.clone().into();
                    v["failed_formations"] = w.failed_formations.into();
                }
                v
            })
            .collect();
        for (state, n) in counts {
            m.cluster_workers.get_or_create(&vec![("state", state)]).set(n);
        }
        let mut groups: Vec<serde_json::Value> = self
            .groups
            .iter()
            .map(|(id, g)| {
                serde_json::json!({
                    "id": id,
                    "state": if g.replica.is_some() { "serving" } else { "forming" },
                    "workers": g.workers,
                    "replica": g.replica,
                })
            })
            .collect();
        groups.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        for state in ["forming", "serving"] {
            let n = groups.iter().filter(|g| g["state"] == state).count();
            m.cluster_groups.get_or_create(&vec![("state", state)]).set(n as i64);
        }
        *self.board.status.lock().unwrap_or_else(|p| p.into_inner()) = serde_json::json!({
            "cluster": self.cfg.cluster,
            "tp": self.cfg.tp,
            "workers": workers,
            "groups": groups,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formation_backoff_doubles_to_a_minute() {
        let d: Vec<u64> = (1..=9).map(|n| formation_backoff(n).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
