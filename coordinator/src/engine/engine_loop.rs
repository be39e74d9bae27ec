//! The engine loop: one thread that owns a replica's [`Backend`] and its [`Scheduler`], and turns submitted
//! requests into steps.
//!
//! HTTP handlers submit a [`GenRequest`] (one sequence per choice) through `Replicas` with a channel for
//! [`Event`]s and get tokens back as they are sampled: a step's events leave together, through the
//! [`Postman`](super::postman::Postman), whose thread wakes the handlers. A handler that goes away (the
//! client disconnected) closes its channel: the loop hears it from the postman at the sequence's next token
//! (or finds it within `SWEEP_EVERY` steps, for one not yet sent anything) and aborts the sequence,
//! freeing its blocks at once. Detokenizing and stop strings belong to the handler, so this thread does only
//! scheduling and bookkeeping.
//!
//! With an in-process backend a step can pause before a layer's attention or MLP: when a request of a flow
//! (API key) with nothing on the replica arrives, the submitter raises [`ReplicaStats::newcomer`], the step
//! stops after its current half-layer, the loop takes the request in and, if the scheduler says a step of
//! its own pays, runs the newcomer's prefill and sends its first token before the step goes on. Other commands that arrive
//! meanwhile (aborts) wait until the step is done: its sequences must stay as they are.
//!
//! A step that fails ends the replica: the loop takes itself out of routing, collects every sequence it
//! held (and every request still in its channel) as [`Migrant`]s, hands them to its [`LoopHost`] (`Replicas`) to
//! continue elsewhere, and exits, dropping its backend and whatever it kept alive.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use tessera_proto::step::{SeqSampled, StepSeq};

use super::{
    backend::{Backend, OwnedStepSeq, StepFailure},
    contract::{Event, FinishReason, seq_id},
    link::{Command, Hub, Migrant, Track},
    postman::Outbox,
};
use crate::{
    metrics::Metrics,
    scheduler::{Outcome, Planned, Scheduler, SchedulerConfig, SchedulerStats, Sequence},
};

/// Steps between looks at every handler's channel for one that is closed.
const SWEEP_EVERY: u32 = 16;

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

/// Starts a replica's loop on its own thread. `backend` runs the steps; `eos` are the end-of-sequence ids;
/// `keep_alive` (worker processes) lives as long as the loop. Returns the loop's command channel.
pub fn spawn(
    backend: Box<dyn Backend>,
    cfg: SchedulerConfig,
    eos: Vec<u32>,
    metrics: Arc<Metrics>,
    keep_alive: Box<dyn Send>,
    hub: Hub,
) -> mpsc::Sender<Command> {
    let info = backend.info();
    for rank in 0..info.world_size {
        metrics.worker_kv_cache_blocks.get_or_create(&vec![("rank", rank.to_string())]).set(info.num_blocks as i64);
    }
    let (tx, rx) = mpsc::channel();
    let sched = Scheduler::new(cfg, info.num_blocks, info.block_size);
    let on_cpu = backend.computes_on_cpu();
    let mut lp = Loop {
        backend,
        sched,
        eos,
        metrics,
        tracks: HashMap::default(),
        flows: HashMap::new(),
        outbox: Outbox::new(hub.postman.clone()),
        hub,
        backend_cpu: 0.0,
        until_sweep: 0,
        published: Default::default(),
        failed: None,
        deferred: Vec::new(),
        unloading: Vec::new(),
        adapters: Default::default(),
    };
    if on_cpu {
        // The loop runs as a worker of its own compute pool: a step's forward pass then runs on the loop's
        // thread, its parallel loops shared out by work-stealing, instead of going to a pool thread while the
        // loop sleeps until woken. Under a flood on two cores each such wake-up (two a step, and one each
        // time a step pauses for a newcomer) waited up to a millisecond for a core.
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("tessera-engine-{i}"))
            // A panic ends the loop as it would end a thread of its own: its channel closes and the replica
            // is retired (the panic hook has printed it). Without a handler rayon would abort the process.
            .panic_handler(|_| {})
            .build()
            .expect("building the engine's compute pool");
        let pool = Arc::new(pool);
        let own = pool.clone();
        pool.spawn(move || {
            // The pool lives as long as the loop: dropped, its idle threads would leave.
            let _pool = own;
            let _keep_alive = keep_alive;
            lp.run(rx)
        });
        return tx;
    }
    std::thread::Builder::new()
        .name("tessera-engine".into())
        .spawn(move || {
            let _keep_alive = keep_alive;
            lp.run(rx)
        })
        .expect("spawning the engine thread");
    tx
}

struct Loop {
    backend: Box<dyn Backend>,
    sched: Scheduler,
    eos: Vec<u32>,
    metrics: Arc<Metrics>,
    tracks: HashMap<u64, Track, foldhash::fast::RandomState>,
    /// Tracked sequences per flow.
    flows: HashMap<Option<String>, usize>,
    hub: Hub,
    /// Events of the step under way, sent together once it is applied.
    outbox: Outbox,
    /// Steps until the next look at every handler's channel ([`Loop::drop_abandoned`]).
    until_sweep: u32,
    /// This thread's CPU seconds inside the backend during the current iteration (the forward pass, with
    /// an in-process backend): not the loop's own cost.
    backend_cpu: f64,
    /// Counter values already added to the shared metrics (preemptions, prefix cache queries and hits,
    /// newcomer steps, steps paused).
    published: SchedulerStats,
    /// Set when the replica is lost: the loop hands its work over and ends.
    failed: Option<String>,
    /// Commands that arrived while a step was paused, for after it.
    deferred: Vec<Command>,
    /// LoRA adapters to unload once their sequences here have finished.
    unloading: Vec<u32>,
    /// LoRA adapters the backend holds.
    adapters: std::collections::HashSet<u32>,
}

