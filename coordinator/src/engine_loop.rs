//! The engine loop: one thread that owns a replica's [`Backend`] and its [`Scheduler`], and turns submitted
//! requests into steps.
//!
//! HTTP handlers submit a [`GenRequest`] (one sequence per choice) with a channel for [`Event`]s and get
//! tokens back as they are sampled. A handler that goes away (the client disconnected) closes its channel:
//! the loop notices before the next step and aborts the sequence, freeing its blocks at once. Detokenizing
//! and stop strings belong to the handler, so this thread does only scheduling and bookkeeping.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::Instant,
};

use tessera_worker::SamplingParams;
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    backend::{Backend, ModelInfo},
    blocks::BlockManager,
    generate::FinishReason,
    metrics::Metrics,
    scheduler::{Scheduler, SchedulerConfig, Sequence},
};

/// Choices per request are encoded in the low bits of sequence ids.
pub const MAX_CHOICES: usize = 128;

/// What a handler hears about one of its choices.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token { choice: usize, token: u32, logprob: Option<f32>, top_logprobs: Vec<(u32, f32)> },
    Finished { choice: usize, reason: FinishReason, prompt_tokens: usize, cached_tokens: usize },
    Error { choice: usize, message: String },
}

pub struct GenRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub n: usize,
    /// Fair-share flow (API key id) and weight.
    pub flow: Option<String>,
    pub weight: f64,
    pub events: UnboundedSender<Event>,
    /// The request's span: steps it takes part in are its children or linked to it.
    pub span: tracing::Span,
}

enum Command {
    Submit(Box<GenRequest>, Instant),
    /// Stop a choice: the handler saw a stop string (`Some(Stop)`) or gave up on it (`None`).
    Abort {
        seq: u64,
        reason: Option<FinishReason>,
    },
}

/// The handlers' side of the loop.
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    next_id: AtomicU64,
    /// Sequences submitted and not yet scheduled (a soft bound for admission control).
    pub queued: Arc<AtomicUsize>,
    /// A replica is loaded and its last step did not fail.
    pub ready: Arc<AtomicBool>,
    pub info: ModelInfo,
    pub metrics: Arc<Metrics>,
}

impl EngineHandle {
    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues a request; false if the loop has stopped.
    pub fn submit(&self, req: GenRequest) -> bool {
        self.queued.fetch_add(req.n, Ordering::Relaxed);
        self.tx.send(Command::Submit(Box::new(req), Instant::now())).is_ok()
    }

    pub fn abort(&self, request: u64, choice: usize, reason: Option<FinishReason>) {
        let _ = self.tx.send(Command::Abort { seq: seq_id(request, choice), reason });
    }
}

pub fn seq_id(request: u64, choice: usize) -> u64 {
    request * MAX_CHOICES as u64 + choice as u64
}

/// CPU seconds this thread has used.
fn thread_cpu_time() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_THREAD_CPUTIME_ID is always valid on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Per-sequence bookkeeping the scheduler does not need.
struct Track {
    span: tracing::Span,
    events: UnboundedSender<Event>,
    choice: usize,
    arrival: Instant,
    last_token: Option<Instant>,
    prompt_tokens: usize,
}

/// Starts the loop on its own thread. `backend` runs the steps; `eos` are the end-of-sequence ids.
pub fn spawn(
    backend: Box<dyn Backend>,
    cfg: SchedulerConfig,
    eos: Vec<u32>,
    metrics: Arc<Metrics>,
    keep_alive: Box<dyn Send>,
) -> EngineHandle {
    let info = backend.info();
    for rank in 0..info.world_size {
        metrics.worker_kv_cache_blocks.get_or_create(&vec![("rank", rank.to_string())]).set(info.num_blocks as i64);
    }
    let (tx, rx) = mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(AtomicBool::new(true));
    let sched = Scheduler::new(cfg, BlockManager::new(info.num_blocks, info.block_size));
    let mut lp = Loop {
        backend,
        sched,
        eos,
        metrics: metrics.clone(),
        tracks: HashMap::new(),
        queued: queued.clone(),
        ready: ready.clone(),
    };
    std::thread::Builder::new()
        .name("tessera-engine".into())
        .spawn(move || {
            let _keep_alive = keep_alive;
            lp.run(rx)
        })
        .expect("spawning the engine thread");
    EngineHandle { tx, next_id: AtomicU64::new(1), queued, ready, info, metrics }
}

