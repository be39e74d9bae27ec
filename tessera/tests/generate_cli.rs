//! `tessera generate` as a user runs it: the real binary, its stdout, stderr and exit status.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A writable copy of the default model, for tests that edit its files.
fn default_model_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(repo().join("models/stories260K")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn tessera(args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().unwrap();
    let out = Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    };
    assert!(!out.stderr.contains("panicked"), "tessera panicked: {}", out.stderr);
    out
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let o = tessera(args);
    assert!(!o.ok, "{args:?} should fail; stdout {}", o.stdout);
    for n in needles {
        assert!(o.stderr.contains(n), "{args:?}: expected {n:?} in stderr: {}", o.stderr);
    }
}

fn golden_case0(model: &str) -> Value {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(model).join("golden.json")).unwrap()).unwrap();
    g["cases"][0].clone()
}

#[test]
fn default_model_tells_the_lily_story() {
    let o = tessera(&["generate", "--prompt", "Once upon a time", "--max-tokens", "27", "--temperature", "0"]);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(o.stdout, ", there was a little girl named Lily. She loved to play outside in the park.\n");
}

#[test]
fn json_output_matches_golden_ids_and_carries_logprobs() {
    let case = golden_case0("models/stories260K");
    let o = tessera(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "20",
        "--temperature",
        "0",
        "--json",
        "--top-logprobs",
        "3",
    ]);
    assert!(o.ok, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["prompt_token_ids"], case["prompt_ids"]);
    let want: Vec<Value> = case["greedy_ids"].as_array().unwrap()[..20].to_vec();
    assert_eq!(v["token_ids"].as_array().unwrap(), &want);
    assert_eq!(v["finish_reason"], "length");
    assert!(v["text"].as_str().unwrap().starts_with(", there was a little girl named Lily."));
    let top = v["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 20);
    for (pos, alts) in top.iter().enumerate() {
        let alts = alts.as_array().unwrap();
        assert_eq!(alts.len(), 3);
        // Greedy: the chosen token is the most likely one, and logprobs are sorted and negative.
        assert_eq!(alts[0]["token_id"], want[pos]);
        let lp: Vec<f64> = alts.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
        assert!(lp.windows(2).all(|w| w[0] >= w[1]) && lp[0] <= 0.0, "{lp:?}");
    }
    // Without --top-logprobs the field is absent.
    let o = tessera(&["generate", "--prompt", "Once upon a time", "--max-tokens", "2", "--temperature", "0", "--json"]);
    assert!(serde_json::from_str::<Value>(&o.stdout).unwrap().get("top_logprobs").is_none());
}

#[test]
fn prompt_ids_and_other_models() {
    for m in ["testdata/models/tiny-llama3", "testdata/models/tiny-qwen2", "testdata/models/tiny-llama-bf16-sharded"] {
        let case = golden_case0(m);
        let ids: Vec<String> = case["prompt_ids"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
        let model = repo().join(m);
        let o = tessera(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &ids.join(","),
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ]);
        assert!(o.ok, "{m}: {}", o.stderr);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["token_ids"].as_array().unwrap()[..], case["greedy_ids"].as_array().unwrap()[..12], "{m}");
    }
}

#[test]
fn seeded_sampling_repeats_and_eos_stops() {
    let args = [
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "40",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "1234",
        "--json",
    ];
    let a = tessera(&args);
    let b = tessera(&args);
    assert!(a.ok, "{}", a.stderr);
    assert_eq!(a.stdout, b.stdout, "same seed, same output");
    let mut other = args;
    other[12] = "99";
    let c = tessera(&other);
    assert_ne!(a.stdout, c.stdout, "a different seed should change a 40-token sample");
    // stories260K (like llama2.c) ends a story with BOS, id 1. With generation_config.json naming both 1
    // and 2 as end-of-sequence, a long greedy run must stop there with "stop", the EOS not included.
    let tmp = default_model_copy();
    std::fs::write(tmp.path().join("generation_config.json"), r#"{"bos_token_id": 1, "eos_token_id": [2, 1]}"#)
        .unwrap();
    let dir = tmp.path().to_str().unwrap();
    let o = tessera(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "400",
        "--temperature",
        "0",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["finish_reason"], "stop", "{}", o.stdout);
    let ids = v["token_ids"].as_array().unwrap();
    assert!(ids.len() < 400 && !ids.contains(&Value::from(1)));
    assert!(v["text"].as_str().unwrap().ends_with("You are a good friend.\""), "{}", v["text"]);
    // --ignore-eos runs on to the limit.
    let o = tessera(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "300",
        "--temperature",
        "0",
        "--json",
        "--ignore-eos",
    ]);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 300);
}

#[test]
fn bad_input_is_a_clear_error() {
    let long = "a ".repeat(600);
    fails_with(&["generate", "--model", "/no/such/model", "--prompt", "hi"], &["/no/such/model", "does not exist"]);
    fails_with(&["generate", "--prompt", ""], &["--prompt is empty"]);
    fails_with(&["generate", "--prompt-ids", ""], &["prompt is empty"]);
    fails_with(&["generate"], &["--prompt"]);
    fails_with(&["generate", "--prompt", &long], &["context is 512 tokens"]);
    fails_with(&["generate", "--prompt-ids", "1,x,3"], &["\"x\" is not a token id"]);
    fails_with(&["generate", "--prompt-ids", "1,700"], &["700", "vocabulary of 512"]);
    fails_with(&["generate", "--prompt", "hi", "--top-p", "0"], &["top_p"]);
    fails_with(&["generate", "--prompt", "hi", "--max-tokens", "0"], &["max_tokens"]);
    fails_with(&["generate", "--prompt", "hi", "--prompt-ids", "1"], &["cannot be used with"]);

    let tmp = default_model_copy();
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("LlamaForCausalLM", "FalconForCausalLM");
    std::fs::write(&cfg, text).unwrap();
    let dir = tmp.path().to_str().unwrap();
    fails_with(
        &["generate", "--model", dir, "--prompt", "hi"],
        &["config.json", "`architectures`", "FalconForCausalLM"],
    );
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    std::fs::write(&cfg, std::fs::read_to_string(repo().join("models/stories260K/config.json")).unwrap()).unwrap();
    fails_with(&["generate", "--model", dir, "--prompt", "hi"], &["tokenizer.json", "missing"]);
}
