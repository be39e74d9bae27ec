//! The `tessera` binary's crate: the command line and each subcommand's wiring. The work itself is done
//! by the library crates; this crate only connects them.
//!
//! - [`cli`]: argument parsing, logging and tracing set-up, and dispatch to a subcommand;
//! - [`serve`]: `tessera serve`, the OpenAI-compatible server on one replica (also the HTTP side that
//!   `tessera coordinator` shares); [`supervisor`] restarts its replica when it fails;
//! - [`coordinator`]: `tessera coordinator`, the server over the replicas formed from workers in etcd;
//! - [`generate`]: `tessera generate`, one prompt's completion;
//! - [`perplexity`]: `tessera perplexity`, a model's perplexity on a text as llama.cpp computes it;
//! - [`keys`], [`usage`]: `tessera keys create` and `tessera usage`;
//! - [`runner`]: where a command's model runs: in this process ([`local_backend`]) or on `--tp N` local
//!   worker processes ([`local_cluster`]);
//! - [`bench_host`]: what `tessera bench` (the `tessera-bench` crate) gets from this binary;
//! - [`default_model`]: stories260K, compiled in.
//!
//! `tessera worker` is `tessera_worker::command`; the benchmarks are the `tessera-bench` crate.

pub mod bench_host;
pub mod cli;
pub mod coordinator;
pub mod default_model;
pub mod generate;
pub mod keys;
pub mod local_backend;
pub mod local_cluster;
pub mod perplexity;
pub mod runner;
pub mod serve;
pub mod supervisor;
pub mod usage;