struct Loop {
    backend: Box<dyn Backend>,
    sched: Scheduler,
    eos: Vec<u32>,
    metrics: Arc<Metrics>,
    tracks: HashMap<u64, Track>,
    queued: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
}

impl Loop {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.sched.is_idle() {
                match rx.recv() {
                    Ok(c) => self.handle(c),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            self.drop_abandoned();
            self.step();
            self.publish();
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Submit(r, arrival) => {
                for choice in 0..r.n {
                    let id = seq_id(r.id, choice);
                    let mut params = r.params.clone();
                    // Distinct but reproducible streams for the choices of a seeded request.
                    params.seed = params.seed.map(|s| s.wrapping_add(choice as u64));
                    let mut seq = Sequence::new(id, r.prompt.clone(), params, r.max_tokens, r.ignore_eos)
                        .in_flow(r.flow.clone(), r.weight);
                    seq.arrival = arrival;
                    self.sched.add(seq);
                    self.tracks.insert(
                        id,
                        Track {
                            span: r.span.clone(),
                            events: r.events.clone(),
                            choice,
                            arrival,
                            last_token: None,
                            prompt_tokens: r.prompt.len(),
                        },
                    );
                }
            }
            Command::Abort { seq, reason } => self.finish_abort(seq, reason),
        }
    }

    fn finish_abort(&mut self, seq: u64, reason: Option<FinishReason>) {
        if self.sched.abort(seq).is_some() {
            self.backend.release(&[seq]);
        }
        if let Some(t) = self.tracks.remove(&seq) {
            let label = match reason {
                Some(FinishReason::Stop) => "stop",
                Some(FinishReason::Length) => "length",
                None => "abort",
            };
            self.metrics.request_success.get_or_create(&vec![("finished_reason", label)]).inc();
            self.metrics.e2e_request_latency.observe(t.arrival.elapsed().as_secs_f64());
        }
    }

