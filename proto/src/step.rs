//! What a step is made of, as both sides of the protocol see it: the coordinator's scheduler builds a batch
//! of [`StepSeq`]s and gets [`SeqSampled`]s back; a worker's engine runs them. The gRPC messages in
//! [`crate::v1`] carry exactly these fields. Kept apart from the engine so that the coordinator's API and
//! scheduler compile without the model, its kernels or its weights.

/// Below this temperature sampling is greedy.
pub const GREEDY_BELOW: f32 = 1e-5;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Return the sampled token's logprob.
    pub logprobs: bool,
    /// How many top alternatives to return.
    pub top_logprobs: usize,
    /// (token, bias) added to the logits before sampling, after the penalties (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Score the prompt's tokens too, with this many alternatives each (`echo` with `logprobs`, vLLM's
    /// `prompt_logprobs`). The coordinator's: it becomes each prefill chunk's `StepSeq::score_prompt`,
    /// and a worker never reads it here.
    pub prompt_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: false,
            top_logprobs: 0,
            logit_bias: Vec::new(),
            prompt_logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// Sampling with temperature 0 (below [`GREEDY_BELOW`]) picks the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }

    /// Whether a device can pick the token alone: no penalties (they need the sequence's history), no
    /// min-p, no logit bias and no logprobs (they need the whole distribution on the host).
    pub fn device_samplable(&self) -> bool {
        self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.min_p == 0.0
            && !self.logprobs
            && self.top_logprobs == 0
            && self.logit_bias.is_empty()
    }

    /// Checks ranges; the message names the parameter as the OpenAI API spells it.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |v: f32| v.is_finite();
        if !finite(self.temperature) || self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !finite(self.top_p) || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !finite(self.min_p) || !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !finite(self.repetition_penalty) || self.repetition_penalty <= 0.0 {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if !finite(self.presence_penalty) || !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(format!("presence_penalty must be in [-2, 2], got {}", self.presence_penalty));
        }
        if !finite(self.frequency_penalty) || !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(format!("frequency_penalty must be in [-2, 2], got {}", self.frequency_penalty));
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !finite(*b) || !(-100.0..=100.0).contains(b)) {
            return Err(format!("logit_bias for token {t} must be in [-100, 100], got {b}"));
        }
        Ok(())
    }
}

/// The outcome of sampling one position.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// log-softmax of the raw logits at `token`, when asked for.
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens under the raw logits, highest first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// One sequence's part of a step.
#[derive(Clone, Debug)]
pub struct StepSeq<'a> {
    pub id: u64,
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub block_table: &'a [u32],
    /// Sample a token after this step (the last prefill chunk, and every decode).
    pub sample: Option<&'a SamplingParams>,
    /// Prompt tokens for the repetition penalty, sent with the first step of the sequence (start 0).
    pub penalty_context: &'a [u32],
    /// Tokens already generated, sent with the first step after a restart (count as output for penalties).
    pub output_context: &'a [u32],
    /// This step begins the sequence: earlier state is dropped and positions before `start_pos` are a
    /// cached prefix already in the block table. Implied by `start_pos == 0`.
    pub starts: bool,
    /// Score the prompt tokens this chunk covers (prompt logprobs).
    pub score_prompt: Option<ScorePrompt>,
    /// Constrained decoding: the tokens the sampled one may be, as a bitmask over the vocabulary (bit
    /// `t % 32` of word `t / 32` allows token `t`); every other token's logit is −∞ before sampling. Read
    /// only with `sample`.
    pub allowed: Option<&'a [u32]>,
    /// The LoRA adapter this sequence runs with, by the id its workers loaded it under; 0: the base model.
    pub adapter: u32,
}

/// A LoRA adapter as the coordinator asks workers to load it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSpec {
    /// What steps name it by ([`StepSeq::adapter`]): never 0, never reused.
    pub id: u32,
    /// The name clients use in `model`.
    pub name: String,
    /// The PEFT adapter directory, as the workers see it.
    pub path: String,
    /// The largest rank accepted (`--max-lora-rank`).
    pub max_rank: u32,
}

/// Whether `mask` (as [`StepSeq::allowed`]) allows `token`.
pub fn mask_allows(mask: &[u32], token: u32) -> bool {
    mask.get(token as usize / 32).is_some_and(|w| w >> (token % 32) & 1 == 1)
}

/// Scoring the prompt tokens of a prefill chunk: every token the chunk's positions predict (the chunk's
/// own tokens after its first, then `next_token`, the prompt token after the chunk, if there is one) gets
/// its logprob under the logits of the position before it, and its `top` most likely alternatives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScorePrompt {
    pub top: usize,
    pub next_token: Option<u32>,
}

/// The scored prompt tokens of one chunk: `tokens[i]` is the token at position `first_position + i`, and
/// `ranks[i]` its rank among the vocabulary there (1: the most likely).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptScores {
    pub id: u64,
    pub first_position: usize,
    pub tokens: Vec<Sampled>,
    pub ranks: Vec<u32>,
}

impl StepSeq<'_> {
    /// Whether this step begins the sequence (a fresh start, or after a cached prefix).
    pub fn begins(&self) -> bool {
        self.starts || self.start_pos == 0
    }
}

/// A sampled token, tagged with its sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqSampled {
    pub id: u64,
    pub sampled: Sampled,
}
