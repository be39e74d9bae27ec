//! Tool calling end to end: `tessera/tests/python/tool_calls.py` drives a random model served with the
//! `<tool_call>` template of testdata/tools through the official OpenAI client: `required` and named
//! functions (constrained, so the arguments validate against their schema), `auto` (the model's own format,
//! parsed), and a conversation carrying earlier calls, streamed and not. The template's rendering of tools
//! is checked against transformers in the chat template's unit tests; the parsers in `tool_calls`.

mod common;

use std::process::Command;

use common::*;

#[test]
fn forced_and_parsed_tool_calls_reach_the_openai_client_streamed_and_not() {
    let Some(python) = python_with("openai, jsonschema", "openai jsonschema") else { return };
    let model = repo().join("testdata/models/tiny-llama3");
    let template = repo().join("testdata/tools/hermes_template.jinja");
    let s = Server::start(&["--model", model.to_str().unwrap(), "--chat-template", template.to_str().unwrap()]);
    let script = repo().join("tessera/tests/python/tool_calls.py");
    let out = Command::new(&python).arg(&script).args([&s.base, "tiny-llama3"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("0 tool-call failures"), "{stdout}");
}