    /// Sequences whose handler is gone (client disconnected) are aborted before they cost a step.
    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = self.tracks.iter().filter(|(_, t)| t.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            self.finish_abort(id, None);
        }
    }

    fn step(&mut self) {
        let started = Instant::now();
        let cpu_started = thread_cpu_time();
        let plan = self.sched.schedule();
        if plan.is_empty() {
            self.fail_unschedulable();
            return;
        }
        for p in &plan {
            if p.start == 0
                && let Some(s) = self.sched.get(p.id)
                && s.first_scheduled.is_some_and(|t| t >= started)
            {
                self.metrics.request_queue_time.observe((started - s.arrival).as_secs_f64());
            }
        }
        let inputs = self.sched.inputs(&plan);
        // One span per step, shared by the requests in it: a child of the first request's span, linked to
        // the others' (never one span per request per step).
        let prefill: usize =
            plan.iter().filter(|p| !(p.end - p.start == 1 && p.start > 0)).map(|p| p.end - p.start).sum();
        let tokens: usize = plan.iter().map(|p| p.end - p.start).sum();
        let mut parents = plan.iter().filter_map(|p| self.tracks.get(&p.id)).map(|t| &t.span);
        let step_span = match parents.next() {
            Some(first) => {
                let s = tracing::info_span!(target: "tessera::engine", parent: first, "step", sequences = plan.len(), tokens, prefill_tokens = prefill);
                let mut seen = vec![first.id()];
                for other in parents {
                    if !seen.contains(&other.id()) {
                        seen.push(other.id());
                        crate::telemetry::link(&s, other);
                    }
                }
                s
            }
            None => tracing::Span::none(),
        };
        let cpu_before_backend = thread_cpu_time() - cpu_started;
        let t = Instant::now();
        let result = step_span.in_scope(|| self.backend.step(&inputs));
        let on_workers = t.elapsed();
        drop(inputs);
        let cpu_after = thread_cpu_time();
        // Step timings before any event goes out, like the other metrics: a client whose response completes
        // must find the step that completed it counted.
        self.metrics.step_seconds.observe(on_workers.as_secs_f64());
        for (rank, t) in self.backend.last_timings().iter().enumerate() {
            let label = vec![("rank", rank.to_string())];
            self.metrics.worker_step_seconds.get_or_create(&label).observe(t.step_seconds);
            self.metrics.worker_collective_seconds.get_or_create(&label).observe(t.collective_seconds);
        }
        match result {
            Ok(sampled) => {
                let outcomes = self.sched.apply(&plan, sampled, &self.eos);
                // Metrics first, events second: a client whose response completes must see its own request
                // counted and no longer running.
                self.publish();
                let now = Instant::now();
                for o in outcomes {
                    self.emit(o, now);
                }
            }
            Err(e) => self.fail_all(&format!("{e:#}")),
        }
        // CPU time of this thread, not wall time: on a busy machine the thread is also descheduled, and that
        // is not the scheduler's cost. (With an in-process backend the forward pass runs on rayon threads.)
        self.metrics.scheduler_step_seconds.observe(cpu_before_backend + (thread_cpu_time() - cpu_after));
    }

    fn emit(&mut self, o: crate::scheduler::Outcome, now: Instant) {
        let Some(t) = self.tracks.get_mut(&o.id) else { return };
        match t.last_token {
            None => {
                self.metrics.time_to_first_token.observe((now - t.arrival).as_secs_f64());
                self.metrics.prompt_tokens.inc_by(t.prompt_tokens as u64);
            }
            Some(prev) => self.metrics.inter_token_latency.observe((now - prev).as_secs_f64()),
        }
        t.last_token = Some(now);
        self.metrics.generation_tokens.inc();
        let _ = t.events.send(Event::Token {
            choice: t.choice,
            token: o.sampled.token,
            logprob: o.sampled.logprob,
            top_logprobs: o.sampled.top_logprobs,
        });
        if let Some(reason) = o.finished {
            let t = self.tracks.remove(&o.id).expect("tracked");
            self.backend.release(&[o.id]);
            let label = if reason == FinishReason::Stop { "stop" } else { "length" };
            self.metrics.request_success.get_or_create(&vec![("finished_reason", label)]).inc();
            self.metrics.e2e_request_latency.observe(t.arrival.elapsed().as_secs_f64());
            let _ = t.events.send(Event::Finished {
                choice: t.choice,
                reason,
                prompt_tokens: t.prompt_tokens,
                cached_tokens: o.cached_tokens,
            });
        }
    }

    /// The step failed: every running and waiting sequence ends with the error.
    fn fail_all(&mut self, message: &str) {
        tracing::error!("step failed: {message}");
        self.ready.store(false, Ordering::Relaxed);
        let ids: Vec<u64> = self.sched.ids().collect();
        for id in ids {
            self.sched.abort(id);
            if let Some(t) = self.tracks.remove(&id) {
                let _ = t.events.send(Event::Error { choice: t.choice, message: message.to_string() });
                self.metrics.request_failure.get_or_create(&vec![("kind", "backend")]).inc();
            }
        }
    }

    /// Nothing could be scheduled although sequences are there: prefills are waiting for blocks other
    /// prefills hold. The scheduler makes room by preempting, or fails a sequence that can never fit
    /// (requests are validated against the pool, so that is a safety net).
    fn fail_unschedulable(&mut self) {
        if self.sched.is_idle() {
            return;
        }
        if let Some(id) = self.sched.unstick() {
            if let Some(t) = self.tracks.remove(&id) {
                let _ = t
                    .events
                    .send(Event::Error { choice: t.choice, message: "the request does not fit the KV cache".into() });
                self.metrics.request_failure.get_or_create(&vec![("kind", "kv_cache")]).inc();
            }
            self.backend.release(&[id]);
        }
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.num_requests_running.set(self.sched.num_running() as i64);
        m.num_requests_waiting.set(self.sched.num_waiting() as i64);
        m.kv_cache_usage_perc.set(self.sched.blocks.usage());
        m.num_preemptions.inner().store(self.sched.preemptions, Ordering::Relaxed);
        m.prefix_cache_queries.inner().store(self.sched.blocks.stats.queries, Ordering::Relaxed);
        m.prefix_cache_hits.inner().store(self.sched.blocks.stats.hits, Ordering::Relaxed);
        self.queued.store(self.sched.num_waiting(), Ordering::Relaxed);
    }
}
