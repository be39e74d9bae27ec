//! `--model FILE.gguf` end to end: `tessera serve` (in process and over two worker processes, which load the
//! file through `LoadModel`) and `tessera generate` return the golden greedy completion of the model the
//! file was converted from, with the tokenizer and chat template read from the file and the model named
//! after it.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;
use tessera_coordinator::tokenizer::Tokenizer;

fn gguf(name: &str) -> PathBuf {
    repo().join("testdata/gguf-models").join(name)
}

/// (GGUF file, the model directory it was converted from, with its golden file).
fn models() -> Vec<(PathBuf, PathBuf)> {
    vec![
        (gguf("tiny-llama-bpe-f32.gguf"), gguf("tiny-llama-bpe")),
        (gguf("stories260K-f32.gguf"), repo().join("models/stories260K")),
    ]
}

fn golden(dir: &std::path::Path) -> Vec<Value> {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    g["cases"].as_array().unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The text a server streams for `new` after `prompt`, with the Hugging Face tokenizer of `dir`.
fn completion_text(dir: &std::path::Path, prompt: &[u32], new: &[u32]) -> String {
    let t = Tokenizer::load(dir).unwrap();
    let all: Vec<u32> = prompt.iter().chain(new).copied().collect();
    let (whole, before) = (t.decode(&all).unwrap(), t.decode(prompt).unwrap());
    whole.strip_prefix(&before).unwrap().to_string()
}

#[test]
fn serve_with_a_gguf_file_returns_the_golden_completions() {
    for tp in ["1", "2"] {
        for (file, dir) in models() {
            let stem = file.file_stem().unwrap().to_str().unwrap().to_string();
            let s = Server::start(&["--model", file.to_str().unwrap(), "--tp", tp]);
            let client = HttpClient::new();
            rt().block_on(async {
                let r = client.get(&s.url("/v1/models")).await.unwrap();
                let v: Value = r.json().unwrap();
                assert_eq!(v["data"][0]["id"], stem.as_str(), "the model is named after the file: {v}");
                for case in golden(&dir) {
                    let greedy = ids(&case["greedy_ids"]);
                    let body = json!({"model": stem, "prompt": case["prompt"], "max_tokens": greedy.len(),
                                      "temperature": 0, "ignore_eos": true});
                    let r = client.post_json(&s.url("/v1/completions"), &body).await.unwrap();
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    let v: Value = r.json().unwrap();
                    let prompt = ids(&case["prompt_ids"]);
                    assert_eq!(v["usage"]["prompt_tokens"], prompt.len(), "{stem} tp {tp}: {}", case["prompt"]);
                    let want = completion_text(&dir, &prompt, &greedy);
                    assert_eq!(v["choices"][0]["text"], want.as_str(), "{stem} tp {tp}: {}", case["prompt"]);
                }
                // The chat template comes from the file too.
                let body = json!({"model": stem, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                  "temperature": 0});
                let r = client.post_json(&s.url("/v1/chat/completions"), &body).await.unwrap();
                assert_eq!(r.status, 200, "{stem}: {}", String::from_utf8_lossy(&r.body));
            });
        }
    }
}

#[test]
fn generate_with_a_gguf_file_matches_the_golden_ids_in_process_and_over_two_workers() {
    for tp in ["1", "2"] {
        for (file, dir) in models() {
            let case = &golden(&dir)[0];
            let n = case["greedy_ids"].as_array().unwrap().len().to_string();
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
                .args(["generate", "--model", file.to_str().unwrap(), "--prompt", case["prompt"].as_str().unwrap()])
                .args(["--max-tokens", &n, "--temperature", "0", "--ignore-eos", "--json", "--tp", tp])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["prompt_token_ids"], case["prompt_ids"], "{} tp {tp}", file.display());
            assert_eq!(v["token_ids"], case["greedy_ids"], "{} tp {tp}", file.display());
        }
    }
}

#[test]
fn a_broken_gguf_file_is_an_error_at_start_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(gguf("stories260K-f32.gguf")).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--port", "0", "--model", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cut.gguf") && err.contains("past the end"), "{err}");
}

/// Cluster mode: the coordinator reads the tokenizer and config from the file, the workers (told its path)
/// load it through `LoadModel`.
#[test]
fn a_coordinator_serves_a_gguf_file_over_registered_workers() {
    let (file, dir) = models().remove(0);
    let stem = file.file_stem().unwrap().to_str().unwrap().to_string();
    rt().block_on(async {
        let client = HttpClient::new();
        let etcd = common::etcd::Etcd::start();
        let _workers: Vec<_> = (1..=2).map(|i| common::etcd::Worker::start(&etcd, "g", &format!("w{i}"))).collect();
        let coord = Server::coordinator(&[
            "--etcd",
            &etcd.endpoint,
            "--cluster",
            "g",
            "--tp",
            "2",
            "--model",
            file.to_str().unwrap(),
        ]);
        common::etcd::wait_for(&client, &coord, std::time::Duration::from_secs(60), "a replica", |v| {
            common::etcd::replicas(v) == 1
        })
        .await;
        let case = &golden(&dir)[1];
        let greedy = ids(&case["greedy_ids"]);
        let body = json!({"model": stem, "prompt": case["prompt"], "max_tokens": greedy.len(), "temperature": 0,
                          "ignore_eos": true});
        let r = client.post_json(&coord.url("/v1/completions"), &body).await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v: Value = r.json().unwrap();
        assert_eq!(v["choices"][0]["text"], completion_text(&dir, &ids(&case["prompt_ids"]), &greedy).as_str());
    });
}
