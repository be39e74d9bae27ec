//! Tessera's worker: one tensor-parallel shard of a Llama-family model and everything needed to run it.
//!
//! - [`config`]: `config.json` for Llama, Mistral and Qwen2;
//! - [`weights`]: memory-mapped safetensors, single or sharded, sliced per rank;
//! - [`gguf_model`]: a model from one GGUF file (llama.cpp's format): config, tensor names, its quantized
//!   matrices kept as blocks;
//! - [`files`]: a model directory's files opened as untrusted input (regular files only, JSON bounded);
//! - [`error`]: what loading a model and running a step can fail with, naming the file, field or tensor;
//! - [`model`]: the decoder and its batched forward pass over a paged KV cache;
//! - [`kv_cache`]: the pool of fixed-size KV blocks;
//! - [`quantize`]: `--quantize`, a safetensors model's matrices put in llama.cpp's block formats as they load;
//! - [`kept`]: what a worker keeps of each sequence between steps (block table, sampling parameters), so
//!   steps carry only what changed;
//! - [`lora`]: LoRA adapters over the base weights, several in one batch;
//! - [`sampling`]: logits → next token (penalties, temperature, top-k/p, min-p, seeds, logprobs);
//! - [`collective`]: all-reduce / all-gather within a group;
//! - [`tcp_collective`]: the TCP ring between CPU worker processes; [`nccl_collective`]: NCCL between GPU
//!   workers;
//! - [`engine`]: a model + cache + per-sequence state behind one `step` call;
//! - [`server`]: the `tessera.v1.Worker` gRPC service around an engine;
//! - [`registration`]: the worker's record in etcd, on a lease kept alive while it serves;
//! - [`command`]: the `tessera worker` process: listeners, the gRPC server, registration, shutdown.
//!
//! The step's types (sequence, sampling parameters, sampled token) come from `tessera_proto::step`, shared
//! with the coordinator, and are re-exported here.

pub mod collective;
pub mod command;
pub mod config;
pub mod engine;
pub mod error;
pub mod files;
pub mod gguf_model;
pub mod kept;
pub mod kv_cache;
pub mod lora;
pub mod model;
pub mod nccl_collective;
pub mod quantize;
pub mod registration;
pub mod sampling;
pub mod server;
pub mod tcp_collective;
pub mod weights;

pub use collective::Collective;
pub use config::ModelConfig;
pub use engine::{Engine, SeqSampled, StepProgress, StepSeq};
pub use error::{ModelError, StepError};
pub use model::{Model, Shard};
pub use sampling::{Sampled, SamplingParams};
pub use tessera_proto::step::{PromptScores, ScorePrompt};
