//! `--overlap`: a replica of worker processes that plans each step while the workers run the one before
//! gives every request what steps run one after the other give it, greedy and seeded alike, under load
//! whose batches change as requests come and go (some of them ending early at a stop string).

mod common;

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;

/// Each request's choices' texts and finish reasons.
async fn completions(client: &HttpClient, s: &Server, bodies: &[Value]) -> Vec<Vec<(String, String)>> {
    let calls = bodies.iter().map(|body| async move {
        let r = client.post_json(&s.url("/v1/completions"), body).await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v: Value = r.json().unwrap();
        let mut choices: Vec<(u64, String, String)> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let text = c["text"].as_str().unwrap().to_string();
                (c["index"].as_u64().unwrap(), text, c["finish_reason"].as_str().unwrap().to_string())
            })
            .collect();
        choices.sort();
        choices.into_iter().map(|(_, t, f)| (t, f)).collect()
    });
    futures_util::future::join_all(calls).await
}

#[test]
fn overlapped_steps_give_every_request_what_steps_in_turn_give_it() {
    let client = HttpClient::new();
    let prompts = ["Once upon a time", "The little dog", "Lily and Tom went", "One day, a bird"];
    let bodies: Vec<Value> = (0..24)
        .map(|i| {
            let mut b = json!({"model": "stories260K", "prompt": prompts[i % 4], "max_tokens": 4 + (i * 7) % 45,
                "temperature": if i % 2 == 0 { 0.0 } else { 0.9 }, "seed": i, "n": if i % 5 == 0 { 2 } else { 1 }});
            if i % 6 == 1 {
                b["stop"] = json!(["."]);
            }
            b
        })
        .collect();
    let mut runs = Vec::new();
    for overlap in ["on", "off"] {
        // Fewer slots than requests: admissions while steps are in flight.
        let s = Server::start(&["--tp", "2", "--overlap", overlap, "--max-num-seqs", "5"]);
        assert!(s.logged(&format!("overlap={}", overlap == "on")), "--overlap {overlap} was not taken up");
        runs.push(rt().block_on(completions(&client, &s, &bodies)));
    }
    assert_eq!(runs[0], runs[1]);
    let reasons: Vec<&str> = runs[0].iter().flatten().map(|(_, f)| f.as_str()).collect();
    assert!(reasons.contains(&"stop") && reasons.contains(&"length"), "{reasons:?}");
}
