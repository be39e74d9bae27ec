//! Structured outputs in a request: OpenAI's `response_format` (`text`, `json_object`, `json_schema`) and
//! vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`), read into one
//! [`Spec`] and compiled against the model's vocabulary. Every bad value is a 400 naming the parameter, as
//! is a schema or grammar the compiler refuses.

use serde_json::{Map, Value};

use super::{error::ApiError, state::AppState};
use crate::constrain::{Constraint, MAX_CHOICES, MAX_SPEC_BYTES, Spec};

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn object<'a>(param: &str, v: &'a Value) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object().ok_or_else(|| {
        ApiError::param(param, format!("Invalid type for '{param}': expected an object, but got {}.", kind(v)))
    })
}

fn bounded_text<'a>(param: &str, v: &'a Value) -> Result<&'a str, ApiError> {
    let s = v.as_str().ok_or_else(|| {
        ApiError::param(param, format!("Invalid type for '{param}': expected a string, but got {}.", kind(v)))
    })?;
    if s.len() > MAX_SPEC_BYTES {
        return Err(ApiError::param(
            param,
            format!("'{param}' is {} bytes; at most {MAX_SPEC_BYTES} are allowed.", s.len()),
        ));
    }
    Ok(s)
}

/// A schema as sent (an object, or for vLLM's `json` also a string holding one), bounded in size.
fn schema(param: &str, v: &Value) -> Result<Value, ApiError> {
    let schema = match v {
        Value::String(_) => serde_json::from_str(bounded_text(param, v)?)
            .map_err(|e| ApiError::param(param, format!("'{param}' is not a JSON schema: {e}.")))?,
        v => v.clone(),
    };
    if !schema.is_object() && !schema.is_boolean() {
        return Err(ApiError::param(
            param,
            format!("Invalid type for '{param}': expected a JSON schema object, but got {}.", kind(&schema)),
        ));
    }
    let size = serde_json::to_vec(&schema).map_or(usize::MAX, |b| b.len());
    if size > MAX_SPEC_BYTES {
        return Err(ApiError::param(
            param,
            format!("'{param}' is {size} bytes; at most {MAX_SPEC_BYTES} are allowed."),
        ));
    }
    Ok(schema)
}

/// OpenAI's `response_format`: `None` for text.
pub fn response_format(v: &Value) -> Result<Option<Spec>, ApiError> {
    let o = object("response_format", v)?;
    if let Some(k) = o.keys().find(|k| !["type", "json_schema"].contains(&k.as_str())) {
        return Err(ApiError::param(
            &format!("response_format.{k}"),
            format!("Unrecognized request argument supplied: response_format.{k}"),
        ));
    }
    let ty = o.get("type").ok_or_else(|| {
        ApiError::param("response_format.type", "Missing required parameter: 'response_format.type'.")
    })?;
    match ty.as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Spec::JsonSchema(serde_json::json!({"type": "object"})))),
        Some("json_schema") => {
            let js = o.get("json_schema").ok_or_else(|| {
                ApiError::param(
                    "response_format.json_schema",
                    "Missing required parameter: 'response_format.json_schema'.",
                )
            })?;
            let js = object("response_format.json_schema", js)?;
            for (k, v) in js {
                let param = format!("response_format.json_schema.{k}");
                match (k.as_str(), v) {
                    ("name", Value::String(n)) => {
                        // OpenAI's rule for the name.
                        if n.is_empty()
                            || n.len() > 64
                            || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                        {
                            return Err(ApiError::param(
                                &param,
                                format!(
                                    "Invalid '{param}': {n:?}; it must be 1 to 64 letters, digits, underscores or dashes."
                                ),
                            ));
                        }
                    }
                    ("description", Value::String(_)) | ("strict", Value::Bool(_) | Value::Null) | ("schema", _) => {}
                    ("name" | "description" | "strict", v) => {
                        return Err(ApiError::param(&param, format!("Invalid type for '{param}': got {}.", kind(v))));
                    }
                    _ => {
                        return Err(ApiError::param(
                            &param,
                            format!("Unrecognized request argument supplied: {param}"),
                        ));
                    }
                }
            }
            if !js.contains_key("name") {
                return Err(ApiError::param(
                    "response_format.json_schema.name",
                    "Missing required parameter: 'response_format.json_schema.name'.",
                ));
            }
            // Without a schema any JSON value will do, as OpenAI treats it.
            let s = match js.get("schema") {
                Some(s) => schema("response_format.json_schema.schema", s)?,
                None => Value::Bool(true),
            };
            Ok(Some(Spec::JsonSchema(s)))
        }
        _ => Err(ApiError::param(
            "response_format.type",
            format!(
                "Invalid value for 'response_format.type': {ty}; supported values are 'text', 'json_object' and 'json_schema'."
            ),
        )),
    }
}

