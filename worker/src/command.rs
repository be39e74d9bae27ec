//! The `tessera worker` command: one worker process serving the `tessera.v1.Worker` gRPC service.
//!
//! It binds its gRPC and collective listeners first, then prints one line with both addresses on stdout
//! (`tessera worker listening on GRPC collectives on COLL`), which is how a parent that asked for port 0
//! learns where it is. With `--exit-with-parent` it exits when its standard input closes, so a local
//! cluster's workers never outlive the process that started them, however that process ends. With a cluster
//! token, calls without it are refused (`UNAUTHENTICATED`) and logged.

use std::{future::Future, io::Write, net::SocketAddr, pin::Pin, time::Duration};

use anyhow::{Context, Result};
use clap::Args;
use tessera_proto::{
    auth::{ClusterToken, Guard},
    v1::worker_server::WorkerServer,
};
use tokio::net::TcpListener;
use tonic::{service::interceptor::InterceptedService, transport::server::TcpIncoming};

use crate::server::{LocateModel, WorkerConfig, WorkerService};

/// A model `LoadModel` accepts by name instead of a path (`builtin:stories260K`), and how to find it.
pub type BuiltinModel = (&'static str, LocateModel);

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Address for the gRPC service (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50051", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Address for TCP collective peers (default: the --listen IP, any free port).
    #[arg(long, value_name = "ADDR")]
    pub collective_listen: Option<SocketAddr>,
    /// Compute device: `cpu` or `cuda:N` (CUDA's driver, NVRTC and cuBLAS are loaded at start).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Compute threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// KV cache budget in MiB when the coordinator does not set one.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub kv_cache_mib: usize,
    /// Seconds a collective may wait on a peer before the group is declared failed.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub collective_timeout: u64,
    /// etcd endpoints (comma-separated): register this worker for a `tessera coordinator` to find.
    #[arg(long, value_name = "URL")]
    pub etcd: Option<String>,
    /// Cluster name to register under (/tessera/NAME/workers/ID).
    #[arg(long, default_value = "default", value_name = "NAME", requires = "etcd")]
    pub cluster: String,
    /// Worker id in the cluster (default: the advertised address).
    #[arg(long, value_name = "ID", requires = "etcd")]
    pub id: Option<String>,
    /// Address the coordinator and peers reach this worker at (host:port of --listen; required when
    /// --listen is a wildcard like 0.0.0.0). Collective peers use the same host.
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Seconds the registration outlives this worker if it dies without deregistering.
    #[arg(long, default_value_t = 10, value_name = "SECONDS", requires = "etcd")]
    pub lease_ttl: u64,
    /// File holding the cluster token that every call to this worker and every collective peer must carry
    /// (default: the TESSERA_CLUSTER_TOKEN environment variable; without either, anyone who reaches the
    /// ports is served).
    #[arg(long, value_name = "FILE")]
    pub cluster_token_file: Option<std::path::PathBuf>,
    /// Quantize a model directory's matrices as they load: q8_0, q4_0 or q4_k (llama.cpp's block formats;
    /// the output projection takes Q6_K for q4_0 and q4_k); on a GPU the blocks are uploaded. GGUF files
    /// run as they are.
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<crate::quantize::QuantizeTo>,
    /// Exit when standard input closes (used by `--tp N` local clusters).
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
}

pub fn run(a: WorkerArgs, builtin_models: Vec<BuiltinModel>) -> Result<()> {
    let device: tessera_kernels::Device = a.device.parse()?;
    tessera_kernels::ensure_available(device)?;
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting the thread count")?;
    }
    if a.exit_with_parent {
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            tracing::info!("parent went away: exiting");
            std::process::exit(0);
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(a, builtin_models))
}

