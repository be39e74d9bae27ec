//! What a step costs on a replica, learned from the steps it has run: a moving average of the duration of
//! steps of each size, sizes grouped by powers of two (1, 2-3, 4-7, ... tokens).
//!
//! The scheduler asks it one question: would running a newcomer's prefill in a step of its own, ahead of
//! the decodes, get its first token out sooner by more than the extra step costs everyone else? On a
//! compute-bound backend (the CPU) a step of 64 decodes costs many times a short prefill, and the answer is
//! yes; on a memory-bound GPU a step costs about the same whatever its size, and the answer is no: there
//! the newcomer rides along with the decodes at no cost. Steps are timed as they run, so the answer follows
//! the machine's load (a straight-line fit over recent steps was tried first: under load their sizes vary
//! too little, and decodes at long contexts cost more per token than short prefills, to extrapolate).

const BUCKETS: usize = 32;
/// Weight of the newest step of a size in its average.
const ALPHA: f64 = 0.25;

#[derive(Clone, Copy, Debug, Default)]
pub struct StepCost {
    seconds: [Option<f64>; BUCKETS],
}

fn bucket(tokens: usize) -> usize {
    (tokens.max(1).ilog2() as usize).min(BUCKETS - 1)
}

impl StepCost {
    /// Records a step of `tokens` tokens that took `seconds`.
    pub fn observe(&mut self, tokens: usize, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let s = &mut self.seconds[bucket(tokens)];
        *s = Some(s.map_or(seconds, |avg| avg + ALPHA * (seconds - avg)));
    }

    /// Expected seconds of a step of `tokens` tokens: the average of its size, or failing that of the
    /// nearest larger size seen (an overestimate, which makes a separate step look less attractive).
    pub fn estimate(&self, tokens: usize) -> Option<f64> {
        self.seconds[bucket(tokens)..].iter().find_map(|s| *s)
    }

    /// Whether a step of `prefill` tokens of its own, before a step of `decodes` decodes, saves the newcomer
    /// more (the mixed step's time minus its own) than it costs the decodes (a step's worth of overhead:
    /// the two steps' time minus the mixed one's). `false` while a size has never been seen.
    pub fn separate_prefill_pays(&self, decodes: usize, prefill: usize) -> bool {
        let (Some(mixed), Some(alone), Some(dec)) =
            (self.estimate(decodes + prefill), self.estimate(prefill), self.estimate(decodes))
        else {
            return false;
        };
        mixed - alone > alone + dec - mixed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_bound_steps_make_a_separate_prefill_pay_and_flat_ones_do_not() {
        let mut cpu = StepCost::default();
        assert!(!cpu.separate_prefill_pays(64, 16), "nothing seen yet");
        // Compute-bound: 0.1 ms fixed + 30 µs per token, with noise.
        for i in 0..400 {
            let t = 1 + i % 130;
            cpu.observe(t, (1e-4 + 3e-5 * t as f64) * (0.95 + 0.1 * ((i * 7) % 10) as f64 / 10.0));
        }
        let e = cpu.estimate(64).unwrap();
        assert!((2.0e-3..5.0e-3).contains(&e), "{e}");
        assert!(cpu.separate_prefill_pays(64, 16) && cpu.separate_prefill_pays(64, 1));
        // A newcomer as large as the decodes gains too little.
        assert!(!cpu.separate_prefill_pays(64, 70));

        // Memory-bound (a GPU): 0.8 ms whatever the size.
        let mut gpu = StepCost::default();
        for i in 0..400 {
            gpu.observe(1 + i % 130, 8e-4 + 1e-7 * (i % 130) as f64);
        }
        assert!(!gpu.separate_prefill_pays(64, 16) && !gpu.separate_prefill_pays(64, 1));
    }

    #[test]
    fn averages_follow_the_load_and_unseen_sizes_borrow_from_larger_ones() {
        let mut c = StepCost::default();
        c.observe(64, 2e-3);
        assert_eq!(c.estimate(16), Some(2e-3), "the nearest larger size stands in");
        assert!(!c.separate_prefill_pays(64, 16), "an unseen size never looks cheaper");
        assert_eq!(c.estimate(200), None);
        c.observe(16, 0.5e-3);
        assert!(c.separate_prefill_pays(64, 16));
        // The machine gets busier: the 64-token average moves toward the new durations, the 16-token one
        // is kept until it is seen again.
        for _ in 0..20 {
            c.observe(64, 4e-3);
        }
        assert!((c.estimate(100).unwrap() - 4e-3).abs() < 1e-5);
        assert_eq!(c.estimate(16), Some(0.5e-3));
        c.observe(16, f64::NAN);
        assert_eq!(c.estimate(16), Some(0.5e-3));
    }
}
