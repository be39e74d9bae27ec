//! Tools in a chat request: `tools`, `tool_choice` and `parallel_tool_calls` checked as OpenAI checks them,
//! how the model's output becomes `tool_calls` ([`ToolOutput`]), and the calls as the response carries them,
//! whole or streamed.
//!
//! `auto` lets the model write calls in its own format, parsed by the format's parser (chosen by
//! `--tool-call-parser` or read from the chat template). `required` and a named function are enforced, as
//! vLLM enforces them, by constrained decoding: `required` generates a JSON array of `{"name", "parameters"}`
//! objects whose parameters validate against their function's schema, a named function generates its
//! arguments object alone, so the arguments always parse.

use serde_json::{Map, Value, json};

use super::error::ApiError;
use crate::{
    constrain::Spec,
    tool_calls::{self, Delta, Format, StreamParser},
};

/// OpenAI's limit on tools per request.
pub const MAX_TOOLS: usize = 128;

/// How a choice's output becomes tool calls.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolOutput {
    /// `auto`: calls in the model's own format, among text.
    Parse(Format),
    /// `required`: the output is a JSON array of calls.
    Required,
    /// A named function: the output is its arguments.
    Named(String),
}

/// A request's tools, checked: what the template gets, what the output is, and what constrains it.
pub struct Tools {
    /// As sent (OpenAI's shape), for the chat template.
    pub tools: Value,
    pub output: Option<ToolOutput>,
    pub constraint: Option<Spec>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::param(param, message)
}

