//! Running a validated request, whichever endpoint it came in on: admission, one engine request per prompt
//! all answering on one event channel, under a span that records the outcome, then the answer, whole or
//! streamed.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::UnboundedSender;

use super::{
    admission,
    auth::Caller,
    error::ApiError,
    output::{ChoiceText, PromptEcho},
    reply::{Inbox, Kind, Reply},
    request::Options,
    state::{AppState, unix_now},
    stream,
    tools::ToolStream,
    whole,
};
use crate::{
    constrain::Constraint,
    engine::contract::{Event, GenRequest},
};

/// A request as its endpoint validated it, ready to run.
pub(super) struct Job {
    pub(super) kind: Kind,
    /// The model as the request named it: the base model's name, or a LoRA adapter's.
    pub(super) model: String,
    /// That adapter's id (0: the base model).
    pub(super) adapter: u32,
    /// One, except for a batch of completions.
    pub(super) prompts: Vec<Vec<u32>>,
    /// The most tokens each choice may produce.
    pub(super) max_tokens: usize,
    pub(super) opts: Options,
    /// Completions with `echo`: each prompt's text as the client sent it (`None`: sent as token ids).
    pub(super) echo: Option<Vec<Option<String>>>,
    /// Structured outputs: what each choice must generate.
    pub(super) constraint: Option<Constraint>,
}

