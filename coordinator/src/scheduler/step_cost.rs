//! What steps cost on a replica, learned from the steps it runs: the average duration of recent steps,
//! and of steps of each size, sizes grouped by powers of two (1, 2-3, 4-7, ... tokens).
//!
//! The scheduler asks it one question: would running a newcomer's prefill in a step of its own, ahead of
//! the decodes, get its first token out much sooner? Joining the decodes (or waiting for the step in
//! flight), its first token comes after a step of that size; alone, after a step of its own size. The
//! decodes pay the fixed cost of one more step. On a compute-bound backend (the CPU) a step of 64 decodes
//! costs several times a short prefill: the newcomer's first token comes out in a fraction of the time, for
//! a few hundred microseconds of the decodes'. On a memory-bound GPU a step costs about the same whatever
//! its size: alone gains the newcomer nothing, and it rides along with the decodes. The test is that a
//! step of the decodes' size takes more than [`SEPARATE_STEP_RATIO`] times a step of the newcomer's size,
//! between those two regimes (about 1 on a GPU; 2-6 for stories260K on the CPU, lowest on a busy machine,
//! and about 4.5 for a 124.7M-parameter model). Both sides are per-size averages: the average of recent steps, used when
//! the decodes' size has no fresh one, counts the newcomers' own steps too, and a stream of newcomers
//! would pull it down to their own cost and talk the scheduler out of their steps.
//!
//! A size not seen for a while (or never) is worth one separate step to measure it: otherwise an average
//! taken in a bad moment would decide forever, since a newcomer that joins the decodes never refreshes it.
//! That costs at most a step's fixed cost per size per [`STALE`].
//!
//! (A straight-line fit of time against size over recent steps was tried first: under load the steps'
//! sizes vary too little, and decodes at long contexts cost more per token than short prefills, to
//! extrapolate down to a short prefill.)

use std::time::{Duration, Instant};

const BUCKETS: usize = 32;
/// Weight of the newest step in the recent average.
const ALPHA: f64 = 0.25;
/// Weights of the newest step in a size's average when it is above it and below it. A busy machine only
/// ever adds time to a step (the thread was descheduled), so a size's cost follows the lower envelope:
/// one slow step moves it little, a fast one a lot.
const ALPHA_UP: f64 = 0.1;
const ALPHA_DOWN: f64 = 0.5;
/// How many times a step of the newcomer's size the decodes' step must take for a step of its own to pay
/// (module doc). It was 2 until stories260K's attention got faster: under a flood its 64 decodes then took
/// 1.8-1.9 times its 16-token prefill, and a third of a newcomer key's prefills joined the decodes.
pub const SEPARATE_STEP_RATIO: f64 = 1.5;
/// Age after which a size's average is measured again.
pub const STALE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, Default)]
pub struct StepCost {
    /// Average duration of steps of each size, and when it was last updated.
    by_size: [Option<(f64, Instant)>; BUCKETS],
    /// Average duration of the recent steps, whatever their size.
    recent: Option<f64>,
}

fn bucket(tokens: usize) -> usize {
    (tokens.max(1).ilog2() as usize).min(BUCKETS - 1)
}

fn average(avg: Option<f64>, seconds: f64, up: f64, down: f64) -> f64 {
    avg.map_or(seconds, |a| a + if seconds > a { up } else { down } * (seconds - a))
}

