//! `tessera serve` end to end: real HTTP against the real binary.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;

const LILY: &str = ", there was a little girl named Lily. She loved to play outside in the park.";

/// The official OpenAI Python client, streaming and not, completions and chat.
#[test]
fn the_openai_python_client_gets_the_lily_story() {
    let Some(python) = python_with("openai", "openai") else { return };
    let s = Server::start(&[]);
    let script = r#"
import sys, openai
LILY = ", there was a little girl named Lily. She loved to play outside in the park."
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
assert [m.id for m in c.models.list()] == ["stories260K"]

r = c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=27, temperature=0)
assert r.choices[0].text == LILY, r
assert r.choices[0].finish_reason == "length"
assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 27, 32), r.usage

chunks = list(c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=27, temperature=0,
                                   stream=True, stream_options={"include_usage": True}))
assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == LILY
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 27, chunks[-1]
assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"

msgs = [{"role": "user", "content": "Once upon a time"}]
r = c.chat.completions.create(model="stories260K", messages=msgs, max_tokens=27, temperature=0)
assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == LILY, r
assert r.usage.prompt_tokens == 5

chunks = list(c.chat.completions.create(model="stories260K", messages=msgs, max_completion_tokens=27, temperature=0, stream=True))
assert chunks[0].choices[0].delta.role == "assistant"
assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == LILY
assert chunks[-1].choices[0].finish_reason == "length"

r = c.chat.completions.create(model="stories260K", messages=msgs, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
lp = r.choices[0].logprobs.content
assert len(lp) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp), lp
assert "".join(t.token for t in lp) == r.choices[0].message.content

r = c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=40, temperature=0, stop=["Lily"])
assert r.choices[0].text == ", there was a little girl named " and r.choices[0].finish_reason == "stop", r

r = c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=10, temperature=0.9, seed=7, n=3)
assert len(r.choices) == 3 and r.usage.completion_tokens == 30

r = c.completions.create(model="stories260K", prompt=["The cat", "Once upon a time"], max_tokens=27, temperature=0, n=2)
assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and r.choices[2].text == r.choices[3].text == LILY, r
assert r.usage.completion_tokens == 4 * 27

for call, err in [(lambda: c.completions.create(model="nope", prompt="x"), openai.NotFoundError),
                  (lambda: c.completions.create(model="stories260K", prompt="x", max_tokens=-1), openai.BadRequestError),
                  (lambda: c.chat.completions.create(model="stories260K", messages=[]), openai.BadRequestError)]:
    try:
        call()
        raise SystemExit("expected an error")
    except err as e:
        assert e.body["message"] and "type" in e.body, e.body
print("ok")
"#;
    let out = std::process::Command::new(&python).args(["-c", script, &s.base]).output().unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

fn prompts() -> Vec<String> {
    let subjects = ["a cat", "a dog", "Tom", "a big bear", "the sun", "Lily", "a little bird", "Mom"];
    let verbs = ["went to the park", "saw a ball", "was sad", "liked to play"];
    (0..32).map(|i| format!("Once upon a time, {} {}{}", subjects[i % 8], verbs[i / 8], ".".repeat(i % 3))).collect()
}

async fn run_all(client: &HttpClient, s: &Server, prompts: &[String], concurrent: bool) -> Vec<String> {
    if concurrent {
        let futs: Vec<_> = prompts.iter().map(|p| complete(client, s, p, 24)).collect();
        futures_util::future::join_all(futs).await
    } else {
        let mut out = Vec::new();
        for p in prompts {
            out.push(complete(client, s, p, 24).await);
        }
        out
    }
}

#[test]
fn concurrent_greedy_requests_return_what_each_returns_alone() {
    let rt = rt();
    let client = HttpClient::new();
    let prompts = prompts();
    let s = Server::start(&[]);
    let (alone, batched, again, hits) = rt.block_on(async {
        let alone = run_all(&client, &s, &prompts, false).await;
        let batched = run_all(&client, &s, &prompts, true).await;
        let hits_before = s.metric(&client, "tessera:prefix_cache_hits_total").await;
        let again = run_all(&client, &s, &prompts, true).await;
        let hits = s.metric(&client, "tessera:prefix_cache_hits_total").await - hits_before;
        (alone, batched, again, hits)
    });
    assert!(alone.iter().all(|t| !t.is_empty()));
    assert_eq!(alone, batched, "32 concurrent requests vs one at a time");
    assert_eq!(alone, again, "with prefix-cache hits");
    assert!(hits > 0.0, "the second round should hit the prefix cache");
    drop(s);
    // Chunked prefill forced down to 4 tokens per step.
    let small = Server::start(&["--max-num-batched-tokens", "4", "--max-num-seqs", "4"]);
    let chunked = rt.block_on(run_all(&client, &small, &prompts, true));
    assert_eq!(alone, chunked, "with chunked prefill of 4 tokens per step");
}

