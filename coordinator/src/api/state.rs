//! The state every endpoint shares: the replicas and what the model needs to be served (tokenizer, chat
//! template, name), the admission limits, the keys and the usage ledger. Its own module so that the
//! endpoints depend on it and the router on them, and nothing depends back on the router.

use std::{
    sync::{Arc, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use super::{auth, chat_template::ChatTemplate, limits};
use crate::{constrain::Grammars, replicas::Replicas, tokenizer::Tokenizer, tool_calls::Format};

pub struct AppState {
    /// The model replicas requests are routed over.
    pub engine: Arc<Replicas>,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// The name clients use in `model`.
    pub model_name: String,
    /// Requests allowed to wait before new ones get 429.
    pub max_waiting: usize,
    pub max_body_bytes: usize,
    /// Most time to receive a request's body once its head has arrived.
    pub body_timeout: std::time::Duration,
    /// Unix time the server started (`created` of the model).
    pub started: u64,
    /// Nanoseconds since the epoch at start: makes response ids (the ledger's keys) unique across restarts.
    pub instance: u64,
    /// API keys; `None` serves everyone.
    pub keys: Option<Arc<auth::KeyStore>>,
    /// Per-key limit state.
    pub limiter: Arc<limits::Limiter>,
    /// Where usage rows go (`--usage-db`).
    pub ledger: Option<crate::usage::Ledger>,
    /// Cluster mode: the membership and groups behind the replicas (`GET /v1/cluster`).
    pub cluster: Option<Arc<dyn ClusterStatus>>,
    /// The grammar compiler for structured outputs, built by the first request that needs it (mapping a
    /// large vocabulary to bytes takes a moment, which a server that never sees one need not spend).
    pub grammars: OnceLock<Result<Grammars, String>>,
    /// The format the model writes tool calls in (`--tool-call-parser`, or read from its chat template):
    /// what `tool_choice: "auto"` parses.
    pub tool_format: Option<Format>,
}

impl AppState {
    /// The grammar compiler, or why this model's tokenizer cannot have one.
    pub fn grammars(&self) -> Result<&Grammars, String> {
        let vocab = self.engine.info().vocab_size;
        self.grammars.get_or_init(|| Grammars::new(&self.tokenizer, vocab)).as_ref().map_err(String::clone)
    }
}

/// What `GET /v1/cluster` shows beyond the replicas: workers and groups, as the cluster manager sees them.
pub trait ClusterStatus: Send + Sync {
    fn status(&self) -> serde_json::Value;
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
