//! A step paused before every half-layer (attention, MLP), with another sequence's step run in the middle, finishes exactly as if it
//! had run whole, and so does the step in the middle; steps that would disturb the paused one are refused.

mod common;

use tessera_worker::{SamplingParams, SeqSampled, StepError, StepProgress, StepSeq};

const A: [u64; 2] = [1, 2];
const B: u64 = 3;

fn params() -> SamplingParams {
    SamplingParams { logprobs: true, top_logprobs: 5, ..SamplingParams::greedy() }
}

/// Sequences' tokens, block tables and a step builder over them.
struct Seqs {
    tokens: Vec<Vec<u32>>,
    tables: Vec<Vec<u32>>,
    computed: Vec<usize>,
    p: SamplingParams,
}

impl Seqs {
    fn new() -> Self {
        Seqs {
            tokens: vec![vec![1, 403, 407, 261, 378], vec![1, 378, 261, 407, 403, 350, 262], vec![1, 261, 407, 378]],
            tables: (0..3).map(common::table).collect(),
            computed: vec![0; 3],
            p: params(),
        }
    }

    /// Each listed sequence's uncomputed tokens (its prompt, or its last sampled token).
    fn step(&self, ids: &[u64]) -> Vec<StepSeq<'_>> {
        ids.iter()
            .map(|&id| {
                let i = id as usize - 1;
                let start = self.computed[i];
                StepSeq {
                    id,
                    tokens: &self.tokens[i][start..],
                    start_pos: start,
                    block_table: &self.tables[i],
                    sample: Some(&self.p),
                    penalty_context: if start == 0 { &self.tokens[i] } else { &[] },
                    output_context: &[],
                    starts: false,
                    score_prompt: None,
                    allowed: None,
                    adapter: 0,
                }
            })
            .collect()
    }

    fn apply(&mut self, out: &[SeqSampled]) {
        for s in out {
            let i = s.id as usize - 1;
            self.computed[i] = self.tokens[i].len();
            self.tokens[i].push(s.sampled.token);
        }
    }
}

fn invalid(r: Result<impl std::fmt::Debug, StepError>, msg: &str) {
    match r {
        Err(StepError::Invalid(m)) => assert!(m.contains(msg), "expected {msg:?} in {m:?}"),
        other => panic!("expected a refusal ({msg}), got {other:?}"),
    }
}

#[test]
fn a_paused_step_finishes_as_if_run_whole() {
    let dir = common::repo().join("models/stories260K");
    let engine = || common::engine(&dir, 4);
    let (mut whole, mut paused) = (engine(), engine());
    let layers = whole.model.config.num_layers;
    assert!(layers >= 3, "the test model must have layers to pause between");
    let (mut w, mut p) = (Seqs::new(), Seqs::new());
    // A's prompts first, so the step that pauses is a decode over a filled cache.
    let out = whole.step(&w.step(&A)).unwrap();
    w.apply(&out);
    let out = paused.step(&p.step(&A)).unwrap();
    p.apply(&out);

    // Whole: A's decode step, then B's prefill.
    let a_whole = whole.step(&w.step(&A)).unwrap();
    let b_whole = whole.step(&w.step(&[B])).unwrap();

    // Paused after A's first layer, B's prefill in between, then A one layer per call.
    let always = || true;
    let a_batch = p.step(&A);
    assert_eq!(paused.step_pausable(&a_batch, &always).unwrap(), StepProgress::Paused);
    assert!(paused.is_paused());

    // What would disturb it is refused, and leaves it paused.
    invalid(paused.step(&p.step(&[A[0]])), "is in the paused step");
    let a_block = p.tables[0][0];
    let over_a = vec![a_block, 30];
    let mut b_on_a = p.step(&[B]);
    b_on_a[0].block_table = &over_a;
    invalid(paused.step(&b_on_a), &format!("writes block {a_block}, which the paused step uses"));
    let reads_a = vec![30, a_block];
    let mut b_reads_a = p.step(&[B]);
    b_reads_a[0].block_table = &reads_a;
    invalid(paused.step(&b_reads_a), &format!("reads block {a_block}, which the paused step writes"));
    invalid(paused.step_pausable(&p.step(&[B]), &always), "already paused");
    invalid(paused.resume(&p.step(&A[..1]), &always), "other than the paused step's");
    assert!(paused.is_paused());

    let b_paused = paused.step(&p.step(&[B])).unwrap();
    let mut pauses = 1;
    let a_paused = loop {
        match paused.resume(&a_batch, &always).unwrap() {
            StepProgress::Paused => pauses += 1,
            StepProgress::Done(out) => break out,
        }
    };
    assert_eq!(pauses, 2 * layers - 1, "one pause before each half-layer (attention, MLP) but the first");
    assert!(!paused.is_paused());
    invalid(paused.resume(&a_batch, &always), "no step is paused");
    // Bit for bit: tokens, logprobs and the top alternatives.
    assert!(a_whole.iter().chain(&b_whole).all(|s| s.sampled.logprob.is_some() && s.sampled.top_logprobs.len() == 5));
    assert_eq!(a_paused, a_whole);
    assert_eq!(b_paused, b_whole);
    drop(a_batch);

    // The caches hold the same: the next steps of all three agree too.
    w.apply(&a_whole);
    w.apply(&b_whole);
    p.apply(&a_paused);
    p.apply(&b_paused);
    let all = [A[0], A[1], B];
    for _ in 0..6 {
        let (ow, op) = (whole.step(&w.step(&all)).unwrap(), paused.step(&p.step(&all)).unwrap());
        assert_eq!(ow, op);
        w.apply(&ow);
        p.apply(&op);
    }
}

#[test]
fn a_step_that_is_not_asked_to_pause_runs_whole() {
    let dir = common::repo().join("models/stories260K");
    let mut e = common::engine(&dir, 4);
    let s = Seqs::new();
    let out = e.step_pausable(&s.step(&A), &|| false).unwrap();
    assert!(matches!(out, StepProgress::Done(ref v) if v.len() == 2), "{out:?}");
    assert!(!e.is_paused());
}
