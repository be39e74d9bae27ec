//! Prompt logprobs from a chunked prefill (`StepSeq::score_prompt`) equal a straightforward reference: the
//! logits at the last position of each prefix, from a forward pass of that prefix alone, log-softmaxed in
//! f64 here. In one process and over a tensor-parallel pair of ranks.

mod common;

use common::*;
use tessera_worker::{
    Engine, Model, PromptScores, SamplingParams, ScorePrompt, Shard, StepSeq, kv_cache::KvCache,
    tcp_collective::loopback_ring,
};

const TOP: usize = 5;

/// A prompt token's logprob, its top alternatives and its rank, as the reference computes them.
type Expected = (f32, Vec<(u32, f32)>, u32);

/// For each position 1.. of `prompt`: its token's logprob after the prefix before it, the top `TOP`, and
/// the token's rank.
fn reference(dir: &std::path::Path, prompt: &[u32]) -> Vec<Expected> {
    let greedy = SamplingParams::greedy();
    (1..prompt.len())
        .map(|i| {
            let mut e = engine(dir, 1);
            let step = StepSeq {
                id: 1,
                tokens: &prompt[..i],
                start_pos: 0,
                block_table: &table(0),
                sample: Some(&greedy),
                penalty_context: &[],
                output_context: &[],
                starts: false,
                score_prompt: None,
                allowed: None,
                adapter: 0,
            };
            let (_, logits) = e.step_with_logits(&[step]).unwrap();
            let row = logits.unwrap().host_f32().unwrap().to_vec();
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let mut ids: Vec<u32> = (0..row.len() as u32).collect();
            ids.sort_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)));
            let top = ids[..TOP].iter().map(|&t| (t, (row[t as usize] as f64 - lse) as f32)).collect();
            let own = row[prompt[i] as usize];
            let rank = 1 + row.iter().filter(|&&x| x > own).count() as u32;
            ((own as f64 - lse) as f32, top, rank)
        })
        .collect()
}

/// Steps `prompt` through `engines` (the ranks of one group, each on its own thread) in chunks of
/// `chunk`, scoring every chunk; rank 0's scores of every step, in order.
fn chunked(engines: &mut [Engine], prompt: &[u32], chunk: usize) -> Vec<PromptScores> {
    let greedy = SamplingParams::greedy();
    let blocks = table(0);
    let mut out = Vec::new();
    let mut start = 0;
    while start < prompt.len() {
        let end = (start + chunk).min(prompt.len());
        let step = StepSeq {
            id: 7,
            tokens: &prompt[start..end],
            start_pos: start,
            block_table: &blocks,
            sample: (end == prompt.len()).then_some(&greedy),
            penalty_context: if start == 0 { prompt } else { &[] },
            output_context: &[],
            starts: false,
            score_prompt: Some(ScorePrompt { top: TOP, next_token: prompt.get(end).copied() }),
            allowed: None,
            adapter: 0,
        };
        let scores: Vec<Vec<PromptScores>> = std::thread::scope(|sc| {
            let handles: Vec<_> = engines
                .iter_mut()
                .map(|e| {
                    let step = step.clone();
                    sc.spawn(move || {
                        e.step(&[step]).unwrap();
                        e.take_prompt_scores()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(scores[1..].iter().all(Vec::is_empty), "only rank 0 reports scores");
        out.extend(scores.into_iter().next().unwrap());
        start = end;
    }
    out
}

fn check(prompt: &[u32], got: &[PromptScores], want: &[Expected]) {
    let mut position = 1;
    let mut n = 0;
    for chunk in got {
        assert_eq!(chunk.id, 7);
        assert_eq!(chunk.first_position, position, "chunks score consecutive positions");
        assert_eq!(chunk.ranks.len(), chunk.tokens.len());
        for (t, rank) in chunk.tokens.iter().zip(&chunk.ranks) {
            let (lp, top, want_rank) = &want[position - 1];
            assert_eq!(rank, want_rank, "position {position}: rank");
            assert_eq!(t.token, prompt[position], "position {position} scores the prompt's own token");
            let got_lp = t.logprob.unwrap();
            assert!((got_lp - lp).abs() < 1e-4, "position {position}: logprob {got_lp} vs {lp}");
            let ids: Vec<u32> = t.top_logprobs.iter().map(|x| x.0).collect();
            let want_ids: Vec<u32> = top.iter().map(|x| x.0).collect();
            assert_eq!(ids, want_ids, "position {position}: top tokens");
            for (g, w) in t.top_logprobs.iter().zip(top) {
                assert!((g.1 - w.1).abs() < 1e-4, "position {position}: top logprob {} vs {}", g.1, w.1);
            }
            position += 1;
            n += 1;
        }
    }
    assert_eq!(n, prompt.len() - 1, "every prompt token after the first is scored once");
}

fn prompt(dir: &std::path::Path) -> Vec<u32> {
    let case = &golden(dir)[0];
    // The prompt and its greedy continuation: long enough for several chunks and a block boundary.
    case.prompt_ids.iter().chain(&case.greedy_ids).copied().take(40).collect()
}

#[test]
fn chunked_prompt_logprobs_match_a_forward_pass_per_prefix() {
    for dir in [repo().join("models/stories260K"), repo().join("testdata/models/tiny-qwen2")] {
        let prompt = prompt(&dir);
        let want = reference(&dir, &prompt);
        for chunk in [3, 16, prompt.len()] {
            let got = chunked(&mut [engine(&dir, 1)], &prompt, chunk);
            check(&prompt, &got, &want);
        }
    }
}

#[test]
fn a_tensor_parallel_pair_scores_the_prompt_as_one_process_does() {
    let dir = repo().join("models/stories260K");
    let prompt = prompt(&dir);
    let want = reference(&dir, &prompt);
    let ring = loopback_ring(2, std::time::Duration::from_secs(10)).unwrap();
    let mut engines: Vec<Engine> = ring
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let model = Model::load(&dir, Shard { rank, world: 2 }).unwrap();
            let cache = KvCache::new(&model.kv_geometry(), BLOCKS_PER_SEQ, BLOCK).unwrap();
            Engine::new(model, cache, Box::new(comm))
        })
        .collect();
    let got = chunked(&mut engines, &prompt, 5);
    check(&prompt, &got, &want);
}
