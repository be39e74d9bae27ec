//! A malformed or inconsistent step is refused with a message, and the engine keeps serving.

mod common;

use tessera_worker::{SamplingParams, StepError, StepSeq};

#[test]
fn bad_steps_are_refused_and_the_engine_keeps_working() {
    let dir = common::repo().join("models/stories260K");
    let mut e = common::engine(&dir, 2);
    let g = SamplingParams::greedy();
    let table = common::table(0);
    let prompt = [1u32, 403, 407, 261, 378];
    let seq = |id, tokens: &'static [u32], start, table: &'static [u32]| StepSeq {
        id,
        tokens,
        start_pos: start,
        block_table: table,
        sample: None,
        penalty_context: &[],
        output_context: &[],
        starts: false,
        score_prompt: None,
        allowed: None,
        adapter: 0,
    };
    let leak = |v: Vec<u32>| -> &'static [u32] { Box::leak(v.into_boxed_slice()) };
    let t: &'static [u32] = leak(table.clone());
    let cases: Vec<(Vec<StepSeq>, &str)> = vec![
        (vec![seq(7, &[5], 9, t)], "unknown sequence"),
        (vec![seq(7, &[], 0, t)], "no tokens"),
        (vec![seq(7, &[600], 0, t)], "outside the vocabulary"),
        (vec![seq(7, &[5], 0, leak(vec![99]))], "block 99 out of range"),
        (vec![seq(7, leak(vec![5; 20]), 0, leak(vec![0]))], "need 2"),
        (vec![seq(7, &[5], 0, t), seq(7, &[6], 0, t)], "appears twice"),
        (vec![seq(7, &[5], 600, t)], "exceed the model's context of 512"),
    ];
    for (batch, msg) in cases {
        match e.step(&batch) {
            Err(StepError::Invalid(m)) => assert!(m.contains(msg), "expected {msg:?} in {m:?}"),
            other => panic!("expected Invalid({msg}), got {other:?}"),
        }
    }
    // Masks of the wrong length, or allowing nothing, are refused (512 ids: 16 words).
    let short =
        StepSeq { sample: Some(&g), allowed: Some(leak(vec![u32::MAX; 15])), ..seq(7, leak(prompt.to_vec()), 0, t) };
    assert!(e.step(&[short]).unwrap_err().to_string().contains("mask of 15 words"));
    let none = StepSeq { sample: Some(&g), allowed: Some(leak(vec![0; 16])), ..seq(7, leak(prompt.to_vec()), 0, t) };
    assert!(e.step(&[none]).unwrap_err().to_string().contains("allows no token"));
    let bad_p = SamplingParams { top_p: 2.0, ..g.clone() };
    let s = StepSeq { sample: Some(&bad_p), ..seq(7, leak(prompt.to_vec()), 0, t) };
    assert!(e.step(&[s]).unwrap_err().to_string().contains("top_p"));
    assert_eq!(e.active_sequences(), 0, "refused steps leave no state behind");

    // Still serving: the golden first token of "Once upon a time".
    let ok = StepSeq { sample: Some(&g), penalty_context: &prompt, ..seq(7, leak(prompt.to_vec()), 0, t) };
    let out = e.step(&[ok]).unwrap();
    assert_eq!(out[0].sampled.token, 432);
    // A mask allowing only ids 400..=410 (not the greedy 432) makes the sampler pick among them.
    let mut words = vec![0u32; 16];
    for id in 400..=410u32 {
        words[id as usize / 32] |= 1 << (id % 32);
    }
    let masked = StepSeq {
        sample: Some(&g),
        penalty_context: &prompt,
        starts: true,
        allowed: Some(leak(words)),
        adapter: 0,
        ..seq(8, leak(prompt.to_vec()), 0, leak(common::table(1)))
    };
    let token = e.step(&[masked]).unwrap()[0].sampled.token;
    assert!((400..=410).contains(&token), "{token}");
    // A continuation at the wrong position is inconsistent with what the cache holds.
    let wrong = seq(7, &[432], 6, t);
    assert!(e.step(&[wrong]).unwrap_err().to_string().contains("cache holds 5"));
}

/// A seeded sequence recomputed from scratch (preempted, or moved to another replica) with its output so
/// far continues the same random stream: the tokens after the restart are those of an undisturbed run.
#[test]
fn a_restarted_seeded_sequence_continues_its_stream() {
    let dir = common::repo().join("models/stories260K");
    let p = SamplingParams { temperature: 1.0, top_p: 0.95, seed: Some(11), ..SamplingParams::greedy() };
    let prompt = vec![1u32, 403, 407, 261, 378];
    let table = common::table(0);
    let run = |restart_after: Option<usize>| -> Vec<u32> {
        let mut e = common::engine(&dir, 2);
        let mut tokens = prompt.clone();
        let mut computed = 0;
        let mut restart = false;
        while tokens.len() < prompt.len() + 12 {
            let generated = tokens[prompt.len()..].to_vec();
            let s = StepSeq {
                id: 1,
                tokens: &tokens[computed..],
                start_pos: computed,
                block_table: &table,
                sample: Some(&p),
                penalty_context: &prompt,
                output_context: if restart { &generated } else { &[] },
                starts: restart,
                score_prompt: None,
                allowed: None,
                adapter: 0,
            };
            let next = e.step(&[s]).unwrap()[0].sampled.token;
            restart = false;
            computed = tokens.len();
            tokens.push(next);
            if restart_after == Some(tokens.len() - prompt.len()) {
                // Start over: a fresh engine holds nothing; recompute the prompt and the output so far.
                e = common::engine(&dir, 2);
                computed = 0;
                restart = true;
            }
        }
        tokens[prompt.len()..].to_vec()
    };
    let undisturbed = run(None);
    assert!(undisturbed.iter().collect::<std::collections::HashSet<_>>().len() > 3, "{undisturbed:?}");
    assert_eq!(run(Some(5)), undisturbed);
}
