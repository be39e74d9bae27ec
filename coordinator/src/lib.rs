//! Tessera's coordinator: everything about requests, from the HTTP API to the steps sent to workers. It
//! never touches a tensor: it depends on the protocol (`tessera_proto`), not on the worker or its kernels.
//!
//! A request's path through the modules:
//!
//! - [`api`]: the OpenAI-compatible HTTP API: parsing and validation (`api::request`), chat templates,
//!   API keys and their limits, response and SSE assembly, OpenAI-shaped errors;
//! - [`tokenizer`]: text ↔ token ids (the `tokenizers` crate, BOS/EOS rules, incremental detokenizing);
//!   [`gguf_tokenizer`] builds one from a GGUF file's metadata;
//! - [`replicas`]: routing over model replicas (least outstanding tokens, prefix affinity) and failover;
//! - [`engine`]: the engine contract (`engine::contract`: the request, its events, the finish reason),
//!   the engine loop of each replica, and the backends its steps run on (`engine::group`: workers over
//!   gRPC);
//! - [`constrain`]: constrained decoding (structured outputs, forced tool calls): llguidance grammars and
//!   the allowed-token mask of each constrained sequence;
//! - [`lora`]: the LoRA adapters served over the base model (names, worker ids, loading and unloading);
//! - [`scheduler`]: continuous batching with fair queuing across API keys, the paged KV block manager
//!   with its prefix cache (`scheduler::blocks`) and the measured step cost (`scheduler::step_cost`);
//! - [`cluster`]: cluster mode: etcd membership, claims, and the manager that forms groups of workers;
//! - [`tool_calls`]: the tool-call formats models write (Llama 3 JSON, Mistral, Hermes/Qwen), parsed whole
//!   or as a stream;
//! - [`metrics`]: the Prometheus registry (vLLM's names under `tessera:`);
//! - [`usage`]: the per-request usage ledger (SQLite) and its queries.

pub mod api;
pub mod cluster;
pub mod constrain;
pub mod engine;
pub mod gguf_tokenizer;
pub mod lora;
pub mod metrics;
pub mod replicas;
pub mod scheduler;
pub mod tokenizer;
pub mod tool_calls;
pub mod usage;
