//! `tessera serve --tp 2` when a worker process dies: the replica is started again, a stream in flight goes
//! on to the same text it would have had, and `/health` fails only once the replica cannot be started any
//! more.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;

fn kill9(pid: u32) {
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
}

fn body(stream: bool) -> Value {
    json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0,
        "ignore_eos": true, "stream": stream})
}

async fn complete(client: &HttpClient, s: &Server) -> Result<String, String> {
    let r = client.post_json(&s.url("/v1/completions"), &body(false)).await.map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("{}: {}", r.status, String::from_utf8_lossy(&r.body)));
    }
    Ok(r.json().unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
}

#[test]
fn a_killed_worker_is_replaced_and_the_stream_in_flight_goes_on_unchanged() {
    let s = Server::start(&["--tp", "2"]);
    let before = children_of(s.pid());
    assert_eq!(before.len(), 2, "{before:?}");
    rt().block_on(async {
        let client = HttpClient::new();
        let reference = complete(&client, &s).await.unwrap();
        let mut text = String::new();
        let mut chunks = 0;
        let mut error = None;
        let status = client
            .post_stream(&s.url("/v1/completions"), &body(true), |ev| {
                if ev.data == "[DONE]" {
                    return false;
                }
                let v: Value = serde_json::from_str(&ev.data).unwrap();
                if v.get("error").is_some() {
                    error = Some(v.to_string());
                    return true;
                }
                text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
                chunks += 1;
                if chunks == 5 {
                    kill9(before[1]);
                }
                true
            })
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(error, None, "the stream failed when its replica did");
        assert!(chunks > 5, "the stream ended before the worker was killed");
        assert_eq!(text, reference, "the stream changed across the restart");
        assert_eq!(s.metric(&client, "tessera:migrated_sequences_total").await, 1.0, "the stream did not move");
        let health = client.get(&s.url("/health")).await.unwrap();
        assert_eq!(health.status, 200);
        assert_eq!(complete(&client, &s).await.unwrap(), reference);
    });
    let after = children_of(s.pid());
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.iter().all(|p| !before.contains(p)), "the old group's workers were not replaced: {after:?}");
    assert!(s.logged("restarting the replica"));
}

#[test]
fn health_fails_once_the_replica_cannot_be_started_again() {
    let model = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(repo().join("models/stories260K")).unwrap().flatten() {
        std::fs::copy(f.path(), model.path().join(f.file_name())).unwrap();
    }
    let s =
        Server::start(&["--tp", "2", "--served-model-name", "stories260K", "--model", model.path().to_str().unwrap()]);
    let workers = children_of(s.pid());
    assert_eq!(workers.len(), 2);
    rt().block_on(async {
        let client = HttpClient::new();
        assert_eq!(client.get(&s.url("/health")).await.unwrap().status, 200);
        // The model is gone: every restart fails, and the server gives up.
        std::fs::remove_dir_all(model.path()).unwrap();
        kill9(workers[0]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let health = loop {
            let h = client.get(&s.url("/health")).await.unwrap();
            if h.status != 200 {
                break h;
            }
            assert!(Instant::now() < deadline, "/health still 200 a minute after the replica could not restart");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(health.status, 503);
        let v: Value = health.json().unwrap();
        assert_eq!(v["status"], "failed");
        assert!(v["reason"].as_str().unwrap().contains("failed 5 times in a row"), "{v}");
        assert_eq!(client.get(&s.url("/ready")).await.unwrap().status, 503);
        let r = complete(&client, &s).await.unwrap_err();
        assert!(r.starts_with("503"), "{r}");
    });
}