impl StepCost {
    /// Records a step of `tokens` tokens that took `seconds`, at `now`.
    pub fn observe(&mut self, tokens: usize, seconds: f64, now: Instant) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let b = &mut self.by_size[bucket(tokens)];
        *b = Some((average(b.map(|(a, _)| a), seconds, ALPHA_UP, ALPHA_DOWN), now));
        self.recent = Some(average(self.recent, seconds, ALPHA, ALPHA));
    }

    /// Average seconds of the steps of `tokens`' size, if seen within [`STALE`] of `now`.
    pub fn estimate(&self, tokens: usize, now: Instant) -> Option<f64> {
        self.by_size[bucket(tokens)].filter(|&(_, at)| now.saturating_duration_since(at) < STALE).map(|(a, _)| a)
    }

    /// Whether a newcomer's `prefill` tokens should get a step of their own rather than wait for or join a
    /// step of `decodes` tokens (see the module doc); also `true` when a step of the newcomer's size is
    /// unknown or stale, to measure it. `false` before any step has run.
    pub fn separate_prefill_pays(&self, prefill: usize, decodes: usize, now: Instant) -> bool {
        let Some(wait) = self.estimate(decodes, now).or(self.recent) else { return false };
        self.estimate(prefill, now).is_none_or(|alone| wait > SEPARATE_STEP_RATIO * alone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_bound_steps_make_a_separate_prefill_pay_and_flat_ones_do_not() {
        let t = Instant::now();
        // Compute-bound: 0.1 ms fixed + 30 µs per token; then a run of 64-decode steps.
        let mut cpu = StepCost::default();
        assert!(!cpu.separate_prefill_pays(16, 64, t), "nothing has run");
        for size in [1, 2, 4, 8, 16, 32] {
            cpu.observe(size, 1e-4 + 3e-5 * size as f64, t);
        }
        for _ in 0..20 {
            cpu.observe(64, 1e-4 + 3e-5 * 64.0, t);
        }
        assert!(cpu.separate_prefill_pays(16, 64, t) && cpu.separate_prefill_pays(1, 64, t));
        assert!(cpu.separate_prefill_pays(32, 64, t), "half the decodes' size: its first token in half the time");

        // Mostly fixed cost (0.5 ms a step, 5 µs a token): alone, a newcomer's first token would come less
        // than a third sooner.
        let mut fixed = StepCost::default();
        for size in [16, 64] {
            fixed.observe(size, 5e-4 + 5e-6 * size as f64, t);
        }
        assert!(!fixed.separate_prefill_pays(16, 64, t));

        // Memory-bound (a GPU): 0.8 ms whatever the size.
        let mut gpu = StepCost::default();
        for size in [1, 2, 4, 8, 16, 32, 64, 64, 64] {
            gpu.observe(size, 8e-4 + 1e-7 * size as f64, t);
        }
        assert!(!gpu.separate_prefill_pays(16, 64, t) && !gpu.separate_prefill_pays(1, 64, t));
    }

    #[test]
    fn newcomers_own_steps_do_not_talk_the_scheduler_out_of_them() {
        // A model whose 64 decodes take 128 ms and a 16-token prefill 28 ms, a run of newcomers' steps after
        // each of the decodes' steps: the recent average sinks toward 28 ms, the decodes' own size does not.
        let t = Instant::now();
        let mut c = StepCost::default();
        for _ in 0..20 {
            c.observe(64, 0.128, t);
            for _ in 0..5 {
                c.observe(16, 0.028, t);
            }
        }
        assert!(c.recent.unwrap() < SEPARATE_STEP_RATIO * 0.028, "{:?}", c.recent);
        assert!(c.separate_prefill_pays(16, 64, t));
        // With no fresh step of the decodes' size, the recent average stands in.
        assert!(!c.separate_prefill_pays(16, 128, t));
    }

    #[test]
    fn an_unknown_or_stale_size_is_measured_and_averages_follow_the_load() {
        let t = Instant::now();
        let mut c = StepCost::default();
        c.observe(64, 8e-4, t);
        assert!(c.separate_prefill_pays(16, 64, t), "never seen: measure it");
        c.observe(16, 8e-4, t);
        assert!(!c.separate_prefill_pays(16, 64, t));
        let later = t + STALE;
        assert_eq!(c.estimate(16, later), None);
        assert!(c.separate_prefill_pays(16, 64, later), "seen too long ago: measure it again");
        // The recent average moves toward the new durations; bad values are ignored.
        for _ in 0..40 {
            c.observe(64, 4e-3, later);
        }
        c.observe(64, f64::NAN, later);
        assert!((c.recent.unwrap() - 4e-3).abs() < 1e-5);
        // A size's average follows the lower envelope: up slowly, down fast.
        let near = |x: Option<f64>, want: f64| x.is_some_and(|x| (x - want).abs() < 1e-12);
        c.observe(16, 1.8e-3, later);
        assert!(near(c.estimate(16, later), 8e-4 + ALPHA_UP * 1e-3));
        c.observe(16, 0.2e-3, later);
        assert!(near(c.estimate(16, later), 0.5 * (0.9e-3 + 0.2e-3)));
        assert!(c.separate_prefill_pays(16, 64, later));
    }
}
