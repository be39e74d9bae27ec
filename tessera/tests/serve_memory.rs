//! Memory a response may hold: a streaming client that stops reading stops its request (its events do not
//! pile up while the engine generates on), and a large response with logprobs holds about its own bytes,
//! given back once it is sent.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;

/// `VmRSS` or `VmHWM` of a process, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The value of a metric line that carries `label` (e.g. `finished_reason="abort"`), 0 if none does.
async fn labelled_metric(s: &Server, client: &HttpClient, name: &str, label: &str) -> f64 {
    let text = String::from_utf8(client.get(&s.url("/metrics")).await.unwrap().body.to_vec()).unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_stream_whose_client_stops_reading_is_stopped_and_the_server_serves_on() {
    let s = Server::start(&[]);
    // 128 choices of 509 tokens with 20 alternatives each: some 60 MB of events, far more than the
    // socket's buffers hold.
    let (choices, max_tokens) = (8 * 16, 509);
    let body = json!({
        "model": "stories260K", "prompt": vec!["Once"; 8], "n": 16, "max_tokens": max_tokens, "ignore_eos": true,
        "logprobs": 20, "stream": true,
    })
    .to_string();
    let mut silent = TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
    write!(
        silent,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let total = (choices * max_tokens) as f64;
    let client = HttpClient::new();
    rt().block_on(async {
        // Nothing is read from `silent`: the request must end on its own, well before all its tokens.
        let started = Instant::now();
        let generated = loop {
            let generated = s.metric(&client, "tessera:generation_tokens_total").await;
            let running = s.metric(&client, "tessera:num_requests_running").await;
            if generated > 0.0 && running == 0.0 {
                break generated;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "still running after 2 min: {generated} tokens");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("stopped after {generated} of {total} tokens, {:?}", started.elapsed());
        assert!(generated < total * 0.6, "a client that reads nothing had {generated} of its {total} tokens generated");
        let aborted = labelled_metric(&s, &client, "tessera:request_success_total", "finished_reason=\"abort\"").await;
        assert_eq!(aborted, choices as f64, "every choice of the silent stream ends as aborted");
        assert!(s.logged("the client stopped reading its stream"), "the stop is not logged");

        // The server serves on, while the silent connection is still open: a whole response, and a stream
        // that is read, in full.
        assert!(!complete(&client, &s, "Once upon a time", 8).await.is_empty());
        let mut events = Vec::new();
        let status = client
            .post_stream(
                &s.url("/v1/completions"),
                &json!({"model": "stories260K", "prompt": "Once", "n": 16, "max_tokens": 200, "ignore_eos": true,
                        "logprobs": 20, "stream": true}),
                |e| {
                    events.push(e.data);
                    true
                },
            )
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let tokens: usize = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .map(|v| v["choices"][0]["logprobs"]["tokens"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(tokens, 16 * 200, "a stream that is read gets every token");
    });

    // The silent client, reading at last, finds its stream ended by an error that says why.
    silent.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    silent.read_to_end(&mut got).unwrap();
    let got = String::from_utf8_lossy(&got);
    let tail: Vec<&str> = got.lines().filter(|l| l.starts_with("data: ")).rev().take(2).collect();
    assert_eq!(tail.first(), Some(&"data: [DONE]"), "{tail:?}");
    assert!(tail.get(1).is_some_and(|l| l.contains("stream_not_read")), "{tail:?}");
}

#[test]
fn a_large_response_with_logprobs_holds_about_its_own_size_and_gives_it_back() {
    let s = Server::start(&[]);
    let pid = s.pid();
    // 64 greedy choices of 300 tokens with 20 alternatives each: a body of about 10 MB.
    let request = |logprobs: bool| {
        let mut r = json!({
            "model": "stories260K", "prompt": ["Once", "Lily", "The", "One day"], "n": 16, "max_tokens": 300,
            "ignore_eos": true, "temperature": 0,
        });
        if logprobs {
            r["logprobs"] = json!(20);
        }
        r
    };
    let client = HttpClient::new();
    rt().block_on(async {
        // Without logprobs first: the texts to compare with, and the process warmed up.
        let plain = client.post_json(&s.url("/v1/completions"), &request(false)).await.unwrap();
        assert_eq!(plain.status, 200);
        let plain = plain.json().unwrap();

        // VmHWM starts again from the current RSS (Linux 4.0 and later).
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
        let before = status_bytes(pid, "VmRSS");
        let r = client.post_json(&s.url("/v1/completions"), &request(true)).await.unwrap();
        let peak = status_bytes(pid, "VmHWM");
        assert_eq!(r.status, 200);
        let size = r.body.len() as u64;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = status_bytes(pid, "VmRSS");
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "response {:.1} MiB; server RSS {:.1} MiB before, peak {:.1} MiB, {:.1} MiB after",
            mib(size),
            mib(before),
            mib(peak),
            mib(after)
        );
        assert!(size > 8 << 20, "the response is smaller than planned: {size} bytes");
        // Before the fix: the peak grew by 19 times the response, and stayed there.
        assert!(
            peak.saturating_sub(before) < 3 * size,
            "serving a {:.1} MiB response raised the peak RSS by {:.1} MiB",
            mib(size),
            mib(peak.saturating_sub(before))
        );
        assert!(
            after.saturating_sub(before) < size,
            "{:.1} MiB more RSS after a {:.1} MiB response was sent",
            mib(after.saturating_sub(before)),
            mib(size)
        );

        // The same answer as without logprobs, with logprobs that spell it.
        let v = r.json().unwrap();
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 64);
        for (c, p) in choices.iter().zip(plain["choices"].as_array().unwrap()) {
            assert_eq!(c["text"], p["text"]);
            assert_eq!(c["finish_reason"], "length");
            let lp = &c["logprobs"];
            let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
            assert_eq!(tokens.len(), 300);
            let text = c["text"].as_str().unwrap();
            let offsets = lp["text_offset"].as_array().unwrap();
            let top = lp["top_logprobs"].as_array().unwrap();
            for (i, t) in tokens.iter().enumerate() {
                let logprob = lp["token_logprobs"][i].as_f64().unwrap();
                let alternatives = top[i].as_object().unwrap();
                assert!(!alternatives.is_empty() && alternatives.len() <= 20);
                // Greedy: the token is the most likely alternative.
                let best = alternatives.values().map(|l| l.as_f64().unwrap()).fold(f64::MIN, f64::max);
                assert_eq!(logprob, best, "token {i} of choice {}", c["index"]);
                assert_eq!(alternatives.get(*t).and_then(Value::as_f64), Some(logprob));
                // Where the token's text starts in the choice's (a token's own text may differ from what it
                // adds, as a word mark after an end of sequence does).
                let at = offsets[i].as_u64().unwrap() as usize;
                assert!(at <= text.len() && (i == 0 || offsets[i - 1].as_u64().unwrap() as usize <= at));
            }
        }
        assert_eq!(v["usage"]["completion_tokens"], 64 * 300);
    });
}