impl Loop {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        loop {
            // Waiting for a command below takes no CPU time: what this counts is the loop's own work.
            let cpu_started = thread_cpu_time();
            self.backend_cpu = 0.0;
            for c in std::mem::take(&mut self.deferred) {
                self.handle(c);
            }
            // (A failure among the deferred commands is handed over below, not after the next command.)
            if self.sched.is_idle() && self.failed.is_none() {
                match rx.recv() {
                    Ok(c) => self.handle(c),
                    Err(_) => return,
                }
            }
            // Lowered before the channel is read: a newcomer sent after this raises it for the coming step.
            self.hub.stats.newcomer.store(false, Ordering::Release);
            loop {
                match rx.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            let mut stepped = false;
            if self.failed.is_none() {
                self.drop_abandoned();
                stepped = self.step(&rx);
                self.publish();
                if !self.unloading.is_empty() {
                    self.unload_idle_adapters();
                }
            }
            self.outbox.flush();
            if stepped {
                // CPU time of this thread, not wall time: on a busy machine the thread is also descheduled,
                // and that is not the loop's cost.
                let cpu = thread_cpu_time() - cpu_started - self.backend_cpu;
                self.metrics.scheduler_step_seconds.observe(cpu.max(0.0));
            }
            if let Some(reason) = self.failed.take() {
                self.hand_over(&reason, rx);
                return;
            }
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
                    seq.constraint = r.constraint.clone();
                    seq.adapter = r.adapter;
                    self.sched.add(seq);
                    self.enter_flow(&r.flow);
                    self.outbox.open(id, &r.events);
                    self.tracks.insert(
                        id,
                        Track {
                            span: r.span.clone(),
                            flow: r.flow.clone(),
                            events: r.events.clone(),
                            choice: r.first_choice + choice,
                            arrival,
                            last_token: None,
                            prompt_tokens: r.prompt.len(),
                            charge: (r.prompt.len() + r.max_tokens) as i64,
                        },
                    );
                }
                self.refuse_without_adapter(r.adapter, (0..r.n).map(|c| seq_id(r.id, c)));
            }
            Command::Adopt(mut m) => {
                let (id, adapter) = (m.id, m.adapter);
                self.sched.add(m.sequence());
                self.enter_flow(&m.track.flow);
                self.outbox.open(id, &m.track.events);
                self.tracks.insert(m.id, m.track);
                self.refuse_without_adapter(adapter, [id]);
            }
            Command::Abort { seq, reason } => self.finish_abort(seq, reason),
            Command::Fail(reason) => {
                self.failed.get_or_insert(reason);
            }
            Command::LoadAdapter(spec, reply) => {
                let t = Instant::now();
                let result = self.backend.load_adapter(&spec);
                match &result {
                    Ok(()) => {
                        self.adapters.insert(spec.id);
                        tracing::info!(adapter = %spec.name, id = spec.id, seconds = t.elapsed().as_secs_f64(), "LoRA adapter loaded");
                    }
                    Err(e) => tracing::warn!(adapter = %spec.name, error = %e, "LoRA adapter not loaded"),
                }
                let _ = reply.send(result);
            }
            Command::UnloadAdapter(id) => {
                self.unloading.push(id);
                self.unload_idle_adapters();
            }
        }
    }

    /// Fails sequences `ids` (just taken in) if their adapter is not loaded here (it was unloaded, or
    /// failed to load on this replica): a step naming it would be refused whole, failing its other
    /// sequences too.
    fn refuse_without_adapter(&mut self, adapter: u32, ids: impl IntoIterator<Item = u64>) {
        if adapter == 0 || self.adapters.contains(&adapter) {
            return;
        }
        let message =
            format!("LoRA adapter {adapter} is not loaded on this replica (it was unloaded, or failed to load here)");
        for id in ids {
            self.fail_sequence(id, &message, "adapter");
        }
    }

    /// Unloads the adapters waiting to go that no sequence here uses any more.
    fn unload_idle_adapters(&mut self) {
        let (idle, busy): (Vec<u32>, Vec<u32>) =
            std::mem::take(&mut self.unloading).into_iter().partition(|&id| !self.sched.uses_adapter(id));
        self.unloading = busy;
        for id in idle {
            self.adapters.remove(&id);
            if let Err(e) = self.backend.unload_adapter(id) {
                tracing::warn!(id, error = %e, "LoRA adapter not unloaded");
            }
        }
    }

    /// Forgets a sequence's bookkeeping; its tokens no longer count against this replica, and its handler
    /// hears nothing more from this loop.
    fn untrack(&mut self, id: u64) -> Option<Track> {
        let t = self.tracks.remove(&id)?;
        self.outbox.close(id);
        self.hub.stats.outstanding_tokens.fetch_sub(t.charge, Ordering::Relaxed);
        if let Some(n) = self.flows.get_mut(&t.flow) {
            *n -= 1;
            if *n == 0 {
                self.flows.remove(&t.flow);
                self.hub.stats.set_flow(&t.flow, false);
            }
        }
        Some(t)
    }

    /// Sends sequence `id`'s handler its last event, made from its track, and forgets the sequence.
    fn untrack_with(&mut self, id: u64, last: impl FnOnce(&Track) -> Event) -> Option<Track> {
        let event = last(self.tracks.get(&id)?);
        self.outbox.push(id, event);
        self.untrack(id)
    }

    /// A sequence of `flow` is tracked: the replica's published flows include it.
    fn enter_flow(&mut self, flow: &Option<String>) {
        let n = self.flows.entry(flow.clone()).or_default();
        *n += 1;
        if *n == 1 {
            self.hub.stats.set_flow(flow, true);
        }
    }

    /// The replica is lost: out of routing first (nothing new can arrive), then every sequence, and every
    /// request still in the channel, goes to [`LoopHost::adopt`].
    fn hand_over(&mut self, reason: &str, rx: mpsc::Receiver<Command>) {
        self.hub.host.withdraw(self.hub.replica, reason);
        let mut migrants = Vec::new();
        self.take_all(&mut migrants);
        // Commands put off while a step was paused, and requests routed here before the replica left routing,
        // not yet taken in.
        let pending: Vec<Command> = std::mem::take(&mut self.deferred).into_iter().chain(rx.try_iter()).collect();
        for c in pending {
            match c {
                Command::Submit(..) | Command::Adopt(_) => {
                    self.handle(c);
                    self.take_all(&mut migrants);
                }
                Command::Abort { seq, .. } => migrants.retain(|m| m.id != seq),
                // A replica that is gone needs no adapter: dropping the reply says so.
                Command::Fail(_) | Command::LoadAdapter(..) | Command::UnloadAdapter(_) => {}
            }
        }
        drop(rx);
        self.publish();
        // Their events so far go out before anything the host sends them (the postman keeps order).
        self.outbox.flush();
        self.hub.host.adopt(migrants, reason);
    }

    /// Takes every sequence out of the scheduler, with its bookkeeping, as migrants.
    fn take_all(&mut self, into: &mut Vec<Migrant>) {
        let ids: Vec<u64> = self.sched.ids().collect();
        for id in ids {
            let (Some(seq), Some(track)) = (self.sched.abort(id), self.untrack(id)) else { continue };
            into.push(Migrant {
                id,
                tokens: seq.tokens,
                prompt_len: seq.prompt_len,
                params: seq.params,
                max_tokens: seq.max_tokens,
                ignore_eos: seq.ignore_eos,
                constraint: seq.constraint,
                adapter: seq.adapter,
                flow: seq.flow,
                weight: seq.weight,
                track,
            });
        }
    }

    fn finish_abort(&mut self, seq: u64, reason: Option<FinishReason>) {
        if self.sched.abort(seq).is_some() {
            self.backend.release(&[seq]);
        }
        if let Some(t) = self.untrack(seq) {
            let label = match reason {
                Some(FinishReason::Stop) => "stop",
                Some(FinishReason::Length) => "length",
                None => "abort",
            };
            self.metrics.request_success.get_or_create(&vec![("finished_reason", label)]).inc();
            self.metrics.e2e_request_latency.observe(t.arrival.elapsed().as_secs_f64());
        }
    }

    /// Sequences whose handler is gone (client disconnected) are aborted: those the postman found gone at
    /// once, and every [`SWEEP_EVERY`] steps any other (one still waiting has not been sent anything).
    /// Looking at every handler's channel each step would cost a cache miss per sequence per step.
    fn drop_abandoned(&mut self) {
        let mut gone = self.outbox.take_gone();
        self.until_sweep = self.until_sweep.saturating_sub(1);
        if self.until_sweep == 0 {
            self.until_sweep = SWEEP_EVERY;
            gone.extend(self.tracks.iter().filter(|(_, t)| t.events.is_closed()).map(|(&id, _)| id));
        }
        for id in gone {
            self.finish_abort(id, None);
        }
    }

    /// Plans and runs a step; false if there was nothing to run.
    fn step(&mut self, rx: &mpsc::Receiver<Command>) -> bool {
        let started = Instant::now();
        let plan = self.sched.schedule();
        if plan.is_empty() {
            self.fail_unschedulable();
            return false;
        }
        let pausable = self.backend.can_pause();
        self.execute(&plan, started, pausable.then_some(rx));
        true
    }

    /// One span per step, shared by the requests in it: a child of the first request's span, linked to
    /// the others' where spans are exported (never one span per request per step).
    fn step_span(&self, plan: &[Planned], tokens: usize) -> tracing::Span {
        let prefill: usize =
            plan.iter().filter(|p| !(p.end - p.start == 1 && p.start > 0)).map(|p| p.end - p.start).sum();
        let mut parents = plan.iter().filter_map(|p| self.tracks.get(&p.id)).map(|t| &t.span);
        let Some(first) = parents.next() else { return tracing::Span::none() };
        let s = tracing::info_span!(target: "tessera::engine", parent: first, "step", sequences = plan.len(), tokens, prefill_tokens = prefill);
        if !tessera_telemetry::exporting() {
            // Links are seen only in an exported trace; finding every request's span costs a look-up per
            // sequence per step.
            return s;
        }
        // A request's choices share its span: linked once.
        let mut seen = std::collections::HashSet::with_capacity(plan.len());
        seen.insert(first.id());
        for other in parents {
            if seen.insert(other.id()) {
                tessera_telemetry::link(&s, other);
            }
        }
        s
    }

    /// Runs a planned step and applies it. With `rx` the step may pause for a newcomer (module doc).
    fn execute(&mut self, plan: &[Planned], started: Instant, rx: Option<&mpsc::Receiver<Command>>) {
        for p in plan {
            if p.start == 0
                && let Some(s) = self.sched.get(p.id)
                && s.first_scheduled.is_some_and(|t| t >= started)
            {
                self.metrics.request_queue_time.observe((started - s.arrival).as_secs_f64());
            }
        }
        let inputs = self.sched.inputs(plan);
        let tokens: usize = plan.iter().map(|p| p.end - p.start).sum();
        let step_span = self.step_span(plan, tokens);
        let t = Instant::now();
        let stats = self.hub.stats.clone();
        let pause = move || stats.newcomer.load(Ordering::Acquire);
        let cpu = thread_cpu_time();
        let first = step_span.in_scope(|| match rx {
            Some(_) => self.backend.step_pausable(&inputs, &pause),
            None => self.backend.step(&inputs).map(Some),
        });
        self.backend_cpu += thread_cpu_time() - cpu;
        // Time the loop spent on other work while the step was paused: not the step's cost.
        let mut aside = Duration::ZERO;
        let result = match (first, rx) {
            (Ok(None), Some(rx)) => {
                let batch: Vec<OwnedStepSeq> = inputs.iter().map(OwnedStepSeq::new).collect();
                drop(inputs);
                self.while_paused(rx, &batch, tokens, &step_span, t.elapsed(), &mut aside)
            }
            (first, _) => {
                drop(inputs);
                first.and_then(|out| {
                    out.ok_or_else(|| StepFailure::Internal("the backend paused a step it was not asked to".into()))
                })
            }
        };
        let on_workers = t.elapsed().saturating_sub(aside);
        // Step timings before any event goes out, like the other metrics: a client whose response completes
        // must find the step that completed it counted.
        self.metrics.step_seconds.observe(on_workers.as_secs_f64());
        self.sched.observe_step(tokens, on_workers.as_secs_f64(), Instant::now());
        for (rank, t) in self.backend.last_timings().iter().enumerate() {
            let label = vec![("rank", rank.to_string())];
            self.metrics.worker_step_seconds.get_or_create(&label).observe(t.step_seconds);
            self.metrics.worker_collective_seconds.get_or_create(&label).observe(t.collective_seconds);
        }
        match result {
            Ok(sampled) => {
                // Prompt logprobs before the tokens they precede.
                self.send_prompt_scores();
                let outcomes = self.sched.apply(plan, sampled, &self.eos);
                // The next masks of the constrained sequences, before anything else can schedule them.
                let stuck = self.sched.prepare_masks();
                // Metrics first, events second: a client whose response completes must see its own request
                // counted and no longer running.
                self.publish();
                // First tokens go out first: their handlers are then first in the HTTP runtime's queue, ahead
                // of the streams that already have theirs (a newcomer's time to first token should not
                // include 64 other streams' writes).
                let (first, flowing): (Vec<Outcome>, Vec<Outcome>) =
                    outcomes.into_iter().partition(|o| self.tracks.get(&o.id).is_some_and(|t| t.last_token.is_none()));
                let now = Instant::now();
                let mut generated = 0;
                for o in first.into_iter().chain(flowing) {
                    generated += self.emit(o, now) as u64;
                }
                self.metrics.generation_tokens.inc_by(generated);
                for (id, message) in stuck {
                    self.fail_sequence(id, &message, "grammar");
                }
            }
            // The replica is lost; `run` hands its sequences over.
            Err(e) if e.is_fatal() => self.failed = Some(e.to_string()),
            Err(e) => self.fail_refused(plan, &e.to_string()),
        }
        // A newcomer's first token leaves now, while the step it paused goes on.
        self.outbox.flush();
    }

    /// The step in flight (`tokens` tokens) paused after running for `own`: take new requests in and, if the scheduler plans a
    /// newcomer's step, run it (its first token goes out) before the step goes on. Newcomers get at most as
    /// much time as the paused step itself, so its decodes advance at least half the time (as "never twice
    /// in a row" keeps between whole steps): the step pauses again only once it has run as long as what ran
    /// in its pauses. Commands other than new requests wait for the step to end: its sequences must stay as
    /// they are.
    fn while_paused(
        &mut self,
        rx: &mpsc::Receiver<Command>,
        batch: &[OwnedStepSeq],
        tokens: usize,
        span: &tracing::Span,
        mut own: Duration,
        aside: &mut Duration,
    ) -> Result<Vec<SeqSampled>, StepFailure> {
        let views: Vec<StepSeq<'_>> = batch.iter().map(OwnedStepSeq::view).collect();
        loop {
            let t = Instant::now();
            self.hub.stats.newcomer.store(false, Ordering::Release);
            while let Ok(c) = rx.try_recv() {
                match c {
                    Command::Submit(..) | Command::Adopt(_) => self.handle(c),
                    other => self.deferred.push(other),
                }
            }
            if *aside <= own && self.failed.is_none() {
                let plan = self.sched.schedule_during(tokens, t);
                if !plan.is_empty() {
                    self.execute(&plan, t, None);
                }
            }
            *aside += t.elapsed();
            let owed = aside.saturating_sub(own);
            let stats = self.hub.stats.clone();
            let resumed = Instant::now();
            let pause = move || resumed.elapsed() >= owed && stats.newcomer.load(Ordering::Acquire);
            // Refusing to resume is not refusing a step: the paused step is stuck half-way, the replica lost.
            let cpu = thread_cpu_time();
            let out = span.in_scope(|| self.backend.resume(&views, &pause));
            self.backend_cpu += thread_cpu_time() - cpu;
            let out = out.map_err(|e| match e {
                StepFailure::Refused(m) => StepFailure::Internal(format!("resuming a paused step: {m}")),
                e => e,
            })?;
            own += resumed.elapsed();
            if let Some(out) = out {
                return Ok(out);
            }
        }
    }

    /// The prompt tokens the step scored, to each choice's handler: only prompt positions (a recompute after
    /// a preemption also covers generated tokens, which are not the prompt's).
    fn send_prompt_scores(&mut self) {
        for p in self.backend.take_prompt_scores() {
            let Some(t) = self.tracks.get(&p.id) else { continue };
            let n = t.prompt_tokens.saturating_sub(p.first_position).min(p.tokens.len());
            if n == 0 {
                continue;
            }
            let (mut tokens, mut ranks) = (p.tokens, p.ranks);
            tokens.truncate(n);
            ranks.truncate(n);
            self.outbox.push(p.id, Event::Prompt { choice: t.choice, first_position: p.first_position, tokens, ranks });
        }
    }

    /// Sends a sampled token to its handler, and the end if it finished; false if no one waits for it.
    fn emit(&mut self, o: Outcome, now: Instant) -> bool {
        let Some(t) = self.tracks.get_mut(&o.id) else { return false };
        match t.last_token {
            None => {
                self.metrics.time_to_first_token.observe((now - t.arrival).as_secs_f64());
                self.metrics.prompt_tokens.inc_by(t.prompt_tokens as u64);
            }
            Some(prev) => self.metrics.inter_token_latency.observe((now - prev).as_secs_f64()),
        }
        t.last_token = Some(now);
        let token = Event::Token {
            choice: t.choice,
            token: o.sampled.token,
            logprob: o.sampled.logprob,
            top_logprobs: o.sampled.top_logprobs,
        };
        self.outbox.push(o.id, token);
        if let Some(reason) = o.finished {
            let finished = |t: &Track| Event::Finished {
                choice: t.choice,
                reason,
                prompt_tokens: t.prompt_tokens,
                cached_tokens: o.cached_tokens,
            };
            let t = self.untrack_with(o.id, finished).expect("tracked");
            self.backend.release(&[o.id]);
            let label = if reason == FinishReason::Stop { "stop" } else { "length" };
            self.metrics.request_success.get_or_create(&vec![("finished_reason", label)]).inc();
            self.metrics.e2e_request_latency.observe(t.arrival.elapsed().as_secs_f64());
        }
        true
    }

    /// Nothing could be scheduled although sequences are there: prefills are waiting for blocks other
    /// prefills hold. The scheduler makes room by preempting, or fails a sequence that can never fit
    /// (requests are validated against the pool, so that is a safety net).
    fn fail_unschedulable(&mut self) {
        if self.sched.is_idle() {
            return;
        }
        if let Some(id) = self.sched.unstick() {
            let error =
                |t: &Track| Event::Error { choice: t.choice, message: "the request does not fit the KV cache".into() };
            if self.untrack_with(id, error).is_some() {
                self.metrics.request_failure.get_or_create(&vec![("kind", "kv_cache")]).inc();
            }
            self.backend.release(&[id]);
        }
    }

    /// Ends one sequence with an error its handler hears (`kind` labels the failure metric).
    fn fail_sequence(&mut self, id: u64, message: &str, kind: &'static str) {
        if self.sched.abort(id).is_some() {
            self.backend.release(&[id]);
        }
        if self.untrack_with(id, |t| Event::Error { choice: t.choice, message: message.to_string() }).is_some() {
            self.metrics.request_failure.get_or_create(&vec![("kind", kind)]).inc();
        }
    }

    /// A step the backend refused: it validated the batch and changed nothing, so the replica serves on and
    /// only the step's own sequences end, each with the reason.
    fn fail_refused(&mut self, plan: &[Planned], message: &str) {
        tracing::warn!(sequences = plan.len(), "step refused: {message}");
        for p in plan {
            self.fail_sequence(p.id, message, "refused");
        }
        self.publish();
    }

    fn publish(&mut self) {
        let st = &self.hub.stats;
        st.running.store(self.sched.num_running(), Ordering::Relaxed);
        st.waiting.store(self.sched.num_waiting(), Ordering::Relaxed);
        let now = self.sched.stats();
        st.blocks_used.store(now.blocks_used, Ordering::Relaxed);
        // Counters grow by what this replica added since it last published, so replicas add up and a
        // replica that fails takes nothing back.
        let was = self.published;
        let m = &self.metrics;
        m.num_preemptions.inc_by(now.preemptions - was.preemptions);
        m.prefix_cache_queries.inc_by(now.prefix_cache_queries - was.prefix_cache_queries);
        m.prefix_cache_hits.inc_by(now.prefix_cache_hits - was.prefix_cache_hits);
        m.newcomer_steps.inc_by(now.newcomer_steps - was.newcomer_steps);
        m.steps_paused.inc_by(now.steps_paused - was.steps_paused);
        self.published = now;
        self.hub.host.stats_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        engine::{
            backend::{ModelInfo, RankFailure, WorkerTiming},
            contract::GenRequest,
        },
        replicas::Replicas,
    };
    use tessera_proto::step::SamplingParams;
    use tessera_proto::step::{Sampled, SeqSampled, StepSeq};
    use tokio::sync::mpsc::UnboundedSender;
    use tokio::sync::mpsc::{UnboundedReceiver, error::TryRecvError, unbounded_channel};

    /// What the test lets a waiting step do.
    #[derive(Debug)]
    enum Go {
        /// Finish.
        Finish,
        /// Pause if asked to (a pausable step), else finish.
        Check,
        /// Fail the step this way.
        Fail(StepFailure),
    }

    /// Samples `id % 1000` for every sequence that asks, one step per message on `go`; says on `entered`
    /// which sequences a step holds once it is planned and waiting for that message. Pausable.
    struct Stepped {
        go: mpsc::Receiver<Go>,
        entered: mpsc::Sender<Vec<u64>>,
        /// Adapters loaded, refusing steps that name any other (as a worker does); each load and unload is
        /// reported on `adapter_log`.
        adapters: std::collections::HashSet<u32>,
        adapter_log: mpsc::Sender<String>,
    }

    impl Stepped {
        fn wait(
            &mut self,
            batch: &[StepSeq<'_>],
            pause: &(dyn Fn() -> bool + Sync),
        ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
            if let Some(s) = batch.iter().find(|s| s.adapter != 0 && !self.adapters.contains(&s.adapter)) {
                return Err(StepFailure::Refused(format!("adapter {} is not loaded", s.adapter)));
            }
            let _ = self.entered.send(batch.iter().map(|s| s.id).collect());
            let go = self.go.recv().map_err(|_| StepFailure::Internal("the test is over".into()))?;
            match go {
                Go::Fail(f) => return Err(f),
                Go::Check if pause() => return Ok(None),
                _ => {}
            }
            Ok(Some(
                batch
                    .iter()
                    .filter(|s| s.sample.is_some())
                    .map(|s| SeqSampled {
                        id: s.id,
                        sampled: Sampled { token: (s.id % 1000) as u32, logprob: None, top_logprobs: vec![] },
                    })
                    .collect(),
            ))
        }
    }

    impl Backend for Stepped {
        fn info(&self) -> ModelInfo {
            ModelInfo { vocab_size: 2000, max_position_embeddings: 64, num_blocks: 64, block_size: 4, world_size: 1 }
        }
        fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, StepFailure> {
            Ok(self.wait(batch, &|| false)?.unwrap_or_default())
        }
        fn can_pause(&self) -> bool {
            true
        }
        fn step_pausable(
            &mut self,
            batch: &[StepSeq<'_>],
            pause: &(dyn Fn() -> bool + Sync),
        ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
            self.wait(batch, pause)
        }
        fn resume(
            &mut self,
            batch: &[StepSeq<'_>],
            pause: &(dyn Fn() -> bool + Sync),
        ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
            self.wait(batch, pause)
        }
        fn release(&mut self, _: &[u64]) {}
        fn last_timings(&self) -> Vec<WorkerTiming> {
            Vec::new()
        }
        fn load_adapter(&mut self, spec: &tessera_proto::step::AdapterSpec) -> Result<(), String> {
            if spec.path.contains("bad") {
                return Err(format!("{}: no adapter_config.json", spec.path));
            }
            self.adapters.insert(spec.id);
            let _ = self.adapter_log.send(format!("load {}", spec.id));
            Ok(())
        }
        fn unload_adapter(&mut self, id: u32) -> Result<(), String> {
            self.adapters.remove(&id);
            let _ = self.adapter_log.send(format!("unload {id}"));
            Ok(())
        }
    }

    fn token(rx: &mut UnboundedReceiver<Event>) -> u32 {
        match rx.blocking_recv() {
            Some(Event::Token { token, .. }) => token,
            other => panic!("expected a token, got {other:?}"),
        }
    }

    /// The token of a one-token request, and its end.
    fn only_token(rx: &mut UnboundedReceiver<Event>) -> u32 {
        let t = token(rx);
        assert!(matches!(rx.blocking_recv(), Some(Event::Finished { .. })));
        t
    }

    struct Harness {
        replicas: Arc<Replicas>,
        metrics: Arc<Metrics>,
        go: mpsc::Sender<Go>,
        entered: mpsc::Receiver<Vec<u64>>,
        adapter_log: mpsc::Receiver<String>,
    }

    impl Harness {
        fn new(max_num_seqs: usize) -> Self {
            let (go, steps) = mpsc::channel();
            let (entered_tx, entered) = mpsc::channel();
            let (log_tx, adapter_log) = mpsc::channel();
            let backend = Stepped { go: steps, entered: entered_tx, adapters: Default::default(), adapter_log: log_tx };
            let metrics = Arc::new(Metrics::new("m"));
            let replicas = Replicas::new(backend.info(), metrics.clone());
            let cfg = SchedulerConfig { max_num_seqs, max_batched_tokens: 64, max_model_len: 64 };
            replicas.add(Box::new(backend), cfg, vec![], "g", vec![], Box::new(()));
            Harness { replicas, metrics, go, entered, adapter_log }
        }

        /// Submits a request of `flow` reporting to `events`; returns the token its sequence samples.
        fn submit(&self, flow: &str, max_tokens: usize, events: &UnboundedSender<Event>) -> u32 {
            self.submit_n(flow, max_tokens, 1, events)[0]
        }

        /// A request of `n` choices: the tokens of its sequences.
        fn submit_n(&self, flow: &str, max_tokens: usize, n: usize, events: &UnboundedSender<Event>) -> Vec<u32> {
            self.submit_with(flow, max_tokens, n, 0, events)
        }

        /// [`Harness::submit_n`] with LoRA adapter `adapter`.
        fn submit_with(
            &self,
            flow: &str,
            max_tokens: usize,
            n: usize,
            adapter: u32,
            events: &UnboundedSender<Event>,
        ) -> Vec<u32> {
            let id = self.replicas.next_request_id();
            let req = GenRequest {
                id,
                prompt: vec![1, 2, 3],
                params: SamplingParams::greedy(),
                max_tokens,
                ignore_eos: true,
                constraint: None,
                adapter,
                n,
                first_choice: 0,
                flow: Some(flow.into()),
                weight: 1.0,
                events: events.clone(),
                span: tracing::Span::none(),
            };
            assert!(self.replicas.submit(req));
            (0..n).map(|c| (seq_id(id, c) % 1000) as u32).collect()
        }

        /// Waits for the next step to be planned; returns its sequences' tokens.
        fn entered(&self) -> Vec<u32> {
            self.entered.recv().unwrap().into_iter().map(|id| (id % 1000) as u32).collect()
        }

        fn step(&self) -> Vec<u32> {
            let ids = self.entered();
            self.go.send(Go::Finish).unwrap();
            ids
        }
    }

    /// The next event, whatever it is (the loop runs on its own thread).
    fn next(rx: &mut UnboundedReceiver<Event>) -> Event {
        rx.blocking_recv().expect("the loop keeps the channel open until the request ends")
    }

    #[test]
    fn a_refused_step_fails_only_its_sequences_and_the_replica_serves_on() {
        let h = Harness::new(4);
        let (events, mut rx) = unbounded_channel();
        h.submit("a", 4, &events);
        h.entered();
        h.go.send(Go::Fail(StepFailure::Refused("worker rank 0 at x refused the step: bad".into()))).unwrap();
        match next(&mut rx) {
            Event::Error { message, .. } => assert!(message.contains("refused the step: bad"), "{message}"),
            other => panic!("expected the refusal, got {other:?}"),
        }
        assert!(h.replicas.is_ready(), "a refused step leaves the replica in routing");
        let (events, mut rx) = unbounded_channel();
        let t = h.submit("a", 1, &events);
        h.step();
        assert_eq!(only_token(&mut rx), t, "the replica still serves");
        let refused = h.metrics.request_failure.get_or_create(&vec![("kind", "refused")]).get();
        assert_eq!(refused, 1);
    }

    #[test]
    fn a_lost_rank_retires_the_replica_and_names_the_rank() {
        let h = Harness::new(4);
        let (events, mut rx) = unbounded_channel();
        h.submit("a", 4, &events);
        h.entered();
        let lost = RankFailure::Lost { rank: 1, address: "10.0.0.7:50051".into(), message: "unreachable".into() };
        h.go.send(Go::Fail(StepFailure::Group(vec![lost]))).unwrap();
        match next(&mut rx) {
            Event::Error { message, .. } => {
                assert!(message.contains("no healthy replica"), "{message}");
                assert!(message.contains("worker rank 1 at 10.0.0.7:50051 failed: unreachable"), "{message}");
            }
            other => panic!("expected the failure, got {other:?}"),
        }
        assert!(!h.replicas.is_ready(), "the only replica is gone");
    }

    #[test]
    fn a_groups_failures_name_causes_before_consequences() {
        let mut f = vec![
            RankFailure::CollectiveBroken { rank: 0, address: "a:1".into(), message: "peer closed".into() },
            RankFailure::Timeout { rank: 2, address: "c:1".into(), timeout: Duration::from_secs(5) },
            RankFailure::Lost { rank: 1, address: "b:1".into(), message: "unreachable".into() },
        ];
        RankFailure::sort(&mut f);
        let failure = StepFailure::Group(f);
        assert!(failure.is_fatal());
        assert_eq!(
            failure.to_string(),
            "tensor-parallel group failed: worker rank 1 at b:1 failed: unreachable; \
             worker rank 2 at c:1 did not answer within 5s; worker rank 0 at a:1: peer closed"
        );
        assert!(!StepFailure::Refused("x".into()).is_fatal());
    }

    #[test]
    fn a_first_token_goes_out_before_the_tokens_of_streams_already_flowing() {
        let h = Harness::new(4);
        // Both requests report to one channel, so the order of their events is visible.
        let (events, mut rx) = unbounded_channel();
        let flowing = h.submit("a", 8, &events);
        h.step();
        assert_eq!(token(&mut rx), flowing, "its prefill");
        // Once the loop has planned `flowing`'s next decode, the new request can only join the step after.
        h.entered();
        let new = h.submit("a", 8, &events);
        h.go.send(Go::Finish).unwrap();
        assert_eq!(token(&mut rx), flowing);
        h.step();
        // One step: `flowing`'s decode is planned first, the newcomer's first token is sent first.
        assert_eq!([token(&mut rx), token(&mut rx)], [new, flowing]);
    }

    #[test]
    fn a_newcomer_runs_while_the_step_in_flight_is_paused() {
        let h = Harness::new(2);
        let (a_events, mut a) = unbounded_channel();
        let (b_events, mut b) = unbounded_channel();
        // A holds both slots (one request of two choices): its prefills, then a decode step in flight.
        let a12 = h.submit_n("a", 8, 2, &a_events);
        let (a1, a2) = (a12[0], a12[1]);
        assert_eq!(h.step(), [a1, a2]);
        assert_eq!((token(&mut a), token(&mut a)), (a1, a2));
        assert_eq!(h.entered(), [a1, a2]);

        // The submission raises the replica's flag; the step pauses when it next looks.
        let newcomer = h.submit("b", 8, &b_events);
        h.go.send(Go::Check).unwrap();
        // B's prefill runs in the middle, over the full slots, and its first token goes out at once.
        assert_eq!(h.step(), [newcomer]);
        assert_eq!(token(&mut b), newcomer);
        assert!(matches!(a.try_recv(), Err(TryRecvError::Empty)), "A's step has not finished");
        // A's step goes on, and is not paused again.
        assert_eq!(h.entered(), [a1, a2]);
        h.go.send(Go::Check).unwrap();
        assert_eq!((token(&mut a), token(&mut a)), (a1, a2));
        // The slot B took is given back before the next step: A's newest waits.
        assert_eq!(h.step(), [a1, newcomer]);
        // (Its tokens go out after the metrics are published.)
        assert_eq!((token(&mut a), token(&mut b)), (a1, newcomer));
        assert_eq!(h.metrics.steps_paused.get(), 1);
        assert_eq!(h.metrics.newcomer_steps.get(), 1);
        assert_eq!(h.metrics.num_preemptions.get(), 1);
    }

    #[test]
    fn newcomers_get_at_most_as_much_time_in_a_paused_step_as_the_step_itself() {
        // Step durations here are the test's: a step "computes" for as long as the test holds it.
        let compute = || std::thread::sleep(Duration::from_millis(150));
        let h = Harness::new(16);
        let (a_events, mut a) = unbounded_channel();
        let (n_events, mut n) = unbounded_channel();
        let a_seqs = h.submit_n("a", 8, 8, &a_events);
        h.entered();
        compute();
        h.go.send(Go::Finish).unwrap();
        for _ in 0..8 {
            token(&mut a);
        }
        let decodes = |ids: Vec<u32>| assert_eq!(ids, a_seqs);

        // A's decode step computes for a while, then pauses for newcomer B (one token, done at once).
        decodes(h.entered());
        compute();
        let b = h.submit("b", 1, &n_events);
        h.go.send(Go::Check).unwrap();
        assert_eq!(h.step(), [b]);
        assert_eq!(only_token(&mut n), b);
        // B took little of the step's time: it pauses again at once for newcomer C.
        decodes(h.entered());
        let c = h.submit("c", 1, &n_events);
        h.go.send(Go::Check).unwrap();
        assert_eq!(h.step(), [c]);
        assert_eq!(only_token(&mut n), c);
        decodes(h.step());
        for _ in 0..8 {
            token(&mut a);
        }

        // The next decode step pauses at once for D, whose step takes long.
        decodes(h.entered());
        let d = h.submit("d", 1, &n_events);
        h.go.send(Go::Check).unwrap();
        assert_eq!(h.entered(), [d]);
        compute();
        h.go.send(Go::Finish).unwrap();
        assert_eq!(only_token(&mut n), d);
        // E arrives: the step owes its decodes D's time first, so it finishes instead of pausing.
        decodes(h.entered());
        let e = h.submit("e", 1, &n_events);
        h.go.send(Go::Check).unwrap();
        for _ in 0..8 {
            token(&mut a);
        }
        assert!(matches!(n.try_recv(), Err(TryRecvError::Empty)), "E waited for the step");
        assert!(h.step().contains(&e));
        assert_eq!(only_token(&mut n), e);
        assert_eq!(h.metrics.steps_paused.get(), 3);
    }

    #[test]
    fn a_request_of_a_flow_already_running_does_not_pause_the_step() {
        let h = Harness::new(4);
        let (events, mut a) = unbounded_channel();
        let a1 = h.submit("a", 8, &events);
        h.step();
        assert_eq!(token(&mut a), a1);
        assert_eq!(h.entered(), [a1]);
        let a2 = h.submit("a", 8, &events);
        h.go.send(Go::Check).unwrap();
        // The step finished instead of pausing; A's second request joins the next one.
        assert_eq!(token(&mut a), a1);
        assert_eq!(h.step(), [a1, a2]);
        assert_eq!(h.metrics.steps_paused.get(), 0);
    }

    #[test]
    fn an_adapter_unloaded_while_in_use_goes_once_its_sequences_finish_and_a_failed_load_leaves_nothing() {
        let h = Harness::new(4);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let err = rt.block_on(h.replicas.load_adapter("broken", "/bad/dir", "m")).unwrap_err();
        assert!(err.to_string().contains("/bad/dir: no adapter_config.json"), "{err}");
        assert_eq!(h.replicas.adapters.resolve("broken"), None, "a failed load registers nothing");
        // Replicas that did load a failed adapter drop it again (here none had).
        assert_eq!(h.adapter_log.recv().unwrap(), "unload 1");
        let spec = rt.block_on(h.replicas.load_adapter("sql", "/adapters/sql", "m")).unwrap();
        assert_eq!(spec.id, 2, "ids are never reused");
        assert_eq!(h.adapter_log.recv().unwrap(), "load 2");
        assert_eq!(h.replicas.adapters.resolve("sql"), Some(spec.id));

        let (tx, mut rx) = unbounded_channel();
        h.submit_with("a", 3, 1, spec.id, &tx);
        h.step();
        assert!(matches!(next(&mut rx), Event::Token { .. }));
        h.replicas.unload_adapter("sql").unwrap();
        assert_eq!(h.replicas.adapters.resolve("sql"), None, "new requests cannot name it");
        // The loop takes the unload in before its next step, and keeps the adapter for the sequence.
        h.step();
        assert!(matches!(next(&mut rx), Event::Token { .. }));
        assert_eq!(h.adapter_log.try_recv(), Err(mpsc::TryRecvError::Empty), "unloaded under a running sequence");
        h.step();
        assert!(matches!(next(&mut rx), Event::Token { .. }));
        assert!(matches!(next(&mut rx), Event::Finished { .. }));
        assert_eq!(h.adapter_log.recv().unwrap(), format!("unload {}", spec.id));

        // A request that resolved the adapter before its unload and arrives after it fails alone; a step
        // naming the adapter would be refused whole.
        let (late_tx, mut late) = unbounded_channel();
        h.submit_with("b", 2, 1, spec.id, &late_tx);
        match next(&mut late) {
            Event::Error { message, .. } => assert!(message.contains("is not loaded"), "{message}"),
            other => panic!("expected an error, got {other:?}"),
        }
        let (base_tx, mut base) = unbounded_channel();
        h.submit("c", 1, &base_tx);
        h.step();
        assert!(matches!(next(&mut base), Event::Token { .. }));
    }
}
