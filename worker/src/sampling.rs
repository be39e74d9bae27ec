//! Turning a row of logits into the next token: penalties, temperature, top-k, top-p, min-p, a seeded
//! draw, and the logprobs the API reports.
//!
//! Order of processing follows vLLM: logprobs are of the model's raw distribution; then penalties
//! (repetition over prompt and output, presence/frequency over output only, as OpenAI defines them);
//! temperature 0 is greedy; otherwise temperature, top-k, top-p, min-p, and a draw from the rest.
//! Each sequence owns its RNG, so a seeded request gives the same output whatever it is batched with.

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
/// Index of the largest value (the first one on ties), as `torch.argmax` picks: the kernels' definition,
/// which the GPU's argmax kernel follows too.
pub use tessera_kernels::cpu::sampling::argmax;
pub use tessera_proto::step::{Sampled, SamplingParams, mask_allows};

/// Per-sequence sampling state: the RNG and what the penalties need to know.
pub struct Sampler {
    rng: ChaCha8Rng,
    /// Tokens of the prompt and output (for the repetition penalty).
    seen: HashSet<u32>,
    /// Occurrences of each generated token (for presence and frequency penalties).
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Sampler { rng, seen: HashSet::new(), output_counts: HashMap::new() }
    }

    /// The next number in [0, 1) of this sequence's generator (for a draw made elsewhere, on a GPU).
    pub fn next_uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    /// Records prompt tokens (they count for the repetition penalty only).
    pub fn observe_prompt(&mut self, tokens: &[u32]) {
        self.seen.extend(tokens.iter().copied());
    }

    /// Records a generated token.
    pub fn observe_output(&mut self, token: u32) {
        self.seen.insert(token);
        *self.output_counts.entry(token).or_default() += 1;
    }

    /// Picks the next token from `logits` and records it as output. With `allowed` (constrained decoding,
    /// a bitmask as `StepSeq::allowed`) only an allowed token can be picked: the others' logits are −∞
    /// before anything else, as vLLM applies a grammar's bitmask before its logits processors.
    pub fn sample(&mut self, logits: &[f32], p: &SamplingParams, allowed: Option<&[u32]>) -> Sampled {
        let want_lp = p.logprobs || p.top_logprobs > 0;
        let log_z = if want_lp { log_sum_exp(logits) } else { 0.0 };

        let mut l = logits.to_vec();
        if let Some(mask) = allowed {
            for (t, v) in l.iter_mut().enumerate() {
                if !mask_allows(mask, t as u32) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / p.repetition_penalty } else { *v * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(v) = l.get_mut(t as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(v) = l.get_mut(t as usize) {
                *v += b;
            }
        }
        let token = if p.is_greedy() { argmax(&l) } else { self.draw(&mut l, p) };
        self.observe_output(token);

        let top_logprobs = top(logits, p.top_logprobs, log_z);
        Sampled { token, logprob: want_lp.then(|| logits[token as usize] - log_z), top_logprobs }
    }

    fn draw(&mut self, l: &mut [f32], p: &SamplingParams) -> u32 {
        for v in l.iter_mut() {
            *v /= p.temperature;
        }
        // Candidates sorted by logit, highest first (ties by id, for determinism).
        let mut cand: Vec<u32> = (0..l.len() as u32).collect();
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k, |a, b| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b)));
            cand.truncate(p.top_k);
        }
        cand.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b)));
        // Masked-out tokens (−∞) are no candidates: a rounding error in the draw below must not reach them.
        let possible = cand.iter().take_while(|&&t| l[t as usize] > f32::NEG_INFINITY).count().max(1);
        cand.truncate(possible);
        let max = l[cand[0] as usize];
        let mut probs: Vec<f32> = cand.iter().map(|&t| (l[t as usize] - max).exp()).collect();
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= z);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut acc = 0.0;
            let keep = probs.iter().position(|&q| {
                acc += q;
                acc >= p.top_p
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            cand.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let z: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * z;
        for (t, q) in cand.iter().zip(&probs) {
            if u < *q {
                return *t;
            }
            u -= q;
        }
        *cand.last().expect("at least one candidate")
    }
}

/// A token that was given rather than drawn (a prompt token): its logprob under the raw `logits` of the
/// position before it, and the `k` most likely tokens there, exactly as a sampled token reports them; and
/// its rank there (1 + the tokens more likely than it).
pub fn score(logits: &[f32], token: u32, k: usize) -> (Sampled, u32) {
    let log_z = log_sum_exp(logits);
    let own = logits[token as usize];
    let rank = 1 + logits.iter().filter(|&&l| l > own).count() as u32;
    (Sampled { token, logprob: Some(own - log_z), top_logprobs: top(logits, k, log_z) }, rank)
}

/// The `k` largest logits as (token, logprob), highest first; ties go to the lower id.
fn top(logits: &[f32], k: usize, log_z: f32) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by_logit_desc);
        idx.truncate(k);
    }
    idx.sort_by(by_logit_desc);
    idx.into_iter().map(|t| (t, logits[t as usize] - log_z)).collect()
}

