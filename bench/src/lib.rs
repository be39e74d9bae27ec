//! Tessera's benchmarks, behind `tessera bench`: the engine on this machine's CPU against the memory
//! bandwidth roofline ([`cpu`]), worker processes against the in-process engine ([`cluster`]), a
//! Llama-3-8B-shaped random model on a GPU against its measured copy bandwidth and GEMM rate ([`gpu`]), and
//! a load generator for a running server ([`load`], over [`http_client`]), and what LoRA adapters cost a
//! step ([`lora`]). [`synth`] writes random-weight
//! models of any shape. `BENCHMARKS.md` records what they measured.
//!
//! The binary lends what it owns through [`Host`] ([`host`]): its built-in model and its ways of starting a
//! model.

pub mod cluster;
pub mod cpu;
pub mod gpu;
pub mod host;
pub mod http_client;
pub mod load;
pub mod lora;
pub mod synth;

use anyhow::Result;
use clap::Args;

pub use host::{Host, Running};

/// `tessera bench`'s arguments: a subcommand, or the CPU benchmark's options.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub cpu: cpu::CpuBenchArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Per-step cost of worker processes (gRPC + TCP collectives) against the in-process engine, and the
    /// TCP all-reduce bandwidth.
    Cluster(cluster::ClusterBenchArgs),
    /// Load-test a running server: throughput and TTFT / inter-token / end-to-end latency percentiles.
    Serve(load::ServeBenchArgs),
    /// A random model of a large shape (Llama 3 8B by default) built on a device: decode and prefill
    /// throughput against the measured copy bandwidth and GEMM rate.
    Gpu(gpu::GpuBenchArgs),
    /// Decode steps with the batch spread over random LoRA adapters against the base alone, alternating.
    Lora(lora::LoraBenchArgs),
}

/// Runs the benchmark `a` asks for.
pub fn run(a: BenchArgs, host: &dyn Host) -> Result<()> {
    match a.command {
        Some(BenchCommand::Cluster(c)) => cluster::run(c, host),
        Some(BenchCommand::Serve(c)) => load::run(c),
        Some(BenchCommand::Gpu(c)) => gpu::run(c),
        Some(BenchCommand::Lora(c)) => lora::run(c),
        None => cpu::run(a.cpu, host),
    }
}