/// A list of prompts is a batch, answered as OpenAI answers one: each prompt's `n` choices, numbered on
/// through the list (prompt p's choice c has index p·n + c), each what the prompt gets alone, streamed or
/// not, with the usage of all of them; lists of token ids alike. (Bad batches: `serve_errors`.)
#[test]
fn a_list_of_prompts_gets_each_prompts_choices_numbered_through_the_list() {
    let rt = rt();
    let client = HttpClient::new();
    let s = Server::start(&[]);
    let url = s.url("/v1/completions");
    let ask = |prompt: Value, n: usize, stream: bool| {
        let mut b = json!({"model": "stories260K", "prompt": prompt, "max_tokens": 12, "temperature": 0, "n": n});
        if stream {
            b["stream"] = json!(true);
            b["stream_options"] = json!({"include_usage": true});
        }
        b
    };
    let texts = [json!("Once upon a time"), json!("The cat sat"), json!("Tom had a big red ball")];
    let tokens = [json!([1, 300, 301, 302]), json!([1, 450])];
    rt.block_on(async {
        for batch in [&texts[..], &tokens[..]] {
            // Each prompt alone.
            let (mut alone, mut prompt_tokens) = (Vec::new(), 0);
            for p in batch {
                let v: Value = client.post_json(&url, &ask(p.clone(), 1, false)).await.unwrap().json().unwrap();
                alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
                prompt_tokens += v["usage"]["prompt_tokens"].as_u64().unwrap();
            }
            let r = client.post_json(&url, &ask(json!(batch), 2, false)).await.unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let v: Value = r.json().unwrap();
            let choices = v["choices"].as_array().unwrap();
            assert_eq!(choices.len(), 2 * batch.len());
            for (i, c) in choices.iter().enumerate() {
                assert_eq!((c["index"].as_u64(), c["text"].as_str()), (Some(i as u64), Some(alone[i / 2].as_str())));
            }
            let completion = 12 * 2 * batch.len() as u64;
            assert_eq!(
                (v["usage"]["prompt_tokens"].as_u64(), v["usage"]["completion_tokens"].as_u64()),
                (Some(prompt_tokens), Some(completion))
            );

            let mut streamed = vec![String::new(); 2 * batch.len()];
            let mut finished = vec![0; 2 * batch.len()];
            let mut usage = Value::Null;
            let status = client
                .post_stream(&url, &ask(json!(batch), 2, true), |ev| {
                    if ev.data == "[DONE]" {
                        return false;
                    }
                    let v: Value = serde_json::from_str(&ev.data).unwrap();
                    for c in v["choices"].as_array().unwrap() {
                        let i = c["index"].as_u64().unwrap() as usize;
                        streamed[i].push_str(c["text"].as_str().unwrap());
                        finished[i] += c["finish_reason"].is_string() as usize;
                    }
                    if !v["usage"].is_null() {
                        usage = v["usage"].clone();
                    }
                    true
                })
                .await
                .unwrap();
            assert_eq!(status, 200);
            let expected: Vec<String> = alone.iter().flat_map(|t| [t.clone(), t.clone()]).collect();
            assert_eq!(streamed, expected);
            assert!(finished.iter().all(|&f| f == 1), "one finish_reason per choice: {finished:?}");
            assert_eq!(usage["total_tokens"].as_u64(), Some(prompt_tokens + completion));
        }
    });
}