/// vLLM's `structured_outputs`: exactly one of its constraints.
pub fn structured_outputs(v: &Value) -> Result<Option<Spec>, ApiError> {
    let o = object("structured_outputs", v)?;
    let mut found: Vec<(&str, Spec)> = Vec::new();
    for (k, v) in o {
        let param = format!("structured_outputs.{k}");
        if v.is_null() {
            continue;
        }
        let spec = match k.as_str() {
            "json" => Spec::JsonSchema(schema(&param, v)?),
            "regex" => Spec::Regex(bounded_text(&param, v)?.to_string()),
            "grammar" => {
                let g = bounded_text(&param, v)?;
                // llama.cpp's GBNF (xgrammar's EBNF) writes rules as `name ::= ...`; the compiler reads Lark.
                if g.contains("::=") {
                    return Err(ApiError::param(
                        &param,
                        "GBNF grammars (`rule ::= ...`) are not supported: write the grammar in Lark syntax \
                         (`start: rule`, `rule: \"a\" | /[0-9]+/`).",
                    ));
                }
                Spec::Grammar(g.to_string())
            }
            "choice" => {
                let items = v.as_array().ok_or_else(|| {
                    ApiError::param(
                        &param,
                        format!("Invalid type for '{param}': expected an array of strings, but got {}.", kind(v)),
                    )
                })?;
                if items.is_empty() || items.len() > MAX_CHOICES {
                    return Err(ApiError::param(
                        &param,
                        format!("'{param}' must list 1 to {MAX_CHOICES} strings, got {}.", items.len()),
                    ));
                }
                let choices =
                    items.iter().map(|c| bounded_text(&param, c).map(str::to_string)).collect::<Result<Vec<_>, _>>()?;
                if choices.iter().map(String::len).sum::<usize>() > MAX_SPEC_BYTES {
                    return Err(ApiError::param(&param, format!("'{param}' holds more than {MAX_SPEC_BYTES} bytes.")));
                }
                Spec::Choice(choices)
            }
            "json_object" => match v {
                Value::Bool(true) => Spec::JsonSchema(serde_json::json!({"type": "object"})),
                Value::Bool(false) => continue,
                v => {
                    return Err(ApiError::param(
                        &param,
                        format!("Invalid type for '{param}': expected a boolean, but got {}.", kind(v)),
                    ));
                }
            },
            _ => {
                return Err(ApiError::param(
                    &param,
                    format!(
                        "Unrecognized request argument supplied: {param}; supported are json, regex, choice, grammar and json_object."
                    ),
                ));
            }
        };
        found.push((k, spec));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(_, s)| s)),
        _ => {
            let names: Vec<&str> = found.iter().map(|(k, _)| *k).collect();
            Err(ApiError::param(
                "structured_outputs",
                format!("Only one kind of structured output may be asked for, got {}.", names.join(", ")),
            ))
        }
    }
}

/// The constraint a request asks for through either parameter (both at once is a 400), compiled.
pub fn constraint(
    s: &AppState,
    format: Option<&Value>,
    structured: Option<&Value>,
) -> Result<Option<Constraint>, ApiError> {
    let from_format = format.filter(|v| !v.is_null()).map(response_format).transpose()?.flatten();
    let from_vllm = structured.filter(|v| !v.is_null()).map(structured_outputs).transpose()?.flatten();
    let (param, spec) = match (from_format, from_vllm) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ApiError::param(
                "structured_outputs",
                "Use either 'response_format' or 'structured_outputs', not both.",
            ));
        }
        (Some(spec), None) => ("response_format", spec),
        (None, Some(spec)) => ("structured_outputs", spec),
    };
    compile(s, param, &spec).map(Some)
}

