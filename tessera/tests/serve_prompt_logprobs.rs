//! The prompt's logprobs: `echo` with `logprobs` on /v1/completions (OpenAI's shape: the prompt's tokens
//! first, the first one's logprob `null`) and vLLM's `prompt_logprobs`, whole and streamed, in one process
//! and over two workers, on a prompt the prefix cache holds. Checked against transformers' logits.

mod common;

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;

async fn post(client: &HttpClient, s: &Server, body: Value) -> Value {
    let r = client.post_json(&s.url("/v1/completions"), &body).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json().unwrap()
}

/// The text and the legacy logprobs of choice 0 of a streamed completion, put back together.
async fn streamed(client: &HttpClient, s: &Server, mut body: Value) -> (String, Vec<Value>, Vec<Value>, Value) {
    body["stream"] = json!(true);
    let (mut text, mut lps, mut tokens, mut prompt_logprobs) = (String::new(), Vec::new(), Vec::new(), Value::Null);
    client
        .post_stream(&s.url("/v1/completions"), &body, |ev| {
            if ev.data == "[DONE]" {
                return false;
            }
            let v: Value = serde_json::from_str(&ev.data).unwrap();
            let c = &v["choices"][0];
            text.push_str(c["text"].as_str().unwrap_or(""));
            if let Some(l) = c["logprobs"]["token_logprobs"].as_array() {
                lps.extend(l.iter().cloned());
                tokens.extend(c["logprobs"]["tokens"].as_array().unwrap().iter().cloned());
            }
            if !c["prompt_logprobs"].is_null() {
                assert!(prompt_logprobs.is_null(), "prompt_logprobs sent twice");
                prompt_logprobs = c["prompt_logprobs"].clone();
            }
            true
        })
        .await
        .unwrap();
    (text, lps, tokens, prompt_logprobs)
}

fn log_softmax_at(logits: &[f64], t: usize) -> f64 {
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    logits[t] - lse
}

#[test]
fn echo_and_prompt_logprobs_match_transformers_whole_streamed_cached_and_over_two_workers() {
    let dir = repo().join("models/stories260K");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let client = HttpClient::new();
    let one = Server::start(&[]);
    let two = Server::start(&["--tp", "2"]);
    rt().block_on(async {
        for case in golden["cases"].as_array().unwrap() {
            let prompt: Vec<u64> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            let first = case["greedy_ids"][0].as_u64().unwrap();
            let logits: Vec<f64> =
                case["last_prompt_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            // The prompt and transformers' first greedy token: the last position's logprob is transformers'.
            let mut ids = prompt.clone();
            ids.push(first);
            let want = log_softmax_at(&logits, first as usize);
            let body = json!({"model": "stories260K", "prompt": ids, "max_tokens": 2, "temperature": 0,
                "echo": true, "logprobs": 3, "prompt_logprobs": 2});
            let v = post(&client, &one, body.clone()).await;
            let c = &v["choices"][0];
            let lp = c["logprobs"]["token_logprobs"].as_array().unwrap();
            assert_eq!(lp.len(), ids.len() + 2, "the prompt's tokens, then the completion's");
            assert!(lp[0].is_null() && c["logprobs"]["top_logprobs"][0].is_null());
            let got = lp[prompt.len()].as_f64().unwrap();
            assert!((got - want).abs() < 1e-4, "{got} vs transformers {want}");
            // Echo puts the prompt's text first.
            let plain =
                post(&client, &one, json!({"model": "stories260K", "prompt": ids, "max_tokens": 2, "temperature": 0}))
                    .await;
            let text = c["text"].as_str().unwrap();
            assert!(
                text.ends_with(plain["choices"][0]["text"].as_str().unwrap())
                    && text.len() > plain["choices"][0]["text"].as_str().unwrap().len()
            );
            let offsets = c["logprobs"]["text_offset"].as_array().unwrap();
            assert!(offsets.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64()), "{offsets:?}");
            // vLLM's prompt_logprobs: null, then per position the prompt's token with its logprob and rank.
            let pl = c["prompt_logprobs"].as_array().unwrap();
            assert_eq!(pl.len(), ids.len());
            assert!(pl[0].is_null());
            for (i, pos) in pl.iter().enumerate().skip(1) {
                let own = &pos[ids[i].to_string()];
                assert!((own["logprob"].as_f64().unwrap() - lp[i].as_f64().unwrap()).abs() < 1e-6, "position {i}");
                assert!(own["rank"].as_u64().unwrap() >= 1);
                assert!(pos.as_object().unwrap().len() <= 3, "the token and at most 2 alternatives");
            }
            // Streamed: the same text and logprobs, the prompt's in the first chunk.
            let (s_text, s_lp, s_tokens, s_pl) = streamed(&client, &one, body.clone()).await;
            assert_eq!(s_text, text);
            assert_eq!(s_lp, *lp);
            assert_eq!(s_tokens, *c["logprobs"]["tokens"].as_array().unwrap());
            assert_eq!(s_pl, c["prompt_logprobs"]);
            // Again: now the prompt's blocks are in the prefix cache, which must not skip a position.
            let again = post(&client, &one, body.clone()).await;
            assert_eq!(again["choices"][0]["logprobs"], c["logprobs"]);
            // Two workers, each half the vocabulary: the same numbers.
            let split = post(&client, &two, body.clone()).await;
            let split_lp = split["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
            for (a, b) in lp.iter().zip(split_lp).skip(1) {
                assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4, "{a} vs {b} at tp 2");
            }
        }
        // A long prompt whose blocks another request cached first still gets every position.
        let long =
            "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. ".repeat(3);
        post(&client, &one, json!({"model": "stories260K", "prompt": long, "max_tokens": 1})).await;
        let v = post(
            &client,
            &one,
            json!({"model": "stories260K", "prompt": long, "max_tokens": 1, "echo": true, "logprobs": 0}),
        )
        .await;
        let lp = v["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
        let n = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
        assert_eq!(lp.len(), n + 1);
        assert!(lp[1..].iter().all(Value::is_f64), "a position without its logprob: {lp:?}");
        assert!(v["choices"][0]["text"].as_str().unwrap().starts_with(&long));
    });
}