/// `logit_bias` of +100 on a token makes it every token of a greedy answer, in one process and across
/// two tensor-parallel workers (the bias travels in the step's sampling parameters), on both endpoints;
/// without it the answer is the usual one.
#[test]
fn logit_bias_forces_a_token_in_process_and_over_workers() {
    let rt = rt();
    let client = HttpClient::new();
    for args in [&[][..], &["--tp", "2"][..]] {
        let s = Server::start(args);
        rt.block_on(async {
            let base = json!({"model": "stories260K", "max_tokens": 4, "temperature": 0, "logit_bias": {"300": 100}});
            let mut completion = base.clone();
            completion["prompt"] = json!("Once upon a time");
            let mut chat = base;
            chat["messages"] = json!([{"role": "user", "content": "Once upon a time"}]);
            let mut texts = Vec::new();
            for (path, body, field) in [
                ("/v1/completions", completion, "/choices/0/text"),
                ("/v1/chat/completions", chat, "/choices/0/message/content"),
            ] {
                let r = client.post_json(&s.url(path), &body).await.unwrap();
                assert_eq!(r.status, 200, "{args:?} {path}: {}", String::from_utf8_lossy(&r.body));
                let v: Value = r.json().unwrap();
                texts.push(v.pointer(field).unwrap().as_str().unwrap().to_string());
            }
            for t in &texts {
                let one = &t[..t.len() / 4];
                assert!(!one.is_empty() && *t == one.repeat(4), "{args:?}: {t:?} is not one token four times");
            }
            assert_eq!(complete(&client, &s, "Once upon a time", 27).await, LILY);
        });
    }
}

#[test]
fn preemption_under_a_small_kv_cache_still_gives_each_request_its_own_answer() {
    let rt = rt();
    let client = HttpClient::new();
    let prompts = prompts();
    let alone = {
        let s = Server::start(&[]);
        rt.block_on(run_all(&client, &s, &prompts, false))
    };
    // 1 MiB holds 51 blocks of stories260K: 32 concurrent requests of ~3 blocks each must preempt.
    let s = Server::start(&["--kv-cache-mib", "1"]);
    let (batched, preemptions, usage) = rt.block_on(async {
        let batched = run_all(&client, &s, &prompts, true).await;
        (
            batched,
            s.metric(&client, "tessera:num_preemptions_total").await,
            s.metric(&client, "tessera:kv_cache_usage_perc").await,
        )
    });
    assert!(preemptions > 0.0, "the pool was meant to run dry");
    assert_eq!(alone, batched, "recomputed sequences continue exactly where they were");
    assert_eq!(usage, 0.0);
}

#[test]
fn a_client_that_disconnects_frees_its_blocks() {
    let rt = rt();
    let client = HttpClient::new();
    let s = Server::start(&[]);
    rt.block_on(async {
        assert_eq!(s.metric(&client, "tessera:kv_cache_usage_perc").await, 0.0);
        let aborts = s.metric(&client, "tessera:request_success_total{model=\"stories260K\",model_name=\"stories260K\",finished_reason=\"abort\"}").await;
        let body = json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "stream": true});
        let mut seen = 0;
        let url = s.url("/v1/completions");
        let status = client
            .post_stream(&url, &body, |_| {
                seen += 1;
                seen < 3 // hang up after the third event
            })
            .await;
        assert_eq!(status.unwrap(), 200);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let usage = s.metric(&client, "tessera:kv_cache_usage_perc").await;
            let running = s.metric(&client, "tessera:num_requests_running").await;
            let aborted = s.metric(&client, "tessera:request_success_total{model=\"stories260K\",model_name=\"stories260K\",finished_reason=\"abort\"}").await;
            if usage == 0.0 && running == 0.0 && aborted == aborts + 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "blocks not freed after disconnect: usage {usage}, running {running}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And the server still serves.
        assert_eq!(complete(&client, &s, "Once upon a time", 27).await, LILY);
    });
}