fn log_sum_exp(v: &[f32]) -> f32 {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = v.iter().map(|&x| ((x - m) as f64).exp()).sum();
    m + s.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_picks_argmax_and_reports_logprobs() {
        let p = SamplingParams { logprobs: true, top_logprobs: 3, ..SamplingParams::greedy() };
        let s = Sampler::new(Some(1)).sample(&logits(), &p, None);
        assert_eq!(s.token, 1);
        let z: f32 = logits().iter().map(|x| x.exp()).sum();
        assert!((s.logprob.unwrap() - (3f32.exp() / z).ln()).abs() < 1e-6);
        let ids: Vec<u32> = s.top_logprobs.iter().map(|x| x.0).collect();
        assert_eq!(ids, [1, 5, 2]);
    }

    #[test]
    fn penalties_shift_the_choice() {
        let mut s = Sampler::new(Some(1));
        s.observe_prompt(&[1]);
        // 3.0 / 2 = 1.5 < 2.9: token 5 wins.
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        assert_eq!(s.sample(&logits(), &p, None).token, 5);
        // Now 5 has been generated once; presence 0.5 pushes it to 2.4 < 2.5.
        let p = SamplingParams { presence_penalty: 0.5, ..SamplingParams::greedy() };
        assert_eq!(Sampler::new(None).sample(&logits(), &p, None).token, 1);
        assert_eq!(s.sample(&logits(), &SamplingParams { repetition_penalty: 2.0, ..p }, None).token, 2);
    }

    #[test]
    fn logit_bias_moves_the_choice_and_leaves_the_reported_logprobs_raw() {
        let raw =
            Sampler::new(None).sample(&logits(), &SamplingParams { top_logprobs: 2, ..SamplingParams::greedy() }, None);
        // +100 on an unlikely token makes it certain, greedy or drawn; -100 on the best one hands its place
        // to the runner-up.
        let push = |t: u32, b: f32, temperature: f32| SamplingParams {
            temperature,
            top_logprobs: 2,
            logit_bias: vec![(t, b)],
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(Some(3));
        let biased = s.sample(&logits(), &push(0, 100.0, 0.0), None);
        assert_eq!(biased.token, 0);
        assert!((0..20).all(|_| s.sample(&logits(), &push(0, 100.0, 1.0), None).token == 0));
        assert_eq!(
            Sampler::new(None).sample(&logits(), &push(raw.token, -100.0, 0.0), None).token,
            raw.top_logprobs[1].0
        );
        // What is reported is the model's distribution, not the biased one.
        assert_eq!(biased.top_logprobs, raw.top_logprobs);
        assert!(biased.logprob.unwrap() < raw.logprob.unwrap());
        // Out-of-vocabulary ids are the API's to refuse; here they change nothing.
        assert_eq!(Sampler::new(None).sample(&logits(), &push(9999, 100.0, 0.0), None).token, raw.token);
    }

    #[test]
    fn seeded_draws_repeat_and_respect_filters() {
        let p = SamplingParams { temperature: 0.8, seed: Some(7), ..Default::default() };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.seed);
            (0..50).map(|_| s.sample(&logits(), p, None).token).collect::<Vec<_>>()
        };
        assert_eq!(run(&p), run(&p));
        assert!(run(&p).iter().collect::<HashSet<_>>().len() > 2, "temperature 0.8 should vary");
        let k2 = SamplingParams { top_k: 2, ..p.clone() };
        assert!(run(&k2).iter().all(|t| [1, 5].contains(t)));
        let top_p = SamplingParams { top_p: 0.5, ..p.clone() };
        assert!(run(&top_p).iter().all(|t| [1, 5].contains(t)));
        let min_p = SamplingParams { min_p: 0.7, ..p.clone() };
        assert!(run(&min_p).iter().all(|t| [1, 5, 2].contains(t)));
    }

    #[test]
    fn draw_frequencies_follow_the_distribution() {
        let p = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
        let mut s = Sampler::new(p.seed);
        let l = [0.0f32, 1f32.ln(), 2f32.ln()]; // probabilities 1/4, 1/4, 1/2
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[s.sample(&l, &p, None).token as usize] += 1;
        }
        let f = counts.map(|c| c as f32 / 20000.0);
        assert!((f[0] - 0.25).abs() < 0.02 && (f[1] - 0.25).abs() < 0.02 && (f[2] - 0.5).abs() < 0.02, "{f:?}");
    }

    #[test]
    fn validation_names_the_parameter() {
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().unwrap_err().contains("top_p"));
        assert!(
            SamplingParams { temperature: -1.0, ..Default::default() }.validate().unwrap_err().contains("temperature")
        );
        assert!(
            SamplingParams { presence_penalty: 3.0, ..Default::default() }.validate().unwrap_err().contains("presence")
        );
        let bias = SamplingParams { logit_bias: vec![(3, 101.0)], ..Default::default() };
        assert!(bias.validate().unwrap_err().contains("logit_bias for token 3"));
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn a_mask_leaves_only_allowed_tokens_however_the_rest_is_weighted() {
        // Tokens 0 and 3: the two least likely, and 3 the least of all.
        let mask = [0b1001u32];
        let greedy = SamplingParams { logprobs: true, top_logprobs: 1, ..SamplingParams::greedy() };
        let s = Sampler::new(None).sample(&logits(), &greedy, Some(&mask));
        assert_eq!(s.token, 0);
        // The reported logprobs stay the model's own.
        let raw = Sampler::new(None).sample(&logits(), &greedy, None);
        assert_eq!(s.top_logprobs, raw.top_logprobs);
        let mut drawn = Sampler::new(Some(5));
        for p in [
            SamplingParams { temperature: 2.0, ..Default::default() },
            SamplingParams { temperature: 1.0, top_p: 0.1, ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() },
            SamplingParams { temperature: 1.0, logit_bias: vec![(1, 100.0)], ..Default::default() },
        ] {
            assert!((0..50).all(|_| [0, 3].contains(&drawn.sample(&logits(), &p, Some(&mask)).token)), "{p:?}");
        }
        // A mask allowing one token forces it.
        assert_eq!(drawn.sample(&logits(), &SamplingParams::default(), Some(&[0b1000])).token, 3);
    }
}
