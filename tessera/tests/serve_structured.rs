//! Structured outputs end to end: `tessera/tests/python/structured_outputs.py` sends 100 JSON schemas
//! (`response_format`), regexes and choices (vLLM's `structured_outputs`) through the official OpenAI client,
//! streamed and not, on both endpoints, to a random model in one process and over two workers, and
//! validates every answer with `jsonschema`. Bad values of the new parameters are in `serve_errors.rs`.

mod common;

use std::process::Command;

use common::*;

fn run_script(python: &str, s: &Server) {
    let script = repo().join("tessera/tests/python/structured_outputs.py");
    let out = Command::new(python).arg(&script).args([&s.base, "tiny-llama3"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("116 of 116 structured outputs held"), "{stdout}");
}

#[test]
fn every_schema_regex_and_choice_holds_streamed_and_not_in_one_process_and_over_two_workers() {
    let Some(python) = python_with("openai, jsonschema", "openai jsonschema") else { return };
    let model = repo().join("testdata/models/tiny-llama3");
    let model = model.to_str().unwrap();
    let one = Server::start(&["--model", model]);
    run_script(&python, &one);
    drop(one);
    let two = Server::start(&["--model", model, "--tp", "2"]);
    run_script(&python, &two);
}
