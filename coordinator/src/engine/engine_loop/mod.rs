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
//! With a group of worker processes the steps overlap the loop (`--overlap`): while the workers run step
//! n, the loop takes requests in and plans step n + 1 as if every sequence goes on; what step n changes is
//! corrected before step n + 1 leaves, and step n's tokens are delivered while step n + 1 runs.
//!
//! A step that fails ends the replica: the loop takes itself out of routing, collects every sequence it
//! held (and every request still in its channel) as [`Migrant`]s, hands them to its [`LoopHost`] (`Replicas`) to
//! continue elsewhere, and exits, dropping its backend and whatever it kept alive.
//!
//! - `in_turn`: steps one after the other, and pausing a step for a newcomer;
//! - `overlapped`: steps that overlap the loop's planning.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use super::{
    backend::Backend,
    contract::{Event, FinishReason, seq_id},
    link::{Command, Hub, Migrant, Track},
    postman::Outbox,
};
mod in_turn;
mod overlapped;

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
    let overlap = cfg.overlap && backend.can_overlap() && !backend.can_pause();
    tracing::info!(replica = hub.replica, overlap, "engine loop starting");
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
        overlap,
        in_flight: None,
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
    /// Whether the next step is planned while one runs (module doc).
    overlap: bool,
    /// The step sent and not yet landed, when steps overlap.
    in_flight: Option<InFlight>,
}

/// A step the backend runs while the loop plans the next.
struct InFlight {
    plan: Vec<Planned>,
    tokens: usize,
    span: tracing::Span,
    sent: Instant,
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
            if self.sched.is_idle() && self.in_flight.is_none() && self.failed.is_none() {
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
        self.give_up_in_flight();
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
        if self.overlap {
            return self.step_overlapped();
        }
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

    /// Queueing ends for the sequences `plan` (planned at `started`) begins.
    fn observe_queue_times(&self, plan: &[Planned], started: Instant) {
        for p in plan {
            if p.start == 0
                && let Some(s) = self.sched.get(p.id)
                && s.first_scheduled.is_some_and(|t| t >= started)
            {
                self.metrics.request_queue_time.observe((started - s.arrival).as_secs_f64());
            }
        }
    }

    /// A step of `tokens` tokens took `on_workers`. Step timings are recorded before any event goes out,
    /// like the other metrics: a client whose response completes must find the step that completed it
    /// counted.
    fn observe_step(&mut self, tokens: usize, on_workers: Duration) {
        self.metrics.step_seconds.observe(on_workers.as_secs_f64());
        self.sched.observe_step(tokens, on_workers.as_secs_f64(), Instant::now());
        for (rank, t) in self.backend.last_timings().iter().enumerate() {
            let label = vec![("rank", rank.to_string())];
            self.metrics.worker_step_seconds.get_or_create(&label).observe(t.step_seconds);
            self.metrics.worker_collective_seconds.get_or_create(&label).observe(t.collective_seconds);
        }
    }

    /// A step's tokens, to their handlers. First tokens go out first: their handlers are then first in the
    /// HTTP runtime's queue, ahead of the streams that already have theirs (a newcomer's time to first
    /// token should not include 64 other streams' writes).
    fn deliver(&mut self, outcomes: Vec<Outcome>) {
        let (first, flowing): (Vec<Outcome>, Vec<Outcome>) = outcomes.into_iter().partition(|o| o.first);
        let now = Instant::now();
        let mut generated = 0;
        for o in first.into_iter().chain(flowing) {
            generated += self.emit(o, now) as u64;
        }
        self.metrics.generation_tokens.inc_by(generated);
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
mod tests;
