//! The `tessera` command line: argument parsing and the subcommands' glue. Errors are printed as one
//! `error:` line (with their causes) and a non-zero exit status; nothing here panics on bad input.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{bench_host::Host, coordinator, default_model, generate, keys, perplexity, serve, usage};

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
    Generate(generate::GenerateArgs),
    /// A model's perplexity on a text file, as llama.cpp's llama-perplexity computes it.
    Perplexity(perplexity::PerplexityArgs),
    /// Benchmarks: the engine against the memory-bandwidth roofline; `cluster` (worker processes); `serve` (load generator).
    Bench(tessera_bench::BenchArgs),
    /// Serve one tensor-parallel shard to a coordinator over gRPC.
    Worker(tessera_worker::command::WorkerArgs),
    /// Serve the OpenAI-compatible HTTP API on a model (in process, or on --tp N local worker processes).
    Serve(serve::ServeArgs),
    /// Serve the OpenAI-compatible HTTP API over the replicas formed from workers registered in etcd.
    Coordinator(coordinator::CoordinatorArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Usage totals from a ledger (`tessera serve --usage-db FILE`), by key, tenant, model or day.
    Usage(usage::UsageArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Generate(_) | Command::Perplexity(_) | Command::Bench(_));
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
        Command::Perplexity(a) => a.model.worker_args = worker_args,
        _ => {}
    }
    let result = match command {
        Command::Generate(a) => generate::execute(a),
        Command::Perplexity(a) => perplexity::execute(a),
        Command::Bench(a) => tessera_bench::run(a, &Host),
        Command::Worker(a) => tessera_worker::command::run(a, default_model::builtin()),
        Command::Coordinator(mut a) => {
            a.http.log_json = log_json;
            coordinator::run(a)
        }
        Command::Serve(mut a) => {
            a.http.log_json = log_json;
            serve::run(a)
        }
        Command::Keys(k) => keys::run(k),
        Command::Usage(a) => usage::run(a),
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
) -> Result<(tessera_telemetry::Telemetry, Option<tokio::runtime::Runtime>)> {
    let json = cli.log_format == LogFormat::Json;
    let Some(endpoint) = tessera_telemetry::endpoint(&cli.otlp_endpoint) else {
        return Ok((tessera_telemetry::init(json, default, None)?, None));
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tessera-otlp")
        .enable_all()
        .build()?;
    let otlp = tessera_telemetry::Otlp { endpoint, sampling_ratio: cli.otlp_sampling_ratio, service_name: service };
    let t = {
        let _in_rt = rt.enter();
        tessera_telemetry::init(json, default, Some(otlp))?
    };
    Ok((t, Some(rt)))
}
