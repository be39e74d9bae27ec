//! Chat templates from `tokenizer_config.json`, rendered with minijinja the way Hugging Face's
//! `apply_chat_template(..., add_generation_prompt=True)` renders them: `messages`, `bos_token`,
//! `eos_token`, `add_generation_prompt`, a `raise_exception` function, and Python string methods
//! (`.strip()`, `.startswith()` …) through minijinja-contrib's pycompat layer, `tools` when the request has
//! them, and a `tojson` that writes what Python's `json.dumps` writes (`", "` and `": "` separators, key
//! order kept, non-ASCII as is, `indent`), as the tool-calling templates expect.

use minijinja::{Environment, ErrorKind, Value, context, value::Kwargs};
use serde::Serialize;

use super::error::ApiError;

/// A message as Hugging Face's `apply_chat_template` hands it to the template: the fields a client sent,
/// and no others (a template tests `message.tool_calls is defined`).
#[derive(Serialize, Debug, Clone, PartialEq, Default)]
pub struct ChatMessage {
    pub role: String,
    /// `None` (the template sees `none`) only for an assistant message that calls tools instead.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of `role` with text `content`.
    pub fn text(role: &str, content: &str) -> Self {
        ChatMessage { role: role.into(), content: Some(content.into()), ..Default::default() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The template's text (the tool-call format is read from it).
    source: String,
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, as Hugging Face's
/// template environment defines `tojson` (minijinja's own writes compact JSON and escapes HTML characters).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut v = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort_keys == Some(true) {
        sort(&mut v);
    }
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser =
                serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(&pad));
            serde::Serialize::serialize(&v, &mut ser)
        }
        None => serde::Serialize::serialize(&v, &mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter)),
    };
    written.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(String::from_utf8(out).expect("serde_json writes UTF-8")))
}

fn sort(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.sort_keys();
            o.values_mut().for_each(sort);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(sort),
        _ => {}
    }
}

/// `json.dumps`' default separators: `", "` between items, `": "` after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

const NAME: &str = "chat";

/// Template instructions one render may run. The templates models ship take a few thousand per message,
/// so a long conversation stays far below; a template that loops without end (or for 10^10 rounds) is
/// stopped within a second or so instead of holding a runtime thread and the CPU for minutes.
pub const FUEL: u64 = 20_000_000;

/// Most bytes a render may write: a prompt far past any model's context in tokens (a token is a few bytes
/// of text), yet small next to the machine.
pub const MAX_OUTPUT: usize = 16 << 20;

impl ChatTemplate {
    /// The template in `tokenizer_config.json` (a string, or a list of named templates of which `default`
    /// is used), or `None` if the model has none.
    pub fn from_config(
        config: &serde_json::Value,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .ok_or("tokenizer_config.json: `chat_template` is a list without a \"default\" template")?,
            Some(other) => {
                return Err(format!("tokenizer_config.json: `chat_template` must be a string, found {other}"));
            }
        };
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Hugging Face renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| format!("tokenizer_config.json: `chat_template` does not compile: {e}"))?;
        Ok(Some(ChatTemplate {
            env,
            bos: bos.unwrap_or_default().to_string(),
            eos: eos.unwrap_or_default().to_string(),
            source,
        }))
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the prompt for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ApiError> {
        self.render_with_tools(messages, None)
    }

    /// [`ChatTemplate::render`] with the request's `tools` (OpenAI's shape, `[{type: "function", function:
    /// {...}}]`), which Hugging Face passes to the template as given; without them the template sees none.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String, ApiError> {
        let t = self.env.get_template(NAME).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut out = Capped { text: Vec::new(), overflowed: false };
        let ctx = context! {
            messages => messages,
            tools => tools,
            bos_token => self.bos,
            eos_token => self.eos,
            add_generation_prompt => true,
        };
        let rendered = t.render_captured_to(ctx, &mut out).map(drop);
        if out.overflowed {
            return Err(ApiError::param(
                "messages",
                format!("the model's chat template wrote more than {MAX_OUTPUT} bytes for these messages"),
            ));
        }
        rendered.map_err(|e| {
            // raise_exception is the template telling the client its conversation is not acceptable.
            if e.kind() == ErrorKind::InvalidOperation {
                ApiError::param("messages", e.detail().unwrap_or("the chat template rejected the messages").to_string())
            } else if e.kind() == ErrorKind::OutOfFuel {
                ApiError::param(
                    "messages",
                    format!("the model's chat template ran more than {FUEL} instructions on these messages"),
                )
            } else {
                ApiError::internal(format!("rendering the chat template failed: {e}"))
            }
        })?;
        String::from_utf8(out.text).map_err(|_| ApiError::internal("the chat template wrote text that is not UTF-8"))
    }
}

