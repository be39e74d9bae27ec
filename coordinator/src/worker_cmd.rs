//! `tessera worker`: one worker process serving the `tessera.v1.Worker` gRPC service.
//!
//! It binds its gRPC and collective listeners first, then prints one line with both addresses on stdout
//! (`tessera worker listening on GRPC collectives on COLL`), which is how a parent that asked for port 0
//! learns where it is. With `--exit-with-parent` it exits when its standard input closes, so a local
//! cluster's workers never outlive the process that started them, however that process ends.

use std::{io::Write, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use clap::Args;
use tessera_proto::v1::worker_server::WorkerServer;
use tessera_worker::server::{WorkerConfig, WorkerService};
use tokio::net::TcpListener;

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
    /// Exit when standard input closes (used by `--tp N` local clusters).
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
}

pub fn run(a: WorkerArgs) -> Result<()> {
    let device: tessera_kernels::Device = a.device.parse()?;
    device.ensure_available()?;
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
    rt.block_on(serve(a))
}

async fn serve(a: WorkerArgs) -> Result<()> {
    let grpc = TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
    let coll_addr = a.collective_listen.unwrap_or_else(|| SocketAddr::new(a.listen.ip(), 0));
    let coll = TcpListener::bind(coll_addr).await.with_context(|| format!("binding {coll_addr}"))?;
    let (grpc_addr, coll_addr) = (grpc.local_addr()?, coll.local_addr()?);
    let config = WorkerConfig {
        device: a.device.parse()?,
        kv_cache_bytes: a.kv_cache_mib << 20,
        collective_timeout: Duration::from_secs(a.collective_timeout.max(1)),
    };
    let service = WorkerService::new(config, coll, coll_addr.to_string());
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "tessera worker listening on {grpc_addr} collectives on {coll_addr}")?;
        out.flush()?;
    }
    tracing::info!(%grpc_addr, %coll_addr, "worker serving");
    tonic::transport::Server::builder()
        .layer(crate::telemetry::TraceContextLayer)
        .add_service(
            WorkerServer::new(service).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            shutdown_signal(),
        )
        .await
        .context("serving gRPC")?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
}