#[test]
fn a_thousand_requests_over_64_connections_all_succeed_and_free_every_block() {
    let rt = rt();
    let client = HttpClient::new();
    let s = Server::start(&[]);
    let url = s.url("/v1/completions");
    let (ok, bad) = rt.block_on(async {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (client, url, next) = (client.clone(), url.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut bad) = (0, 0);
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= 1000 {
                        break;
                    }
                    let body = json!({"model": "stories260K", "prompt": format!("Once upon a time {i}"), "max_tokens": 1 + i % 12, "stream": i % 2 == 0, "temperature": 0.5, "seed": i});
                    let good = if i % 2 == 0 {
                        let mut done = false;
                        let st = client.post_stream(&url, &body, |e| {
                            done |= e.data == "[DONE]";
                            true
                        });
                        st.await.is_ok_and(|s| s == 200) && done
                    } else {
                        client.post_json(&url, &body).await.is_ok_and(|r| r.status == 200 && r.json().unwrap()["choices"][0]["text"].is_string())
                    };
                    if good { ok += 1 } else { bad += 1 }
                }
                (ok, bad)
            }));
        }
        let mut totals = (0, 0);
        for t in tasks {
            let (o, b) = t.await.unwrap();
            totals.0 += o;
            totals.1 += b;
        }
        totals
    });
    assert_eq!((ok, bad), (1000, 0));
    rt.block_on(async {
        assert_eq!(s.metric(&client, "tessera:kv_cache_usage_perc").await, 0.0);
        assert_eq!(s.metric(&client, "tessera:num_requests_running").await, 0.0);
        assert_eq!(s.metric(&client, "tessera:num_requests_waiting").await, 0.0);
    });
}

