//! `tessera coordinator`: the OpenAI-compatible server over every replica that the workers registered in
//! etcd make up (see `tessera_coordinator::cluster`). It serves as soon as it listens; `/ready` turns true when the
//! first group is loaded.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Result, bail};
use clap::Args;

use tessera_coordinator::{
    cluster::{
        self,
        manager::{Board, Manager, ManagerConfig, Msg},
    },
    engine::{backend::ModelInfo, group::GroupTimeouts},
    metrics::Metrics,
    replicas::Replicas,
};
use tessera_proto::{etcd, record};

use crate::serve::{Background, Frontend, HttpArgs};

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// etcd endpoints, comma-separated (host:port or http://host:port).
    #[arg(long, value_name = "URL")]
    pub etcd: String,
    /// Cluster name: workers registered under /tessera/NAME/workers/ are this coordinator's.
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub cluster: String,
    /// Hugging Face model directory or GGUF file, at the same path on the workers (default: the built-in
    /// stories260K, which every worker carries).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Workers per replica (tensor-parallel degree).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub tp: usize,
    /// KV cache per worker in MiB (default: the worker's own setting; on a GPU, what the weights leave).
    #[arg(long, value_name = "MIB")]
    pub kv_cache_mib: Option<usize>,
    /// Seconds a step may take before its group is declared failed and its requests move elsewhere.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub step_timeout: u64,
    /// Seconds this coordinator's claims on its workers outlive it if it dies without releasing them.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub lease_ttl: u64,
    /// Seconds a group may take to load the model.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub load_timeout: u64,
    /// File holding the cluster token sent on every call to a worker (default: the TESSERA_CLUSTER_TOKEN
    /// environment variable); workers started with a token refuse calls without it.
    #[arg(long, value_name = "FILE")]
    pub cluster_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub http: HttpArgs,
}

pub fn run(a: CoordinatorArgs) -> Result<()> {
    if a.tp == 0 {
        bail!("--tp must be at least 1");
    }
    if a.step_timeout == 0 || a.load_timeout == 0 {
        bail!("--step-timeout and --load-timeout must be at least 1 second");
    }
    record::check_name("--cluster", &a.cluster).map_err(anyhow::Error::msg)?;
    let endpoints = etcd::endpoints(&a.etcd);
    if endpoints.is_empty() {
        bail!("--etcd needs at least one endpoint");
    }
    let token = tessera_proto::auth::ClusterToken::resolve(a.cluster_token_file.as_deref())?;
    let (dir, model_path, config) = resolve_model(&a)?;
    let front = Frontend::prepare(a.http.clone(), &dir, a.model.is_none())?;
    let block_size = tessera_worker::kv_cache::DEFAULT_BLOCK_SIZE;
    let info = ModelInfo {
        vocab_size: config.vocab_size,
        max_position_embeddings: config.max_position_embeddings,
        num_blocks: 0,
        block_size,
        world_size: a.tp,
    };
    let replicas = Replicas::new(info, Arc::new(Metrics::new(&front.name)));
    // The workers see the adapters' paths, not this process: each group loads them as it forms.
    front.register_adapters(&replicas, None)?;
    let connected = Arc::new(AtomicBool::new(false));
    let board = Arc::new(Board { status: Mutex::new(serde_json::Value::Null), etcd_connected: connected.clone() });
    let mut cfg = manager_config(&a, &front, model_path, config.max_position_embeddings, block_size);
    cfg.token = token;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (claim_tx, claim_rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let session = cluster::claims::Session {
        endpoints: endpoints.clone(),
        cluster: a.cluster.clone(),
        me: cfg.instance.clone(),
        ttl: Duration::from_secs(a.lease_ttl.max(1)),
    };
    // Workers and claims: one watch over the cluster's whole prefix.
    let root = format!("/tessera/{}/", a.cluster);
    let replicas2 = replicas.clone();
    let board2 = board.clone();
    let run = Box::pin(async move {
        let manager = Manager::new(cfg, replicas2, tx.clone(), claim_tx, board2);
        let answers = tx.clone();
        let report: cluster::claims::Report = Box::new(move |answer| {
            let _ = answers.send(Msg::Claims(answer));
        });
        tokio::spawn(cluster::claims::run(session, claim_rx, report, stop_rx, done_tx));
        let (ctx, mut crx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(cluster::membership::watch(endpoints, root, ctx, connected));
        tokio::spawn(async move {
            while let Some(c) = crx.recv().await {
                if tx.send(Msg::Membership(c)).is_err() {
                    return;
                }
            }
        });
        manager.run(rx).await;
    });
    // Stopping: give the workers back at once (the lease is revoked) rather than a TTL later.
    let on_shutdown = Box::pin(async move {
        let _ = stop_tx.send(true);
        let _ = done_rx.await;
    });
    let banner = format!("tessera coordinator for cluster {:?} serving {} (tp = {})", a.cluster, front.name, a.tp);
    front.run(replicas, Some(board), &banner, Some(Background { run, on_shutdown }))
}

/// The model directory this process reads (the tokenizer, the config), the path the workers are told to
/// load (the same path on a shared volume, or the built-in model's name), and its config, checked against
/// `--tp` before any worker is asked to load it.
fn resolve_model(a: &CoordinatorArgs) -> Result<(PathBuf, String, tessera_worker::ModelConfig)> {
    let (dir, model_path) = match &a.model {
        Some(d) => {
            let abs = std::fs::canonicalize(d).map_err(|e| anyhow::anyhow!("--model {}: {e}", d.display()))?;
            (d.clone(), abs.to_string_lossy().into_owned())
        }
        None => (crate::default_model::path()?, crate::default_model::BUILTIN.to_string()),
    };
    let config = tessera_worker::Model::config_at(&dir)?;
    tessera_worker::model::ShardLayout::new(&config, tessera_worker::model::Shard { rank: 0, world: a.tp })?;
    Ok((dir, model_path, config))
}

/// The group manager's settings. Group ids carry a per-start instance tag, which is also the owner of this
/// coordinator's claims.
fn manager_config(
    a: &CoordinatorArgs,
    front: &Frontend,
    model_path: String,
    max_position_embeddings: usize,
    block_size: usize,
) -> ManagerConfig {
    let instance = format!(
        "{:x}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
            & 0xff_ffff_ffff
    );
    ManagerConfig {
        cluster: a.cluster.clone(),
        tp: a.tp,
        model_path,
        kv_cache_bytes: a.kv_cache_mib.map_or(0, |m| (m as u64).saturating_mul(1 << 20)),
        block_size: block_size as u32,
        // The workers are processes of their own, on other machines as a rule.
        sched: front.scheduler_config(max_position_embeddings, false),
        eos: front.tokenizer.eos_token_ids.clone(),
        timeouts: GroupTimeouts {
            connect: Duration::from_secs(10),
            load: Duration::from_secs(a.load_timeout),
            step: Duration::from_secs(a.step_timeout),
        },
        token: Default::default(),
        instance,
    }
}