/// Checks one tool; returns its name and parameters schema.
fn tool(i: usize, t: &Value) -> Result<(String, Value), ApiError> {
    let at = |field: &str| format!("tools.[{i}]{field}");
    let o = t.as_object().ok_or_else(|| bad(&at(""), "A tool must be an object."))?;
    if let Some(k) = o.keys().find(|k| !["type", "function"].contains(&k.as_str())) {
        return Err(bad(
            &at(&format!(".{k}")),
            format!("Unrecognized request argument supplied: {}", at(&format!(".{k}"))),
        ));
    }
    if o.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(&at(".type"), "Only tools of type \"function\" are supported."));
    }
    let f = o
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(&at(".function"), "Missing required parameter: 'function'."))?;
    for (k, v) in f {
        let ok = match k.as_str() {
            "name" | "description" => v.is_string(),
            "parameters" => v.is_object(),
            "strict" => v.is_boolean() || v.is_null(),
            _ => {
                return Err(bad(
                    &at(&format!(".function.{k}")),
                    format!("Unrecognized request argument supplied: {k}"),
                ));
            }
        };
        if !ok {
            return Err(bad(
                &at(&format!(".function.{k}")),
                format!("Invalid type for '{}'.", at(&format!(".function.{k}"))),
            ));
        }
    }
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(&at(".function.name"), "Missing required parameter: 'name'."))?;
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(bad(
            &at(".function.name"),
            format!("Invalid function name {name:?}: 1 to 64 letters, digits, underscores or dashes."),
        ));
    }
    let params = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    Ok((name.to_string(), params))
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`. `format` is the server's tool-call format (for
/// `auto`); `constrained` says the request already constrains its output (`response_format`).
pub fn read(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<bool>,
    format: Option<Format>,
    constrained: bool,
) -> Result<Option<Tools>, ApiError> {
    let tools = tools.filter(|t| !t.is_null());
    let choice = choice.filter(|c| !c.is_null());
    let Some(tools) = tools else {
        if choice.is_some() {
            return Err(bad(
                "tool_choice",
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            ));
        }
        if parallel.is_some() {
            return Err(bad(
                "parallel_tool_calls",
                "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' are specified.",
            ));
        }
        return Ok(None);
    };
    let list = tools.as_array().ok_or_else(|| bad("tools", "Invalid type for 'tools': expected an array."))?;
    if list.is_empty() || list.len() > MAX_TOOLS {
        return Err(bad("tools", format!("'tools' must hold 1 to {MAX_TOOLS} tools, got {}.", list.len())));
    }
    let defs: Vec<(String, Value)> = list.iter().enumerate().map(|(i, t)| tool(i, t)).collect::<Result<_, _>>()?;
    if let Some(dup) = defs.iter().enumerate().find(|(i, (n, _))| defs[..*i].iter().any(|(m, _)| m == n)) {
        return Err(bad(&format!("tools.[{}].function.name", dup.0), format!("Two tools are named {:?}.", dup.1.0)));
    }
    let output = match choice {
        None => auto(format)?,
        Some(Value::String(s)) => match s.as_str() {
            "none" => None,
            "auto" => auto(format)?,
            "required" => Some(ToolOutput::Required),
            other => {
                return Err(bad(
                    "tool_choice",
                    format!(
                        "Invalid value for 'tool_choice': {other:?}; expected 'none', 'auto', 'required' or a named function."
                    ),
                ));
            }
        },
        Some(Value::Object(o)) => Some(ToolOutput::Named(named(o, &defs)?)),
        Some(_) => return Err(bad("tool_choice", "Invalid type for 'tool_choice': expected a string or an object.")),
    };
    let constraint = match &output {
        Some(ToolOutput::Required) => Some(Spec::JsonSchema(compact(calls_schema(&defs, parallel.unwrap_or(true))))),
        Some(ToolOutput::Named(n)) => {
            defs.iter().find(|(m, _)| m == n).map(|(_, p)| Spec::JsonSchema(compact(p.clone())))
        }
        _ => None,
    };
    if constraint.is_some() && constrained {
        return Err(bad(
            "tool_choice",
            "A 'required' or named 'tool_choice' already decides the output's form: it cannot be combined with 'response_format'.",
        ));
    }
    Ok(Some(Tools { tools: tools.clone(), output, constraint }))
}

fn auto(format: Option<Format>) -> Result<Option<ToolOutput>, ApiError> {
    match format {
        Some(f) => Ok(Some(ToolOutput::Parse(f))),
        None => Err(bad(
            "tool_choice",
            "\"auto\" tool choice needs the model's tool-call format, and this model's chat template shows none \
             that this server knows: start it with --tool-call-parser, or use tool_choice \"required\" or a named \
             function.",
        )),
    }
}

fn named(o: &Map<String, Value>, defs: &[(String, Value)]) -> Result<String, ApiError> {
    if o.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("tool_choice.type", "A named 'tool_choice' must have type \"function\"."));
    }
    let name =
        o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
            bad("tool_choice.function.name", "Missing required parameter: 'tool_choice.function.name'.")
        })?;
    if !defs.iter().any(|(n, _)| n == name) {
        return Err(bad("tool_choice.function.name", format!("No tool named {name:?} is in 'tools'.")));
    }
    Ok(name.to_string())
}

/// What `required` generates: one call (or, with parallel calls, one or more) of the given tools, each
/// `{"name": ..., "parameters": {...}}` with parameters valid for its function.
fn calls_schema(defs: &[(String, Value)], parallel: bool) -> Value {
    let one: Vec<Value> = defs
        .iter()
        .map(|(name, params)| {
            json!({"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                   "required": ["name", "parameters"], "additionalProperties": false})
        })
        .collect();
    let mut s = json!({"type": "array", "items": {"anyOf": one}, "minItems": 1});
    if !parallel {
        s["maxItems"] = json!(1);
    }
    s
}

/// Forced calls are written as `json.dumps` writes JSON (`{"a": 1, "b": [2, 3]}`), as templates show calls
/// to the model: arguments are data for a program, where free whitespace is only tokens spent.
fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// A call as the response carries it.
pub fn call_json(id: String, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

/// The id of call `index` of choice `choice` of the response `response`: unique within a conversation, as
/// OpenAI's `call_...` ids are.
pub fn call_id(response: &str, choice: usize, index: usize) -> String {
    let tail = response.rsplit('-').next().unwrap_or(response);
    format!("call_{tail}{choice:02x}{index:02x}")
}

/// A whole choice's output as content and calls.
pub fn split(output: &ToolOutput, text: &str) -> (Option<String>, Vec<tool_calls::ToolCall>) {
    match output {
        ToolOutput::Parse(f) => {
            let p = tool_calls::parse(*f, text);
            (p.content, p.calls)
        }
        ToolOutput::Required => {
            let p = tool_calls::parse(Format::JsonArray, text);
            (p.content, p.calls)
        }
        ToolOutput::Named(name) => {
            // Cut short by max_tokens the arguments do not parse; they go out as generated.
            let arguments = serde_json::from_str::<Value>(text).map_or_else(|_| text.to_string(), |v| v.to_string());
            (None, vec![tool_calls::ToolCall { name: name.clone(), arguments }])
        }
    }
}

/// A streamed choice's tool-call state.
pub enum ToolStream {
    Parser(StreamParser),
    /// A named function: every piece of text is more of its arguments.
    Named {
        name: String,
        started: bool,
    },
}

impl ToolStream {
    pub fn new(output: &ToolOutput) -> Self {
        match output {
            ToolOutput::Parse(f) => ToolStream::Parser(StreamParser::new(*f)),
            ToolOutput::Required => ToolStream::Parser(StreamParser::new(Format::JsonArray)),
            ToolOutput::Named(name) => ToolStream::Named { name: name.clone(), started: false },
        }
    }

    /// The deltas for `text`, and with `last` whatever was held back.
    pub fn push(&mut self, text: &str, last: bool) -> Vec<Delta> {
        match self {
            ToolStream::Parser(p) => {
                let mut out = p.push(text);
                if last {
                    out.extend(p.finish());
                }
                out
            }
            ToolStream::Named { name, started } => {
                let mut out = Vec::new();
                if !std::mem::replace(started, true) {
                    out.push(Delta::CallStart { index: 0, name: name.clone() });
                }
                if !text.is_empty() {
                    out.push(Delta::Arguments { index: 0, fragment: text.to_string() });
                }
                out
            }
        }
    }

    /// Whether the choice ends with `tool_calls` (OpenAI answers `stop` for a named function).
    pub fn ends_with_calls(&self) -> bool {
        matches!(self, ToolStream::Parser(p) if p.saw_calls())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    fn param_of(e: ApiError) -> String {
        e.body_json()["error"]["param"].as_str().unwrap_or_default().to_string()
    }

    #[test]
    fn tool_choice_decides_the_output_and_its_constraint() {
        let tools = json!([weather()]);
        let r = read(Some(&tools), None, None, Some(Format::Hermes), false).unwrap().unwrap();
        assert_eq!(r.output, Some(ToolOutput::Parse(Format::Hermes)));
        assert!(r.constraint.is_none());
        let r = read(Some(&tools), Some(&json!("none")), None, None, false).unwrap().unwrap();
        assert_eq!(r.output, None);
        let r = read(Some(&tools), Some(&json!("required")), Some(false), None, false).unwrap().unwrap();
        let Some(Spec::JsonSchema(s)) = r.constraint else { panic!() };
        assert_eq!(s["maxItems"], 1);
        assert_eq!(s["items"]["anyOf"][0]["properties"]["name"]["const"], "get_weather");
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let r = read(Some(&tools), Some(&named), None, None, false).unwrap().unwrap();
        assert_eq!(r.output, Some(ToolOutput::Named("get_weather".into())));
        assert_eq!(r.constraint, Some(Spec::JsonSchema(compact(weather()["function"]["parameters"].clone()))));
    }

    #[test]
    fn bad_tools_and_choices_name_their_parameter() {
        let tools = json!([weather()]);
        let cases = [
            (None, Some(json!("auto")), None, "tool_choice"),
            (None, None, Some(true), "parallel_tool_calls"),
            (Some(json!({})), None, None, "tools"),
            (Some(json!([])), None, None, "tools"),
            (Some(json!([{"type": "function"}])), None, None, "tools.[0].function"),
            (Some(json!([{"type": "code"}])), None, None, "tools.[0].type"),
            (Some(json!([{"type": "function", "function": {"name": "a b"}}])), None, None, "tools.[0].function.name"),
            (
                Some(json!([{"type": "function", "function": {"name": "f", "parameters": 1}}])),
                None,
                None,
                "tools.[0].function.parameters",
            ),
            (
                Some(json!([{"type": "function", "function": {"name": "f", "mood": 1}}])),
                None,
                None,
                "tools.[0].function.mood",
            ),
            (Some(json!([weather(), weather()])), None, None, "tools.[1].function.name"),
            (Some(tools.clone()), Some(json!("sometimes")), None, "tool_choice"),
            (
                Some(tools.clone()),
                Some(json!({"type": "function", "function": {"name": "nope"}})),
                None,
                "tool_choice.function.name",
            ),
            (Some(tools.clone()), Some(json!(3)), None, "tool_choice"),
        ];
        for (t, c, p, param) in cases {
            let e =
                read(t.as_ref(), c.as_ref(), p, Some(Format::Hermes), false).err().unwrap_or_else(|| panic!("{param}"));
            assert_eq!(param_of(e), param);
        }
        // auto without a known format, and a forced call with a response_format.
        assert_eq!(param_of(read(Some(&tools), None, None, None, false).err().unwrap()), "tool_choice");
        assert_eq!(
            param_of(read(Some(&tools), Some(&json!("required")), None, None, true).err().unwrap()),
            "tool_choice"
        );
    }

    #[test]
    fn outputs_split_into_content_and_calls() {
        let (content, calls) = split(&ToolOutput::Named("f".into()), "{ \"a\" : 1 }");
        assert_eq!((content, calls[0].arguments.as_str()), (None, "{\"a\":1}"));
        let (content, calls) = split(&ToolOutput::Required, "[{\"name\": \"f\", \"parameters\": {\"a\": [1]}}]");
        assert_eq!((content, calls[0].name.as_str(), calls[0].arguments.as_str()), (None, "f", "{\"a\":[1]}"));
        let mut s = ToolStream::new(&ToolOutput::Named("f".into()));
        let d = s.push("{\"a\"", false);
        assert!(matches!(&d[0], Delta::CallStart { index: 0, name } if name == "f"));
        assert!(!s.ends_with_calls(), "a named function ends with stop, as OpenAI's");
        assert_eq!(call_id("chatcmpl-18ee7a1", 1, 2), "call_18ee7a10102");
    }
}
