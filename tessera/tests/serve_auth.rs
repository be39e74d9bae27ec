//! API keys end to end: `tessera keys create`, `tessera serve --api-keys`, reloads.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;

async fn call(s: &Server, key: Option<&str>, path: &str) -> (u16, Value) {
    let mut req =
        hyper::Request::builder().method(if path.ends_with("models") { "GET" } else { "POST" }).uri(s.url(path));
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let body =
        json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}).to_string();
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<String>();
    let resp = http.request(req.body(body).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[test]
fn keys_guard_the_api_and_reload_without_dropping_requests() {
    let (alice, alice_entry) = create_key("acme", "alice", None);
    let (bob, bob_entry) = create_key("globex", "bob", Some("other-model"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    std::fs::write(&file, json!({"keys": [alice_entry.clone(), bob_entry.clone()]}).to_string()).unwrap();
    let s = Server::start(&["--api-keys", file.to_str().unwrap()]);
    let client = HttpClient::new();
    let rt = rt();
    rt.block_on(async {
        let (st, v) = call(&s, None, "/v1/completions").await;
        assert_eq!(st, 401);
        assert!(v["error"]["message"].as_str().unwrap().contains("didn't provide an API key"));
        let (st, v) = call(&s, Some("tsk-not-a-key"), "/v1/completions").await;
        assert_eq!((st, v["error"]["code"].as_str()), (401, Some("invalid_api_key")));
        let (st, v) = call(&s, Some(&bob), "/v1/completions").await;
        assert_eq!(
            (st, v["error"]["code"].as_str(), v["error"]["param"].as_str()),
            (403, Some("model_not_allowed"), Some("model"))
        );
        let (st, v) = call(&s, Some(&alice), "/v1/completions").await;
        assert_eq!(st, 200);
        assert_eq!(v["choices"][0]["text"], ", there was");
        assert_eq!(call(&s, None, "/v1/models").await.0, 401);
        assert_eq!(call(&s, Some(&bob), "/v1/models").await.0, 200);
        // Probes and scrapers need no key.
        for path in ["/health", "/ready", "/metrics"] {
            assert_eq!(client.get(&s.url(path)).await.unwrap().status, 200, "{path}");
        }
    });

    // A stream admitted before alice is revoked runs to the end.
    let stream_body = json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "stream": true});
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (url, alice2) = (s.url("/v1/completions"), alice.clone());
    let streamer = std::thread::spawn(move || {
        common::rt().block_on(async move {
            let req = hyper::Request::builder()
                .method("POST")
                .uri(url)
                .header("authorization", format!("Bearer {alice2}"))
                .body(stream_body.to_string())
                .unwrap();
            let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<String>();
            let resp = http.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let _ = tx.send(());
            let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
            String::from_utf8(body.to_vec()).unwrap()
        })
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();

    // Revoke alice, reload by SIGHUP.
    std::fs::write(&file, json!({"keys": [bob_entry.clone()]}).to_string()).unwrap();
    assert!(Command::new("kill").args(["-HUP", &s.pid().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    rt.block_on(async {
        while call(&s, Some(&alice), "/v1/completions").await.0 != 401 {
            assert!(Instant::now() < deadline, "revoked key still accepted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let streamed = streamer.join().unwrap();
    assert!(
        streamed.trim_end().ends_with("data: [DONE]"),
        "the admitted stream was cut: {}",
        &streamed[streamed.len().saturating_sub(200)..]
    );
    assert!(!streamed.contains("\"error\""));

    // A broken file is refused; the keys in force stay.
    std::fs::write(&file, "{ not json").unwrap();
    assert!(Command::new("kill").args(["-HUP", &s.pid().to_string()]).status().unwrap().success());
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(call(&s, Some(&bob), "/v1/models").await.0, 200);
    });

    // Re-adding alice is picked up from the file change alone.
    std::fs::write(&file, json!({"keys": [alice_entry, bob_entry]}).to_string()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    rt.block_on(async {
        while call(&s, Some(&alice), "/v1/completions").await.0 != 200 {
            assert!(Instant::now() < deadline, "re-added key not picked up from the file change");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn a_bad_key_file_stops_the_server_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    std::fs::write(&file, r#"{"keys": [{"id": "x", "tenant": "t", "secret_sha256": "short"}]}"#).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--port", "0", "--api-keys", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("keys.json") && err.contains("keys[0].secret_sha256"), "{err}");
}

#[test]
fn per_key_limits_answer_429_with_openai_headers() {
    let (limited, mut limited_entry) = create_key("acme", "limited", None);
    limited_entry["limits"] = json!({"requests_per_minute": 3, "tokens_per_minute": 200, "max_tokens_per_request": 50});
    let (single, mut single_entry) = create_key("acme", "single", None);
    single_entry["limits"] = json!({"concurrent_requests": 1});
    let (tight, mut tight_entry) = create_key("acme", "tight", None);
    tight_entry["limits"] = json!({"tokens_per_minute": 40});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    std::fs::write(&file, json!({"keys": [limited_entry, single_entry, tight_entry]}).to_string()).unwrap();
    let s = Server::start(&["--api-keys", file.to_str().unwrap()]);
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<String>();
    let post = |key: &str, body: Value| {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(s.url("/v1/completions"))
            .header("authorization", format!("Bearer {key}"))
            .body(body.to_string())
            .unwrap();
        http.request(req)
    };
    let body = |max: usize| json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": max, "ignore_eos": true});
    rt().block_on(async {
        // Requests per minute, tokens per minute, max_tokens per request, with the headers on every response.
        let r = post(&limited, body(10)).await.unwrap();
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(
            (&h["x-ratelimit-limit-requests"], &h["x-ratelimit-remaining-requests"]),
            (&"3".parse().unwrap(), &"2".parse().unwrap())
        );
        assert_eq!(h["x-ratelimit-limit-tokens"], "200");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "185", "5 prompt + 10 max_tokens reserved");
        assert!(h.contains_key("x-ratelimit-reset-requests") && h.contains_key("x-ratelimit-reset-tokens"));
        let r = post(&limited, body(60)).await.unwrap();
        assert_eq!(r.status(), 400, "over max_tokens_per_request");
        assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
        let r = post(&limited, body(10)).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
        let r = post(&limited, body(10)).await.unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
        let v: Value =
            serde_json::from_slice(&http_body_util::BodyExt::collect(r.into_body()).await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");

        // Tokens per minute: 35 of 40 reserved and used; the next 35 must wait.
        assert_eq!(post(&tight, body(30)).await.unwrap().status(), 200);
        let r = post(&tight, body(30)).await.unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() > 30);

        // One request at a time: a second one while a stream runs is refused, then admitted once it ends.
        let mut streaming = body(400);
        streaming["stream"] = json!(true);
        let first = post(&single, streaming).await.unwrap();
        assert_eq!(first.status(), 200);
        let r = post(&single, body(3)).await.unwrap();
        assert_eq!(r.status(), 429, "concurrency limit");
        drop(first); // hang up: the slot frees
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = post(&single, body(3)).await.unwrap().status();
            if st == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "slot not freed after the stream ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Every refusal is counted against its key id: the admission's (requests, concurrency) and the
        // handler's (tokens).
        let metrics = HttpClient::new().get(&s.url("/metrics")).await.unwrap();
        let text = String::from_utf8(metrics.body.to_vec()).unwrap();
        for id in ["limited", "tight", "single"] {
            let line = text
                .lines()
                .find(|l| {
                    l.starts_with("tessera:key_requests_total{")
                        && l.contains(&format!("key_id=\"{id}\""))
                        && l.contains("status=\"limited\"")
                })
                .unwrap_or_else(|| panic!("no refusal counted for {id}"));
            assert!(line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() >= 1.0, "{line}");
        }
    });
}
