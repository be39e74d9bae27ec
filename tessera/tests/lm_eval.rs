//! lm-evaluation-harness (PyPI `lm_eval`) against `tessera serve`, as an ML engineer runs it: its
//! `local-completions` model on a loglikelihood task (echo + logprobs over /v1/completions) and its
//! `local-chat-completions` model on a generate_until task (/v1/chat/completions). Every answer equals what
//! lm_eval's own `hf` backend (transformers) gave on the same model, committed in
//! `testdata/lm_eval/golden.json` by `scripts/make_lm_eval_golden.py`; this test needs lm_eval, not torch.

mod common;

use std::{collections::HashMap, path::Path, process::Command};

use common::*;
use serde_json::Value;

/// A Python with lm_eval (and transformers, for its tokenizer).
fn python() -> Option<String> {
    python_with("lm_eval, transformers", "'lm_eval[api]' transformers")
}

/// Runs lm_eval's `model` on `task` against the server at `url`; the samples it logged, by doc id.
fn lm_eval(python: &str, model: &str, model_args: &str, task: &str, extra: &[&str]) -> HashMap<String, Value> {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(python)
        .current_dir(repo())
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .args(["-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", task])
        .args(["--include_path", "testdata/lm_eval", "--log_samples", "--output_path"])
        .arg(out.path())
        .args(extra)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "lm_eval failed:\n{log}");
    let samples = find(out.path(), &format!("samples_{task}_")).unwrap_or_else(|| panic!("no samples file:\n{log}"));
    std::fs::read_to_string(samples)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["doc_id"].to_string(), v)
        })
        .collect()
}

fn find(dir: &Path, prefix: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find(&p, prefix) {
                return Some(f);
            }
        } else if p.file_name()?.to_string_lossy().starts_with(prefix) {
            return Some(p);
        }
    }
    None
}

#[test]
fn lm_eval_scores_and_generates_as_its_transformers_backend_does() {
    let Some(python) = python() else { return };
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("testdata/lm_eval/golden.json")).unwrap()).unwrap();
    let s = Server::start(&[]);
    let tokenizer = repo().join("models/stories260K");

    let args = format!(
        // With BOS, as the hf backend (and the model's tokenizer) encodes the context.
        "model=stories260K,base_url={}/v1/completions,tokenizer={},tokenizer_backend=huggingface,add_bos_token=True,num_concurrent=1,max_retries=1",
        s.base,
        tokenizer.display()
    );
    let samples = lm_eval(&python, "local-completions", &args, "tessera_ll", &[]);
    let want = golden["tessera_ll"].as_object().unwrap();
    assert_eq!(samples.len(), want.len());
    for (doc, choices) in want {
        let got = &samples[doc]["resps"];
        for (i, w) in choices.as_array().unwrap().iter().enumerate() {
            // lm_eval logs its numbers as strings.
            let got_ll: f64 = got[i][0][0].as_str().map_or_else(|| got[i][0][0].as_f64(), |v| v.parse().ok()).unwrap();
            let want_ll = w[0].as_f64().unwrap();
            assert!(
                (got_ll - want_ll).abs() < 1e-4,
                "doc {doc} choice {i}: loglikelihood {got_ll} vs transformers {want_ll}"
            );
        }
    }

    let args = format!("model=stories260K,base_url={}/v1/chat/completions,num_concurrent=1,max_retries=1", s.base);
    let samples = lm_eval(&python, "local-chat-completions", &args, "tessera_gen", &["--apply_chat_template"]);
    let want = golden["tessera_gen"].as_object().unwrap();
    assert_eq!(samples.len(), want.len());
    for (doc, text) in want {
        // The same tokens; transformers decodes the continuation alone, where SentencePiece drops the first
        // token's leading space, while a server decodes it after the prompt and keeps it (as vLLM does).
        let got = samples[doc]["resps"][0][0].as_str().unwrap();
        assert_eq!(got.trim_start(), text.as_str().unwrap(), "doc {doc}: generated text");
    }
}