/// Checks the request against the model and the pool, then runs it.
pub(super) async fn run(s: Arc<AppState>, caller: &Caller, job: Job) -> Response {
    if let Err(e) = admission::check_fits(&s, job.kind, &job.prompts, job.max_tokens, &job.opts) {
        return e.into_response();
    }
    // Tokens count against the key as OpenAI counts them at admission: prompt + max_tokens per choice.
    let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
    let completion_tokens = job.max_tokens * job.opts.n * job.prompts.len();
    let (slot, snapshot) = match admission::reserve(&s, caller, prompt_tokens, completion_tokens) {
        Ok(held) => held,
        Err(refused) => {
            let (e, snap) = *refused;
            let mut r = e.into_response();
            r.extensions_mut().insert(snap);
            return r;
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let ids: Vec<u64> = job.prompts.iter().map(|_| s.engine.next_request_id()).collect();
    let span = request_span(&job.model, ids[0], prompt_tokens);
    let queue = tracing::info_span!(target: "tessera::http", parent: &span, "queue");
    if let Err(e) = submit(&s, caller, &job, &ids, &tx, &span) {
        return e.into_response();
    }
    // Only the engine holds senders from here on: should its loop die without a last event, the channel
    // closes and the client gets an error instead of waiting forever.
    drop(tx);
    let Job { kind, model, prompts, opts, echo, .. } = job;
    let prompt_echo = |p: usize| {
        let scored = opts.params.prompt_logprobs.is_some();
        let text = echo.as_ref().map(|t| t[p].as_deref());
        (scored || text.is_some()).then(|| PromptEcho::new(&s.tokenizer, &prompts[p], text.flatten()))
    };
    let tool_streams = match (&opts.tool_output, opts.stream) {
        (Some(output), true) => (0..prompts.len() * opts.n).map(|_| ToolStream::new(output)).collect(),
        _ => Vec::new(),
    };
    let reply = Reply {
        s: s.clone(),
        kind,
        model,
        name: format!("{}-{:x}{:06x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, s.instance, ids[0]),
        ids,
        created: unix_now(),
        prompt_tokens,
        choices: (0..prompts.len())
            .flat_map(|p| (0..opts.n).map(move |_| p))
            .map(|p| ChoiceText::new(&prompts[p]).with_prompt(prompt_echo(p)))
            .collect(),
        cached_tokens: vec![0; prompts.len()],
        opts,
        rx: Inbox::new(rx),
        sent_role: vec![false; 0],
        tool_streams,
        done: false,
        pending: None,
        span,
        queue: Some(queue),
        slot,
        key: caller.key.clone(),
        started_at: crate::usage::unix_seconds(),
        billed: false,
    };
    let mut r =
        if reply.opts.stream { stream::first_event_then_stream(reply).await } else { whole::whole_reply(reply).await };
    if let Some(snap) = snapshot {
        r.extensions_mut().insert(snap);
    }
    r
}

/// The request's span; `Reply` records the outcome in its empty fields when the request ends.
fn request_span(model: &str, first_id: u64, prompt_tokens: usize) -> tracing::Span {
    tracing::info_span!(
        target: "tessera::http",
        "generate",
        // Signed: OpenTelemetry exports unsigned integers as strings.
        request_id = first_id as i64,
        model = %model,
        prompt_tokens = prompt_tokens as i64,
        completion_tokens = tracing::field::Empty,
        cached_tokens = tracing::field::Empty,
        finish_reason = tracing::field::Empty,
    )
}

/// Submits one engine request per prompt, all answering on `events`.
fn submit(
    s: &AppState,
    caller: &Caller,
    job: &Job,
    ids: &[u64],
    events: &UnboundedSender<Event>,
    span: &tracing::Span,
) -> Result<(), ApiError> {
    let opts = &job.opts;
    for (p, (&id, prompt)) in ids.iter().zip(&job.prompts).enumerate() {
        let req = GenRequest {
            id,
            prompt: prompt.clone(),
            params: opts.params.clone(),
            max_tokens: job.max_tokens,
            ignore_eos: opts.ignore_eos,
            constraint: job.constraint.clone(),
            adapter: job.adapter,
            n: opts.n,
            first_choice: p * opts.n,
            flow: caller.key.as_ref().map(|k| k.id.clone()),
            weight: caller.key.as_ref().and_then(|k| k.weight).unwrap_or(1.0),
            events: events.clone(),
            span: span.clone(),
        };
        if !s.engine.submit(req) {
            // Nothing of a batch runs unless all of it does.
            for &earlier in &ids[..p] {
                (0..opts.n).for_each(|c| s.engine.abort(earlier, c, None));
            }
            return Err(ApiError::unavailable("The engine has stopped."));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use tessera_proto::step::{SeqSampled, StepSeq};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        engine::backend::{Backend, ModelInfo, StepFailure, WorkerTiming},
        metrics::Metrics,
        replicas::Replicas,
        scheduler::SchedulerConfig,
        tokenizer::Tokenizer,
    };

    /// A backend whose first step panics: its engine loop dies without a last event for anyone.
    struct Panics;

    impl Backend for Panics {
        fn info(&self) -> ModelInfo {
            ModelInfo { vocab_size: 512, max_position_embeddings: 256, num_blocks: 64, block_size: 16, world_size: 1 }
        }
        fn step(&mut self, _: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, StepFailure> {
            panic!("a bug in the backend");
        }
        fn release(&mut self, _: &[u64]) {}
        fn last_timings(&self) -> Vec<WorkerTiming> {
            Vec::new()
        }
    }

    fn state() -> Arc<AppState> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
        let replicas = Replicas::new(Panics.info(), Arc::new(Metrics::new("m")));
        let cfg = SchedulerConfig { max_num_seqs: 4, max_batched_tokens: 64, max_model_len: 256, overlap: true };
        replicas.add(Box::new(Panics), cfg, vec![], "local", vec![], Box::new(()));
        Arc::new(AppState {
            engine: replicas,
            tokenizer: Arc::new(Tokenizer::load(&dir).unwrap()),
            chat_template: None,
            model_name: "m".into(),
            max_waiting: 8,
            max_body_bytes: 1 << 20,
            body_timeout: std::time::Duration::from_secs(5),
            started: 0,
            instance: 0,
            keys: None,
            limiter: Default::default(),
            ledger: None,
            cluster: None,
            grammars: Default::default(),
            tool_format: None,
        })
    }

    /// POSTs `body` to the completions endpoint of a fresh server over a dying engine; the status line.
    async fn status_of(body: &str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, crate::api::router(state())).await });
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(20), c.read_to_string(&mut out))
            .await
            .expect("the server answers instead of waiting for an engine that is gone")
            .unwrap();
        out.lines().next().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn a_request_whose_engine_loop_dies_gets_an_error_not_a_hang() {
        for stream in [false, true] {
            let body =
                format!(r#"{{"model": "m", "prompt": "Once upon a time", "max_tokens": 4, "stream": {stream}}}"#);
            let status = status_of(&body).await;
            assert!(status.contains(" 500 "), "stream {stream}: {status}");
        }
    }
}
