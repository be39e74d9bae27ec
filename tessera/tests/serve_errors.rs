//! A corpus of malformed requests: each gets the right 4xx and an OpenAI-shaped error, and the server
//! keeps serving. Also the scheduler flags that cannot work, refused at start.

mod common;

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;

enum Body {
    Json(Value),
    Raw(Vec<u8>),
}

/// Name, method, path, body, expected status, expected `param`.
type Case = (&'static str, &'static str, &'static str, Body, u16, Option<&'static str>);

fn c(v: Value) -> Body {
    let mut v = v;
    if v.get("model").is_none() && !v.get("no_model").is_some_and(|x| x == true) {
        v["model"] = json!("stories260K");
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("no_model");
    }
    Body::Json(v)
}

#[test]
fn malformed_requests_get_the_right_4xx_and_the_server_keeps_serving() {
    let long_prompt: &'static str = Box::leak("once upon a time ".repeat(200).into_boxed_str());
    let cases: Vec<Case> = vec![
        ("not json", "POST", "/v1/completions", Body::Raw(b"{\"model\": ".to_vec()), 400, None),
        ("empty body", "POST", "/v1/completions", Body::Raw(vec![]), 400, None),
        ("json array", "POST", "/v1/completions", Body::Raw(b"[1, 2]".to_vec()), 400, None),
        ("json string", "POST", "/v1/completions", Body::Raw(b"\"hello\"".to_vec()), 400, None),
        (
            "invalid utf-8",
            "POST",
            "/v1/completions",
            Body::Raw(b"{\"model\": \"stories260K\", \"prompt\": \"\xff\xfe\"}".to_vec()),
            400,
            None,
        ),
        ("missing model", "POST", "/v1/completions", c(json!({"no_model": true, "prompt": "x"})), 400, Some("model")),
        ("missing prompt", "POST", "/v1/completions", c(json!({})), 400, Some("prompt")),
        ("model not a string", "POST", "/v1/completions", c(json!({"model": 123, "prompt": "x"})), 400, Some("model")),
        ("unknown model", "POST", "/v1/completions", c(json!({"model": "gpt-7", "prompt": "x"})), 404, Some("model")),
        ("prompt wrong type", "POST", "/v1/completions", c(json!({"prompt": true})), 400, Some("prompt")),
        ("prompt empty list", "POST", "/v1/completions", c(json!({"prompt": []})), 400, Some("prompt")),
        ("prompt token out of vocab", "POST", "/v1/completions", c(json!({"prompt": [1, 99999]})), 400, Some("prompt")),
        ("prompt negative token", "POST", "/v1/completions", c(json!({"prompt": [-1]})), 400, Some("prompt")),
        (
            "an empty prompt in a batch",
            "POST",
            "/v1/completions",
            c(json!({"prompt": [[1, 2], []]})),
            400,
            Some("prompt"),
        ),
        (
            "a batch of more than 128 completions",
            "POST",
            "/v1/completions",
            c(json!({"prompt": vec!["a"; 9], "n": 16})),
            400,
            Some("prompt"),
        ),
        (
            "max_tokens negative",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "max_tokens": -5})),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens zero",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "max_tokens": 0})),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens huge",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "max_tokens": 1_000_000_000})),
            400,
            Some("prompt"),
        ),
        (
            "max_tokens string",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "max_tokens": "10"})),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens float",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "max_tokens": 1.5})),
            400,
            Some("max_tokens"),
        ),
        (
            "temperature negative",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "temperature": -1})),
            400,
            Some("temperature"),
        ),
        (
            "temperature too high",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "temperature": 5})),
            400,
            Some("temperature"),
        ),
        ("top_p above 1", "POST", "/v1/completions", c(json!({"prompt": "x", "top_p": 1.5})), 400, Some("top_p")),
        ("top_k below -1", "POST", "/v1/completions", c(json!({"prompt": "x", "top_k": -5})), 400, Some("top_k")),
        ("n zero", "POST", "/v1/completions", c(json!({"prompt": "x", "n": 0})), 400, Some("n")),
        ("n huge", "POST", "/v1/completions", c(json!({"prompt": "x", "n": 1000})), 400, Some("n")),
        (
            "five stop strings",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})),
            400,
            Some("stop"),
        ),
        ("empty stop string", "POST", "/v1/completions", c(json!({"prompt": "x", "stop": ""})), 400, Some("stop")),
        (
            "logprobs too many",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "logprobs": 50})),
            400,
            Some("logprobs"),
        ),
        (
            "presence_penalty out of range",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "presence_penalty": 3})),
            400,
            Some("presence_penalty"),
        ),
        ("seed not a number", "POST", "/v1/completions", c(json!({"prompt": "x", "seed": "abc"})), 400, Some("seed")),
        (
            "unknown field",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "temprature": 0.5})),
            400,
            Some("temprature"),
        ),
        ("prompt over the context", "POST", "/v1/completions", c(json!({"prompt": long_prompt})), 400, Some("prompt")),
        (
            "stream_options without stream",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
        ),
        (
            "logit_bias key not a token id",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "logit_bias": {"a": 1}})),
            400,
            Some("logit_bias"),
        ),
        (
            "logit_bias over 100",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "logit_bias": {"5": 101}})),
            400,
            Some("logit_bias"),
        ),
        (
            "logit_bias not a number",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": "up"}})),
            400,
            Some("logit_bias"),
        ),
        (
            "logit_bias token outside the vocabulary",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "logit_bias": {"99999": 1}})),
            400,
            Some("logit_bias"),
        ),
        ("chat without messages", "POST", "/v1/chat/completions", c(json!({})), 400, Some("messages")),
        ("chat with empty messages", "POST", "/v1/chat/completions", c(json!({"messages": []})), 400, Some("messages")),
        (
            "chat message with a bad role",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            400,
            Some("messages.[0].role"),
        ),
        (
            "chat message without a role",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"content": "x"}]})),
            400,
            None,
        ),
        (
            "chat image content",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})),
            400,
            Some("messages.[0].content"),
        ),
        (
            "chat top_logprobs without logprobs",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3})),
            400,
            Some("top_logprobs"),
        ),
        (
            "chat response_format of an unknown type",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}})),
            400,
            Some("response_format.type"),
        ),
        (
            "chat json_schema without a name",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}})),
            400,
            Some("response_format.json_schema.name"),
        ),
        (
            "chat json_schema the compiler refuses",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "objekt"}}}})),
            400,
            Some("response_format"),
        ),
        (
            "completion regex that does not parse",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "structured_outputs": {"regex": "(unclosed"}})),
            400,
            Some("structured_outputs"),
        ),
        (
            "completion lark grammar with an undefined rule",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "structured_outputs": {"grammar": "start: nowhere"}})),
            400,
            Some("structured_outputs"),
        ),
        (
            "structured_outputs of two kinds",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}})),
            400,
            Some("structured_outputs"),
        ),
        (
            "structured_outputs of an unknown kind",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "structured_outputs": {"xml": "<a/>"}})),
            400,
            Some("structured_outputs.xml"),
        ),
        (
            "structured_outputs choice empty",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "structured_outputs": {"choice": []}})),
            400,
            Some("structured_outputs.choice"),
        ),
        (
            "response_format and structured_outputs together",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"},
                "structured_outputs": {"regex": "a"}})),
            400,
            Some("structured_outputs"),
        ),
        (
            "chat tools",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})),
            400,
            Some("tools.[0].function"),
        ),
        (
            "chat tool_choice without tools",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"})),
            400,
            Some("tool_choice"),
        ),
        (
            "chat tool_choice naming no tool",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}}})),
            400,
            Some("tool_choice.function.name"),
        ),
        (
            "chat auto tool choice on a model without a tool-call format",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}]})),
            400,
            Some("tool_choice"),
        ),
        (
            "chat: a user message without content",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user"}]})),
            400,
            Some("messages.[0].content"),
        ),
        (
            "chat: an unknown field in a message",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x", "mood": "happy"}]})),
            400,
            Some("messages.[0].mood"),
        ),
        (
            "chat: tool_calls on a user message",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})),
            400,
            Some("messages.[0].tool_calls"),
        ),
        (
            "chat: a tool message without tool_call_id",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "tool", "content": "42"}]})),
            400,
            Some("messages.[0].tool_call_id"),
        ),
        (
            "chat: tool call arguments that are not JSON",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]})),
            400,
            Some("messages.[1].tool_calls.[0].function.arguments"),
        ),
        (
            "chat: store of the wrong type",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "store": "yes"})),
            400,
            Some("store"),
        ),
        (
            "chat: audio output",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "alloy", "format": "wav"}})),
            400,
            Some("audio"),
        ),
        (
            "chat: an audio modality",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]})),
            400,
            Some("modalities"),
        ),
        (
            "chat: legacy functions",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]})),
            400,
            Some("functions"),
        ),
        (
            "chat: a field OpenAI does not define",
            "POST",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": "x"}], "temprature": 0.5})),
            400,
            Some("temprature"),
        ),
        (
            "prompt_logprobs negative",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "prompt_logprobs": -1})),
            400,
            Some("prompt_logprobs"),
        ),
        (
            "prompt_logprobs over 20",
            "POST",
            "/v1/completions",
            c(json!({"prompt": "x", "prompt_logprobs": 21})),
            400,
            Some("prompt_logprobs"),
        ),
        ("echo not a boolean", "POST", "/v1/completions", c(json!({"prompt": "x", "echo": "yes"})), 400, Some("echo")),
        ("tokenize: neither prompt nor messages", "POST", "/tokenize", c(json!({})), 400, None),
        (
            "tokenize: both prompt and messages",
            "POST",
            "/tokenize",
            c(json!({"prompt": "x", "messages": [{"role": "user", "content": "x"}]})),
            400,
            None,
        ),
        (
            "tokenize: unknown model",
            "POST",
            "/tokenize",
            c(json!({"model": "gpt-7", "prompt": "x"})),
            404,
            Some("model"),
        ),
        (
            "detokenize: a token out of the vocabulary",
            "POST",
            "/detokenize",
            c(json!({"tokens": [1, 99999]})),
            400,
            Some("tokens"),
        ),
        ("detokenize: a negative token", "POST", "/detokenize", c(json!({"tokens": [-3]})), 400, Some("tokens")),
        ("detokenize: tokens not a list", "POST", "/detokenize", c(json!({"tokens": "1 2"})), 400, Some("tokens")),
        (
            "10 MB body",
            "POST",
            "/v1/completions",
            Body::Raw(format!("{{\"model\": \"stories260K\", \"prompt\": \"{}\"}}", "a".repeat(10 << 20)).into_bytes()),
            413,
            None,
        ),
        ("GET on a POST route", "GET", "/v1/completions", Body::Raw(vec![]), 405, None),
        ("unknown route", "POST", "/v1/nope", c(json!({})), 404, None),
    ];
    assert!(cases.len() >= 30);
    let rt = rt();
    // Several of these requests end with the server closing the connection: no connection reuse.
    let client = HttpClient::unpooled();
    let s = Server::start(&[]);
    rt.block_on(async {
        for (name, method, path, body, status, param) in cases {
            let bytes = match body {
                Body::Json(v) => serde_json::to_vec(&v).unwrap(),
                Body::Raw(b) => b,
            };
            let r = client.send(method, &s.url(path), bytes).await.unwrap();
            assert_eq!(r.status.as_u16(), status, "{name}: {}", String::from_utf8_lossy(&r.body));
            let v = r.json().unwrap_or_else(|e| panic!("{name}: {e}"));
            let e = &v["error"];
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: {v}");
            assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{name}: {v}");
            if let Some(p) = param {
                assert_eq!(e["param"], p, "{name}: {v}");
            }
            // Still serving after every bad request.
            assert_eq!(complete(&client, &s, "Once upon a time", 3).await, ", there was");
        }
    });
}

#[test]
fn scheduler_flags_that_cannot_work_stop_the_server_at_start() {
    for (args, needle) in [
        (&["--max-num-seqs", "0"][..], "--max-num-seqs and --max-num-batched-tokens must be at least 1"),
        (
            &["--max-num-seqs", "128", "--max-num-batched-tokens", "64"][..],
            "--max-num-batched-tokens (64) must be at least --max-num-seqs (128)",
        ),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--port", "0"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
