//! Tessera's coordinator: everything about requests (tokenizer, validation, generation loop, KV block
//! allocation) and the `tessera` command line. It never touches a tensor: steps run on a [`backend`].

pub mod api;
pub mod backend;
pub mod bench;
pub mod bench_cluster;
pub mod bench_gpu;
pub mod bench_serve;
pub mod blocks;
pub mod cli;
pub mod cluster;
pub mod coordinator_cmd;
pub mod default_model;
pub mod engine_loop;
pub mod generate;
pub mod group;
pub mod http_client;
pub mod local_cluster;
pub mod metrics;
pub mod replicas;
pub mod scheduler;
pub mod serve;
pub mod step_cost;
pub mod synth;
pub mod telemetry;
pub mod tokenizer;
pub mod usage;
pub mod worker_cmd;
