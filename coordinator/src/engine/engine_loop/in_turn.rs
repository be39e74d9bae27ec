//! Steps run one after the other: a step is planned once the one before has landed. With a backend that
//! can pause (in process), a step may stop between half-layers for a newcomer's prefill (module doc of
//! `engine_loop`).

use std::{
    sync::{atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use tessera_proto::step::{SeqSampled, StepSeq};

use super::{Loop, thread_cpu_time};
use crate::{
    engine::{
        backend::{OwnedStepSeq, StepFailure},
        link::Command,
    },
    scheduler::Planned,
};

impl Loop {
    /// Runs a planned step and applies it. With `rx` the step may pause for a newcomer (module doc).
    pub(super) fn execute(&mut self, plan: &[Planned], started: Instant, rx: Option<&mpsc::Receiver<Command>>) {
        self.observe_queue_times(plan, started);
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
        self.observe_step(tokens, t.elapsed().saturating_sub(aside));
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
                self.deliver(outcomes);
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
}
