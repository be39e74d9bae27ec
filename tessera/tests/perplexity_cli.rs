//! `tessera perplexity` as a user runs it, against the perplexity `transformers` gives the default model on
//! the same text by llama-perplexity's procedure (testdata/perplexity/golden.json, made by
//! scripts/make_perplexity_golden.py): in process and on a tensor-parallel pair, with llama.cpp's output
//! lines, and a clear error for every input that cannot work.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text() -> String {
    repo().join("testdata/perplexity/tinystories.txt").to_string_lossy().into_owned()
}

/// (success, stdout, stderr)
fn tessera(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tessera")).arg("perplexity").args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "tessera panicked: {stderr}");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), stderr)
}

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-4 * want.abs(), "{what}: {got} against transformers' {want}");
}

#[test]
fn perplexity_matches_transformers_in_process_and_on_a_tensor_parallel_pair() {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("testdata/perplexity/golden.json")).unwrap())
            .unwrap();
    for (run, tp) in golden["runs"].as_array().unwrap().iter().zip(["1", "2"]) {
        let ctx = run["context"].to_string();
        let (ok, out, err) = tessera(&["--file", &text(), "--context", &ctx, "--tp", tp, "--json"]);
        assert!(ok, "{err}");
        let r: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(r["tokens"], golden["tokens"], "the text tokenized as transformers tokenizes it");
        assert_eq!((&r["chunks"], &r["scored_tokens"]), (&run["chunks"], &run["scored_tokens"]));
        close(r["ppl"].as_f64().unwrap(), run["ppl"].as_f64().unwrap(), "ppl");
        close(r["ppl_error"].as_f64().unwrap(), run["ppl_error"].as_f64().unwrap(), "ppl error");
        let got = r["running_ppl"].as_array().unwrap();
        let want = run["running_ppl"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            close(g.as_f64().unwrap(), w.as_f64().unwrap(), &format!("after chunk {}", k + 1));
        }
    }
}

#[test]
fn output_is_llama_cpps_and_chunks_limits_the_run() {
    let (ok, out, err) = tessera(&["--file", &text(), "--context", "64", "--chunks", "3"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let running: Vec<&str> = lines[0].trim_end_matches(',').split(',').collect();
    assert_eq!(running.len(), 3, "{out}");
    for (k, r) in running.iter().enumerate() {
        assert!(r.starts_with(&format!("[{}]", k + 1)), "{r}");
    }
    assert!(lines[1].starts_with("Final estimate: PPL = "), "{out}");
    assert!(lines[1].contains(" +/- "), "{out}");
}

#[test]
fn inputs_that_cannot_work_get_a_clear_error() {
    let short = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(short.path(), "Once upon a time there was a cat.").unwrap();
    let not_text = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_text.path(), [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let text = text();
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--file", "/no/such/file.txt"], "/no/such/file.txt"),
        (vec!["--file", short.path().to_str().unwrap(), "--context", "64"], "needs at least 128"),
        (vec!["--file", &text, "--context", "512"], "at most 511"),
        (vec!["--file", &text, "--context", "2"], "at least 4"),
        (vec!["--file", not_text.path().to_str().unwrap()], "not UTF-8"),
    ];
    for (args, needle) in cases {
        let (ok, out, err) = tessera(&args);
        assert!(!ok, "{args:?} should fail; stdout {out}");
        assert!(err.contains(needle), "{args:?}: {err:?} should say {needle:?}");
    }
}

/// On quantized GGUF files, `tessera perplexity` is within 1% of what llama.cpp computes on the same file
/// and the same tokens (testdata/gguf-quant/reference.json, made by scripts/make_quant_fixtures.py; measured:
/// within 0.7%). llama.cpp's own tokenizer splits this converted vocabulary differently (759 tokens, not
/// 754), so its reference is taken on the Hugging Face tokenizer's ids, which are ours.
#[test]
fn perplexity_on_quantized_files_is_within_one_percent_of_llama_cpp() {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("testdata/gguf-quant/reference.json")).unwrap())
            .unwrap();
    for (name, file) in reference["files"].as_object().unwrap() {
        let path = match file["path"].as_str() {
            Some(p) => repo().join(p),
            None => repo().join("testdata/gguf-quant").join(name),
        };
        for run in file["perplexity"].as_array().unwrap() {
            let ctx = run["context"].to_string();
            let (ok, out, err) =
                tessera(&["--model", path.to_str().unwrap(), "--file", &text(), "--context", &ctx, "--json"]);
            assert!(ok, "{name}: {err}");
            let r: Value = serde_json::from_str(out.trim()).unwrap();
            assert_eq!(r["tokens"], file["text_tokens"], "{name}: the text's tokens");
            let (got, want) = (r["ppl"].as_f64().unwrap(), run["ppl"].as_f64().unwrap());
            println!(
                "{name} context {ctx}: {got:.6} against llama.cpp's {want:.6} ({:+.3}%)",
                100.0 * (got / want - 1.0)
            );
            assert!((got / want - 1.0).abs() < 0.01, "{name} context {ctx}: {got} against llama.cpp's {want}");
        }
    }
}
