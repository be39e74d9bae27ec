//! Steps that overlap the loop, for backends whose forward pass runs off its thread (a group of worker
//! processes): while step n runs, the loop takes requests in and plans step n + 1 as if every sequence in
//! step n goes on (`Scheduler::launch`). When step n lands, what it changed is corrected before step n + 1
//! leaves: its sampled tokens take their placeholders' places, and the sequences it finished (an end of
//! sequence, a length, a grammar that cannot go on) are dropped from step n + 1. Only then are step n's
//! tokens delivered, while step n + 1 runs. Outputs are those of steps run one after the other.

use std::time::Instant;

use super::{InFlight, Loop, thread_cpu_time};
use crate::{engine::backend::StepFailure, scheduler::Planned};

impl Loop {
    /// Steps that overlap the loop (module doc): lands the step in flight and sends the next, planned while
    /// it ran and corrected by what it sampled, before delivering its tokens; with none in flight, plans
    /// and sends one. False if there was nothing to run.
    pub(super) fn step_overlapped(&mut self) -> bool {
        let started = Instant::now();
        let Some(flight) = self.in_flight.take() else {
            let plan = self.sched.schedule();
            if plan.is_empty() {
                self.fail_unschedulable();
                return false;
            }
            self.send(plan, started);
            return true;
        };
        // As if every sequence in flight goes on: `Scheduler::launch` gave each a placeholder token.
        let mut next = self.sched.schedule();
        // Routing and the gauges see the admissions now, while the step runs.
        self.publish();
        let cpu = thread_cpu_time();
        let mut result = flight.span.in_scope(|| self.backend.wait());
        if let Err(StepFailure::Resend(ids)) = &result {
            tracing::warn!(sequences = ?ids, "workers hold no state of these sequences: sending the step in full");
            let again = self.sched.still_launched(&flight.plan);
            let inputs = self.sched.inputs(&again);
            result = flight.span.in_scope(|| self.backend.step(&inputs));
        }
        self.backend_cpu += thread_cpu_time() - cpu;
        self.observe_step(flight.tokens, flight.sent.elapsed());
        let sampled = match result {
            Ok(sampled) => sampled,
            Err(e) => {
                self.sched.rollback(&flight.plan);
                match e {
                    e if e.is_fatal() => self.failed = Some(e.to_string()),
                    e => self.fail_refused(&flight.plan, &e.to_string()),
                }
                return true;
            }
        };
        self.send_prompt_scores();
        let outcomes = self.sched.land(&flight.plan, sampled, &self.eos);
        let stuck = self.sched.prepare_masks();
        // Corrected before it leaves: what finished in the step just landed, or cannot go on, is not in it.
        next.retain(|p| self.sched.is_running(p.id) && !stuck.iter().any(|(id, _)| *id == p.id));
        if !next.is_empty() {
            self.send(next, started);
        }
        self.publish();
        self.deliver(outcomes);
        for (id, message) in stuck {
            self.fail_sequence(id, &message, "grammar");
        }
        true
    }

    /// Submits planned step `plan` to the backend; it lands at the next [`Loop::step_overlapped`].
    fn send(&mut self, plan: Vec<Planned>, started: Instant) {
        self.observe_queue_times(&plan, started);
        let tokens: usize = plan.iter().map(|p| p.end - p.start).sum();
        let span = self.step_span(&plan, tokens);
        let inputs = self.sched.inputs(&plan);
        let cpu = thread_cpu_time();
        let submitted = span.in_scope(|| self.backend.submit(&inputs));
        self.backend_cpu += thread_cpu_time() - cpu;
        drop(inputs);
        match submitted {
            Ok(()) => {
                self.sched.launch(&plan);
                self.in_flight = Some(InFlight { plan, tokens, span, sent: Instant::now() });
            }
            Err(e) if e.is_fatal() => self.failed = Some(e.to_string()),
            Err(e) => self.fail_refused(&plan, &e.to_string()),
        }
    }

    /// The replica is lost: the step in flight is given up, and its sequences go on elsewhere from what
    /// they had before it.
    pub(super) fn give_up_in_flight(&mut self) {
        if let Some(f) = self.in_flight.take() {
            self.sched.rollback(&f.plan);
        }
    }
}