/// Compiles `spec` for the served model; a refusal names `param`.
pub fn compile(s: &AppState, param: &str, spec: &Spec) -> Result<Constraint, ApiError> {
    let grammars = s
        .grammars()
        .map_err(|e| ApiError::param(param, format!("Structured outputs are not available for this model: {e}.")))?;
    grammars.compile(spec).map_err(|e| ApiError::param(param, format!("Invalid '{param}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn param_of(r: Result<Option<Spec>, ApiError>) -> String {
        r.unwrap_err().body_json()["error"]["param"].as_str().unwrap_or_default().to_string()
    }

    #[test]
    fn response_formats_read_as_openai_defines_them() {
        assert_eq!(response_format(&json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            response_format(&json!({"type": "json_object"})).unwrap(),
            Some(Spec::JsonSchema(json!({"type": "object"})))
        );
        let s = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let f = json!({"type": "json_schema", "json_schema": {"name": "a_1", "schema": s, "strict": true}});
        assert_eq!(response_format(&f).unwrap(), Some(Spec::JsonSchema(s)));
        for (bad, param) in [
            (json!("json"), "response_format"),
            (json!({"type": "xml"}), "response_format.type"),
            (json!({}), "response_format.type"),
            (json!({"type": "json_schema"}), "response_format.json_schema"),
            (json!({"type": "json_schema", "json_schema": {"schema": {}}}), "response_format.json_schema.name"),
            (json!({"type": "json_schema", "json_schema": {"name": "has space"}}), "response_format.json_schema.name"),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": 3}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}),
                "response_format.json_schema.strict",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a", "mood": 1}}),
                "response_format.json_schema.mood",
            ),
            (json!({"type": "json_object", "extra": 1}), "response_format.extra"),
        ] {
            assert_eq!(param_of(response_format(&bad)), param, "{bad}");
        }
    }

    #[test]
    fn structured_outputs_take_exactly_one_constraint() {
        assert_eq!(structured_outputs(&json!({"regex": "a+"})).unwrap(), Some(Spec::Regex("a+".into())));
        assert_eq!(
            structured_outputs(&json!({"choice": ["x", "y"]})).unwrap(),
            Some(Spec::Choice(vec!["x".into(), "y".into()]))
        );
        assert_eq!(
            structured_outputs(&json!({"json": "{\"type\": \"string\"}"})).unwrap(),
            Some(Spec::JsonSchema(json!({"type": "string"})))
        );
        assert_eq!(
            structured_outputs(&json!({"json_object": true})).unwrap(),
            Some(Spec::JsonSchema(json!({"type": "object"})))
        );
        assert_eq!(
            structured_outputs(&json!({"grammar": "start: \"a\""})).unwrap(),
            Some(Spec::Grammar("start: \"a\"".into()))
        );
        assert_eq!(structured_outputs(&json!({})).unwrap(), None);
        for (bad, param) in [
            (json!({"regex": "a", "choice": ["a"]}), "structured_outputs"),
            (json!({"choice": []}), "structured_outputs.choice"),
            (json!({"choice": ["a", 1]}), "structured_outputs.choice"),
            (json!({"regex": 5}), "structured_outputs.regex"),
            (json!({"grammar": "root ::= \"a\""}), "structured_outputs.grammar"),
            (json!({"json": "{not json"}), "structured_outputs.json"),
            (json!({"json_object": "yes"}), "structured_outputs.json_object"),
            (json!({"xml": "<a/>"}), "structured_outputs.xml"),
            (json!({"regex": "a".repeat(MAX_SPEC_BYTES + 1)}), "structured_outputs.regex"),
            (json!([1]), "structured_outputs"),
        ] {
            assert_eq!(param_of(structured_outputs(&bad)), param, "{bad}");
        }
    }
}