#[test]
fn a_full_queue_gets_429_with_retry_after() {
    let rt = rt();
    let client = HttpClient::new();
    let s = Server::start(&["--max-num-seqs", "1", "--max-waiting", "1"]);
    let statuses = rt.block_on(async {
        let futs: Vec<_> = (0..8)
            .map(|i| {
                let body = json!({"model": "stories260K", "prompt": format!("Tell {i}"), "max_tokens": 200, "ignore_eos": true});
                let (client, url) = (client.clone(), s.url("/v1/completions"));
                async move { client.post_json(&url, &body).await.unwrap() }
            })
            .collect();
        futures_util::future::join_all(futs).await
    });
    let rejected: Vec<_> = statuses.iter().filter(|r| r.status == 429).collect();
    assert!(
        !rejected.is_empty(),
        "expected some 429s, got {:?}",
        statuses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(statuses.iter().all(|r| r.status == 200 || r.status == 429));
    for r in rejected {
        assert_eq!(r.headers.get("retry-after").unwrap(), "1");
        let v = r.json().unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }
}

#[test]
fn chat_matches_transformers_on_tiny_llama3_and_a_model_without_template_gets_400() {
    let rt = rt();
    let client = HttpClient::new();
    let dir = repo().join("testdata/models/tiny-llama3");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let s = Server::start(&["--model", dir.to_str().unwrap()]);
    rt.block_on(async {
        for case in golden["chat_cases"].as_array().unwrap() {
            let n = case["greedy_ids"].as_array().unwrap().len();
            let body = json!({"model": "tiny-llama3", "messages": case["messages"], "max_tokens": n, "temperature": 0, "ignore_eos": true, "logprobs": true});
            let r = client.post_json(&s.url("/v1/chat/completions"), &body).await.unwrap();
            let v = r.json().unwrap();
            assert_eq!(r.status, 200, "{v}");
            assert_eq!(v["usage"]["prompt_tokens"], case["prompt_ids"].as_array().unwrap().len(), "prompt as transformers renders and tokenizes it");
            assert_eq!(v["usage"]["completion_tokens"], n);
            assert_eq!(v["choices"][0]["logprobs"]["content"].as_array().unwrap().len(), n);
            // Same tokens as transformers' greedy run. Its greedy_text decodes the continuation alone, where
            // SentencePiece drops a leading space; decoded after the prompt (as served) the space stays.
            let text = v["choices"][0]["message"]["content"].as_str().unwrap();
            assert_eq!(text.trim_start(), case["greedy_text"].as_str().unwrap().trim_start());
            // /tokenize renders and tokenizes the conversation as the chat endpoint does (and transformers).
            let t = client.post_json(&s.url("/tokenize"), &json!({"model": "tiny-llama3", "messages": case["messages"]})).await.unwrap();
            let t = t.json().unwrap();
            assert_eq!(t["tokens"], case["prompt_ids"], "{t}");
            assert_eq!(t["count"], case["prompt_ids"].as_array().unwrap().len());
            // Fields OpenAI defines that change nothing here are accepted, and change nothing.
            let extra = json!({"model": "tiny-llama3", "messages": case["messages"], "max_tokens": n, "temperature": 0,
                "ignore_eos": true, "store": false, "metadata": {"team": "eval"}, "service_tier": "auto", "user": "u1",
                "prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"]});
            let r = client.post_json(&s.url("/v1/chat/completions"), &extra).await.unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            assert_eq!(r.json().unwrap()["choices"][0]["message"]["content"], v["choices"][0]["message"]["content"]);
        }
        // A prompt, with and without special tokens, back to text through /detokenize.
        let t = client.post_json(&s.url("/tokenize"), &json!({"prompt": "Hello there", "return_token_strs": true})).await.unwrap();
        let t = t.json().unwrap();
        let plain = client
            .post_json(&s.url("/tokenize"), &json!({"prompt": "Hello there", "add_special_tokens": false}))
            .await
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(t["count"].as_u64().unwrap(), plain["count"].as_u64().unwrap() + 1, "BOS: {t} {plain}");
        assert_eq!(t["token_strs"].as_array().unwrap().len(), t["count"].as_u64().unwrap() as usize);
        assert!(t["max_model_len"].as_u64().unwrap() > 0);
        let d = client.post_json(&s.url("/detokenize"), &json!({"tokens": plain["tokens"]})).await.unwrap();
        assert_eq!(d.json().unwrap()["prompt"], "Hello there");
        // History with a tool call and its result reaches the template (here one that shows only content).
        let history = json!([{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "22C"}]);
        let r = client.post_json(&s.url("/tokenize"), &json!({"messages": history})).await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    });
    drop(s);
    let mistral = repo().join("testdata/models/tiny-mistral");
    let s = Server::start(&["--model", mistral.to_str().unwrap()]);
    rt.block_on(async {
        let r = client
            .post_json(
                &s.url("/v1/chat/completions"),
                &json!({"model": "tiny-mistral", "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400);
        assert!(r.json().unwrap()["error"]["message"].as_str().unwrap().contains("no chat template"));
    });
}

#[test]
fn each_request_is_one_json_log_line_with_its_id_status_and_timings() {
    let rt = rt();
    let client = HttpClient::new();
    let s = Server::start(&["--log-format", "json"]);
    let secret = "a prompt that must never reach the logs";
    rt.block_on(async {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(s.url("/v1/completions"))
            .header("x-request-id", "trace-me-42")
            .body(serde_json::to_string(&json!({"model": "stories260K", "prompt": secret, "max_tokens": 4})).unwrap())
            .unwrap();
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<String>();
        let resp = http.request(req).await.unwrap();
        assert_eq!(resp.headers()["x-request-id"], "trace-me-42");
        http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
        let r = client.post_json(&s.url("/v1/completions"), &json!({"model": "nope", "prompt": "x"})).await.unwrap();
        assert_eq!(r.status, 404);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let (ok, missing) = loop {
        let lines = s.log.lock().unwrap().clone();
        let events: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &Value| v["message"] == "request")
            .collect();
        let ok = events.iter().find(|v| v["request_id"] == "trace-me-42").cloned();
        let missing = events.iter().find(|v| v["status"] == 404).cloned();
        if let (Some(ok), Some(missing)) = (ok, missing) {
            assert!(lines.iter().all(|l| !l.contains(secret)), "prompt text leaked into the logs");
            assert!(
                lines
                    .iter()
                    .filter(|l| l.contains("\"message\":\"request\""))
                    .all(|l| serde_json::from_str::<Value>(l).is_ok())
            );
            break (ok, missing);
        }
        assert!(Instant::now() < deadline, "request lines not logged: {lines:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        (ok["status"].as_u64(), ok["method"].as_str(), ok["path"].as_str()),
        (Some(200), Some("POST"), Some("/v1/completions"))
    );
    assert_eq!(ok["completed"], true);
    assert!(ok["duration_ms"].as_f64().unwrap() >= 0.0 && ok["first_byte_ms"].as_f64().is_some());
    assert_eq!(ok["level"], "INFO");
    assert!(missing["request_id"].as_str().unwrap().starts_with("req-"));
}

/// Text logs written to a pipe (a file, `kubectl logs`, a log shipper) carry no terminal colour codes, so
/// that `key=value` fields can be searched for as written.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let s = Server::start(&[]);
    let r = rt()
        .block_on(
            HttpClient::new()
                .post_json(&s.url("/v1/completions"), &json!({"model": "stories260K", "prompt": "x", "max_tokens": 1})),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.logged("path=/v1/completions status=200") {
        let lines = s.log.lock().unwrap().clone();
        assert!(Instant::now() < deadline, "no plain request line: {lines:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = s.log.lock().unwrap().clone();
    assert!(lines.iter().all(|l| !l.contains('\x1b')), "escape codes in {lines:?}");
}

/// Parses an exposition into (name, labels, value) samples.
fn samples(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("malformed sample line {l:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n.to_string(), rest.trim_end_matches('}').to_string()),
                None => (series.to_string(), String::new()),
            };
            (name, labels, value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

#[test]
fn every_design_metric_is_exported_with_sane_values_after_a_request() {
    let rt = rt();
    let client = HttpClient::new();
    let s = Server::start(&[]);
    let text = rt.block_on(async {
        assert_eq!(complete(&client, &s, "Once upon a time", 27).await, LILY);
        let r = client.get(&s.url("/metrics")).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
        String::from_utf8(r.body.to_vec()).unwrap()
    });
    assert!(text.trim_end().ends_with("# EOF"));
    let all = samples(&text);
    let get = |name: &str| -> Vec<&(String, String, f64)> { all.iter().filter(|x| x.0 == name).collect() };
    let one = |name: &str| -> f64 {
        let v = get(name);
        assert_eq!(v.len(), 1, "{name}: {v:?}");
        assert!(v[0].1.contains("model=\"stories260K\""), "{name} lacks the model label");
        assert!(v[0].1.contains("model_name=\"stories260K\""), "{name} lacks vLLM's model_name label");
        v[0].2
    };
    assert_eq!(one("tessera:num_requests_running"), 0.0);
    assert_eq!(one("tessera:num_requests_waiting"), 0.0);
    assert!((0.0..=1.0).contains(&one("tessera:kv_cache_usage_perc")));
    assert_eq!(one("tessera:prompt_tokens_total"), 5.0);
    assert_eq!(one("tessera:generation_tokens_total"), 27.0);
    for h in ["time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"] {
        assert_eq!(one(&format!("tessera:{h}_count")), 1.0, "{h}");
        assert!(one(&format!("tessera:{h}_sum")) > 0.0, "{h}");
    }
    assert_eq!(one("tessera:inter_token_latency_seconds_count"), 26.0);
    let success = get("tessera:request_success_total");
    let length = success.iter().find(|x| x.1.contains("finished_reason=\"length\"")).unwrap();
    assert_eq!(length.2, 1.0);
    assert!(success.iter().all(|x| x.1.contains("model=\"stories260K\"")));
    // Histogram buckets are cumulative and end at +Inf with the count.
    let buckets: Vec<_> = get("tessera:e2e_request_latency_seconds_bucket");
    assert!(buckets.windows(2).all(|w| w[0].2 <= w[1].2));
    assert!(buckets.last().unwrap().1.contains("le=\"+Inf\"") && buckets.last().unwrap().2 == 1.0);
}

#[test]
fn per_worker_step_collective_and_kv_metrics_with_two_ranks() {
    let rt = rt();
    let client = HttpClient::new();
    let s = Server::start(&["--tp", "2"]);
    let text = rt.block_on(async {
        assert_eq!(complete(&client, &s, "Once upon a time", 27).await, LILY);
        String::from_utf8(client.get(&s.url("/metrics")).await.unwrap().body.to_vec()).unwrap()
    });
    let all = samples(&text);
    let value = |name: &str, rank: &str| -> f64 {
        all.iter()
            .find(|x| x.0 == name && x.1.contains(&format!("rank=\"{rank}\"")) && x.1.contains("model=\"stories260K\""))
            .unwrap_or_else(|| panic!("{name} rank {rank} missing"))
            .2
    };
    for rank in ["0", "1"] {
        // 27 tokens: one prefill step and 26 decodes.
        assert_eq!(value("tessera:worker_step_seconds_count", rank), 27.0);
        assert!(value("tessera:worker_step_seconds_sum", rank) > 0.0);
        assert!(value("tessera:worker_collective_seconds_sum", rank) > 0.0, "tp=2 all-reduces take time");
        assert!(value("tessera:worker_collective_seconds_sum", rank) < value("tessera:worker_step_seconds_sum", rank));
        assert!(value("tessera:worker_kv_cache_blocks", rank) > 0.0);
    }
}
