//! The engine against golden values from Hugging Face `transformers`, and the invariants that make
//! batching safe: a request's greedy output does not depend on what it is batched with, or on how its
//! prefill is chunked.

mod common;

use common::*;

/// Greedy ids exactly, last-prompt logits within 1e-3 (the worst difference is printed, run with
/// `--nocapture` to see it).
#[test]
fn every_model_reproduces_its_golden_file() {
    for dir in golden_models() {
        let cases = golden(&dir);
        let mut engine = engine(&dir, cases.len());
        let n_new = cases[0].greedy_ids.len();
        let mut worst = 0f32;
        // Each case alone.
        for c in &cases {
            let (ids, logits) = greedy_batch(&mut engine, std::slice::from_ref(&c.prompt_ids), n_new, None);
            assert_eq!(ids[0], c.greedy_ids, "{}: greedy ids for prompt {:?}", dir.display(), c.prompt_ids);
            assert_eq!(logits[0].len(), c.logits.len());
            for (a, b) in logits[0].iter().zip(&c.logits) {
                worst = worst.max((a - b).abs());
            }
        }
        println!("{}: worst |logit - golden| = {worst:.2e}", dir.file_name().unwrap().to_string_lossy());
        assert!(worst < 1e-3, "{}: logits differ by {worst}", dir.display());
    }
}

#[test]
fn greedy_output_is_the_same_alone_and_in_a_batch_of_eight() {
    for dir in golden_models() {
        let cases = golden(&dir);
        // Eight different requests of different lengths: the golden prompts, and prefixes/extensions.
        let mut prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
        for c in &cases {
            let mut p = c.prompt_ids.clone();
            p.extend_from_slice(&c.greedy_ids[..3 + p.len() % 5]);
            prompts.push(p);
        }
        prompts.truncate(8);
        assert_eq!(prompts.len(), 8);
        let mut engine = engine(&dir, 8);
        let (batched, _) = greedy_batch(&mut engine, &prompts, 24, None);
        for (i, p) in prompts.iter().enumerate() {
            let (alone, _) = greedy_batch(&mut engine, std::slice::from_ref(p), 24, None);
            assert_eq!(alone[0], batched[i], "{}: prompt {i} alone vs batched", dir.display());
        }
        // And against the golden continuation for the golden prompts.
        for (c, got) in cases.iter().zip(&batched) {
            assert_eq!(&c.greedy_ids[..24], &got[..], "{}: batched vs golden", dir.display());
        }
    }
}

#[test]
fn chunked_prefill_gives_the_same_result_as_one_prefill() {
    for dir in golden_models() {
        let cases = golden(&dir);
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
        let mut engine = engine(&dir, prompts.len());
        let (whole, whole_logits) = greedy_batch(&mut engine, &prompts, 16, None);
        let (chunked, chunked_logits) = greedy_batch(&mut engine, &prompts, 16, Some(3));
        assert_eq!(whole, chunked, "{}", dir.display());
        for (a, b) in whole_logits.iter().zip(&chunked_logits) {
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{}: chunked logits differ by {worst}", dir.display());
        }
    }
}

/// Penalties see the whole prompt even when the step that sends it (the first chunk) does not sample.
#[test]
fn penalties_see_the_prompt_through_chunked_prefill() {
    let dir = repo().join("models/stories260K");
    let prompts: Vec<Vec<u32>> = golden(&dir).iter().map(|c| c.prompt_ids.clone()).collect();
    let p = tessera_worker::SamplingParams {
        repetition_penalty: 1.5,
        frequency_penalty: 0.7,
        ..tessera_worker::SamplingParams::greedy()
    };
    let mut engine = engine(&dir, prompts.len());
    let (whole, _) = run_batch(&mut engine, &prompts, 24, None, &p);
    let (chunked, _) = run_batch(&mut engine, &prompts, 24, Some(3), &p);
    let (plain, _) = greedy_batch(&mut engine, &prompts, 24, None);
    assert_eq!(whole, chunked);
    assert_ne!(whole, plain, "the penalties should change a 24-token greedy story");
}