/// Where a render writes: refuses to grow past [`MAX_OUTPUT`], so a template cannot fill memory with
/// output its fuel would allow (one instruction can write a hundred megabytes).
struct Capped {
    text: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > MAX_OUTPUT {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered prompt is too large"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tpl(src: &str) -> ChatTemplate {
        ChatTemplate::from_config(&serde_json::json!({ "chat_template": src }), Some("<s>"), Some("</s>"))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_template_that_writes_too_much_is_stopped_with_a_400() {
        // 100 MB per instruction is within minijinja's own limit, and a few instructions within the fuel.
        let t = tpl("{% for i in range(10) %}{{ 'x' * 10000000 }}{% endfor %}");
        let e = t.render(&[ChatMessage::text("user", "hi")]).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("chat template wrote more than"), "{}", e.message);
        // Just under the cap is rendered in full.
        let t = tpl("{{ 'x' * 16777000 }}");
        assert_eq!(t.render(&[]).unwrap().len(), 16_777_000);
    }

    #[test]
    fn a_template_that_runs_too_long_is_stopped_with_a_400() {
        let t = tpl("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}hi");
        let started = std::time::Instant::now();
        let e = t.render(&[ChatMessage::text("user", "hi")]).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("chat template ran more than"), "{}", e.message);
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "stopped in {:?}", started.elapsed());
    }

    #[test]
    fn renders_like_transformers_for_the_tiny_llama3_template() {
        // The golden case of testdata/models/tiny-llama3: transformers' rendering of this template.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../testdata/models/tiny-llama3/tokenizer_config.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let t = ChatTemplate::from_config(&cfg, Some("<s>"), Some("</s>")).unwrap().unwrap();
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../testdata/models/tiny-llama3/golden.json"
            ))
            .unwrap(),
        )
        .unwrap();
        for case in golden["chat_cases"].as_array().unwrap() {
            let msgs: Vec<ChatMessage> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| ChatMessage::text(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            assert_eq!(t.render(&msgs).unwrap(), case["prompt_text"].as_str().unwrap());
        }
    }

    #[test]
    fn conversations_with_tools_render_as_transformers_renders_them() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/tools");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        let t = tpl(&std::fs::read_to_string(dir.join(golden["template"].as_str().unwrap())).unwrap());
        for case in golden["cases"].as_array().unwrap() {
            // As the API reads a request's messages (each call's arguments parsed into an object).
            let messages: Vec<super::super::request::Message> =
                serde_json::from_value(case["messages"].clone()).unwrap();
            let msgs = super::super::chat::messages(&messages).unwrap();
            let tools = Some(&case["tools"]).filter(|t| !t.is_null());
            let name = case["name"].as_str().unwrap();
            assert_eq!(t.render_with_tools(&msgs, tools).unwrap(), case["rendered"].as_str().unwrap(), "{name}");
        }
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = tpl(
            "{{ messages[0] | tojson }}|{{ {'b': [1, 2], 'a': '<é>'} | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}",
        );
        assert_eq!(
            t.render(&[ChatMessage::text("user", "hi \"x\"")]).unwrap(),
            "{\"role\": \"user\", \"content\": \"hi \\\"x\\\"\"}|{\n  \"b\": [\n    1,\n    2\n  ],\n  \"a\": \"<é>\"\n}|{\"a\": 2, \"b\": 1}"
        );
    }

    #[test]
    fn raise_exception_is_a_400_and_python_methods_work() {
        let t = tpl(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with the user') }}{% endif %}{{ messages[0]['content'].strip() | upper }}",
        );
        let e = t.render(&[ChatMessage::text("assistant", "x")]).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.message, "Conversation must start with the user");
        assert_eq!(t.render(&[ChatMessage::text("user", "  hi ")]).unwrap(), "HI");
        assert!(ChatTemplate::from_config(&serde_json::json!({}), None, None).unwrap().is_none());
        assert!(ChatTemplate::from_config(&serde_json::json!({"chat_template": "{% if %}"}), None, None).is_err());
    }
}