async fn serve(a: WorkerArgs, builtin_models: Vec<BuiltinModel>) -> Result<()> {
    let grpc = TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
    let coll_addr = a.collective_listen.unwrap_or_else(|| SocketAddr::new(a.listen.ip(), 0));
    let coll = TcpListener::bind(coll_addr).await.with_context(|| format!("binding {coll_addr}"))?;
    let (grpc_addr, coll_addr) = (grpc.local_addr()?, coll.local_addr()?);
    let advertise = match &a.advertise {
        Some(x) => x.clone(),
        None if grpc_addr.ip().is_unspecified() => {
            anyhow::bail!("--listen {grpc_addr} is a wildcard address: give --advertise HOST:PORT")
        }
        None => grpc_addr.to_string(),
    };
    let host = advertise.rsplit_once(':').map(|(h, _)| h.to_string()).context("--advertise must be HOST:PORT")?;
    let coll_advertise = match (&a.advertise, coll_addr.ip().is_unspecified()) {
        (Some(_), _) | (None, true) => format!("{host}:{}", coll_addr.port()),
        (None, false) => coll_addr.to_string(),
    };
    let device: tessera_kernels::Device = a.device.parse()?;
    let token = cluster_token(&a)?;
    let config = WorkerConfig {
        device,
        kv_cache_bytes: a
            .kv_cache_mib
            .checked_mul(1 << 20)
            .context("--kv-cache-mib is more memory than this machine can address")?,
        collective_timeout: Duration::from_secs(a.collective_timeout.max(1)),
        builtin_models,
        token: token.clone(),
        quantize: a.quantize,
    };
    let service = WorkerService::new(config, coll, coll_advertise.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let registration = match &a.etcd {
        Some(etcd) => {
            let reg = registration(&a, etcd, &advertise, device, service.memory_bytes())?;
            Some(tokio::spawn(crate::registration::run(reg, stop_rx)))
        }
        None => None,
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "tessera worker listening on {grpc_addr} collectives on {coll_addr}")?;
        out.flush()?;
    }
    tracing::info!(%grpc_addr, %coll_addr, "worker serving");
    // On SIGINT/SIGTERM: leave the cluster first (the coordinator moves this worker's requests at once
    // instead of a step later), then stop serving. Graceful shutdown would wait for the coordinator to
    // close its connection, which it never does: give in-flight calls a moment, then go.
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let leave = async move {
        shutdown_signal().await;
        if let Some(r) = registration {
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(3), r).await;
        }
        let _ = signalled_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .layer(tessera_telemetry::TraceContextLayer)
        .add_service(InterceptedService::new(
            WorkerServer::new(service).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20),
            Guard::new(token),
        ))
        .serve_with_incoming_shutdown(TcpIncoming::from(grpc).with_nodelay(Some(true)), leave);
    let grace = async {
        if signalled_rx.await.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server => r.context("serving gRPC")?,
        _ = grace => tracing::info!("stopped"),
    }
    Ok(())
}

/// The token callers must carry (`--cluster-token-file`, else the environment); without one, a warning.
fn cluster_token(a: &WorkerArgs) -> Result<ClusterToken> {
    let token = ClusterToken::resolve(a.cluster_token_file.as_deref())?;
    if !token.is_set() {
        tracing::warn!(
            "no cluster token (--cluster-token-file or {}): anyone who can reach this worker's ports can load \
             models, make it connect to any address, and run steps",
            tessera_proto::auth::ENV
        );
    }
    Ok(token)
}

/// What this worker registers in etcd under `--cluster`: its record, on a lease of `--lease-ttl`.
fn registration(
    a: &WorkerArgs,
    etcd: &str,
    advertise: &str,
    device: tessera_kernels::Device,
    memory_bytes: u64,
) -> Result<crate::registration::Registration> {
    let id = a.id.clone().unwrap_or_else(|| advertise.to_string());
    tessera_proto::record::check_name("worker id", &id).map_err(anyhow::Error::msg)?;
    tessera_proto::record::check_name("--cluster", &a.cluster).map_err(anyhow::Error::msg)?;
    let endpoints = tessera_proto::etcd::endpoints(etcd);
    if endpoints.is_empty() {
        anyhow::bail!("--etcd needs at least one endpoint");
    }
    let rec = tessera_proto::record::WorkerRecord {
        id: id.clone(),
        address: advertise.to_string(),
        device: device.to_string(),
        memory_bytes,
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: tessera_proto::PROTOCOL_VERSION.into(),
    };
    Ok(crate::registration::Registration {
        endpoints,
        key: tessera_proto::record::key(&a.cluster, &id),
        value: serde_json::to_string(&rec)?,
        ttl: Duration::from_secs(a.lease_ttl.max(1)),
    })
}

/// Resolves on SIGINT or SIGTERM. Boxed so that its body is compiled once, here.
pub fn shutdown_signal() -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    })
}
