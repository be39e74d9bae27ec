//! Request bodies of `/v1/completions` and `/v1/chat/completions`, and their validation into one
//! [`Options`] request. Every rejected value becomes a 400 naming the parameter, as OpenAI does;
//! unknown fields are rejected too (a misspelt parameter must not be silently ignored).

use serde::Deserialize;
use serde_json::Value;
use tessera_proto::step::SamplingParams;

use super::error::ApiError;

/// Most choices per request.
pub const MAX_N: i64 = 16;
/// Most stop sequences (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Most alternatives per position in logprobs.
pub const MAX_TOP_LOGPROBS: i64 = 20;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<i64>>),
}

/// Parameters both endpoints take.
#[derive(Deserialize, Debug, Default)]
pub struct Common {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    pub ignore_eos: Option<bool>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<i64>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    /// vLLM's: the prompt's own logprobs, with this many alternatives per token.
    pub prompt_logprobs: Option<i64>,
    /// Structured outputs, as vLLM takes them on completions too.
    pub response_format: Option<Value>,
    /// vLLM's structured outputs (`json`, `regex`, `choice`, `grammar`, `json_object`).
    pub structured_outputs: Option<Value>,
    // Flattened fields cannot be combined with deny_unknown_fields in serde, so they are listed again.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    pub ignore_eos: Option<bool>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A chat message, with the fields OpenAI defines for it; the template gets them as sent.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
    /// An assistant's calls, as OpenAI shapes them (`[{id, type: "function", function: {name, arguments}}]`).
    pub tool_calls: Option<Vec<Value>>,
    /// A tool message: which call it answers.
    pub tool_call_id: Option<String>,
    /// OpenAI's field for a refusal the assistant gave earlier in the conversation; not shown to the model.
    pub refusal: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub response_format: Option<Value>,
    /// vLLM's structured outputs (`json`, `regex`, `choice`, `grammar`, `json_object`).
    pub structured_outputs: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    pub ignore_eos: Option<bool>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    // OpenAI's fields that change nothing here: accepted (with their types checked) and ignored.
    pub metadata: Option<serde_json::Map<String, Value>>,
    pub store: Option<bool>,
    pub service_tier: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub safety_identifier: Option<String>,
    pub reasoning_effort: Option<String>,
    /// Predicted output only speeds up what OpenAI would write anyway.
    pub prediction: Option<Value>,
    /// Only `["text"]` can be served.
    pub modalities: Option<Vec<String>>,
    // OpenAI's fields asking for what this server cannot do: each refused by name.
    pub audio: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub web_search_options: Option<Value>,
}

/// A validated request, independent of the endpoint.
#[derive(Debug, Clone)]
pub struct Options {
    pub params: SamplingParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// `Some(k)`: report each token's logprob and `k` alternatives.
    pub logprobs: Option<usize>,
    /// Completions: the prompt goes before each choice's text (and its tokens before its logprobs).
    pub echo: bool,
    /// vLLM's `prompt_logprobs`: each prompt token's logprob, rank and `k` alternatives, in their own list.
    pub prompt_logprobs: Option<usize>,
    /// Chat with tools: how the output becomes `tool_calls`.
    pub tool_output: Option<super::tools::ToolOutput>,
}

/// Parses a JSON body into `T`, naming the offending field on failure.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::invalid(None, format!("The request body is not valid UTF-8: {e}.")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::invalid(None, format!("We could not parse the JSON body of your request: {e}.")))?;
    if !value.is_object() {
        return Err(ApiError::invalid(None, "The request body must be a JSON object."));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        // OpenAI writes paths as `messages.[0].content`.
        let path = e.path().to_string().replace('[', ".[");
        let inner = e.into_inner().to_string();
        let (param, msg) = if let Some(rest) = inner.strip_prefix("unknown field `") {
            let name = rest.split('`').next().unwrap_or_default().to_string();
            // The path ends with the unknown field itself.
            let name = if path == "." { name } else { path.clone() };
            (Some(name.clone()), format!("Unrecognized request argument supplied: {name}"))
        } else if let Some(rest) = inner.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or_default().to_string();
            (Some(name.clone()), format!("Missing required parameter: '{name}'."))
        } else if path == "." {
            (None, format!("Invalid request: {inner}."))
        } else {
            (Some(path.clone()), format!("Invalid value for '{path}': {inner}."))
        };
        ApiError::invalid(param, msg)
    })
}

fn range(param: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f32, ApiError> {
    match v {
        None => Ok(default as f32),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x as f32),
        Some(x) => Err(ApiError::param(
            param,
            format!("{x} is not a valid value for '{param}': expected a number in [{lo}, {hi}]."),
        )),
    }
}

/// Validates the parameters both endpoints share. `logprobs` was resolved by the caller.
pub fn options(c: Common, logprobs: Option<usize>) -> Result<Options, ApiError> {
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::param("n", format!("{n} is not a valid value for 'n': expected 1 to {MAX_N}.")));
    }
    let temperature = range("temperature", c.temperature, 0.0, 2.0, 1.0)?;
    // top_p = 0 asks for the single most likely token: the smallest positive nucleus does exactly that.
    let top_p = range("top_p", c.top_p, 0.0, 1.0, 1.0)?.max(f32::MIN_POSITIVE);
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::param(
                "top_k",
                format!("{k} is not a valid value for 'top_k': expected -1, 0 or a positive integer."),
            ));
        }
    };
    let params = SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p: range("min_p", c.min_p, 0.0, 1.0, 0.0)?,
        repetition_penalty: match c.repetition_penalty {
            None => 1.0,
            Some(x) if x.is_finite() && x > 0.0 && x <= 10.0 => x as f32,
            Some(x) => {
                return Err(ApiError::param(
                    "repetition_penalty",
                    format!("{x} is not a valid value for 'repetition_penalty': expected a number in (0, 10]."),
                ));
            }
        },
        presence_penalty: range("presence_penalty", c.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, 0.0)?,
        seed: c.seed.map(|s| s as u64),
        logprobs: logprobs.is_some(),
        top_logprobs: logprobs.unwrap_or(0),
        logit_bias: logit_bias(c.logit_bias)?,
        prompt_logprobs: None,
    };
    let stop = match c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::param(
            "stop",
            format!("At most {MAX_STOP} stop sequences are allowed, got {}.", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "Stop sequences must not be empty."));
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::param(
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ));
    }
    Ok(Options {
        params,
        n: n as usize,
        stream,
        include_usage: c.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        stop,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        logprobs,
        echo: false,
        prompt_logprobs: None,
        tool_output: None,
    })
}

/// OpenAI's `logit_bias`: token ids (as JSON object keys) to a bias in [-100, 100]. Whether the ids are in
/// the vocabulary is for the caller to check, which knows the model.
fn logit_bias(m: Option<serde_json::Map<String, Value>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut out = Vec::new();
    for (k, v) in m.unwrap_or_default() {
        let Ok(token) = k.parse::<u32>() else {
            return Err(ApiError::param(
                "logit_bias",
                format!("Invalid key in 'logit_bias': {k:?} is not a token id."),
            ));
        };
        match v.as_f64() {
            Some(b) if (-100.0..=100.0).contains(&b) => out.push((token, b as f32)),
            _ => {
                return Err(ApiError::param(
                    "logit_bias",
                    format!("Invalid value in 'logit_bias' for token {token}: {v}, expected a number in [-100, 100]."),
                ));
            }
        }
    }
    Ok(out)
}

/// `max_tokens` (or `max_completion_tokens`) as a positive count, if given.
pub fn max_tokens(param: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(m) if m >= 1 => Ok(Some(m as usize)),
        Some(m) => Err(ApiError::param(
            param,
            format!("{m} is not a valid value for '{param}': expected an integer of at least 1."),
        )),
    }
}

/// Both request types list the shared parameters (serde cannot flatten them under `deny_unknown_fields`);
/// this moves them into one [`Common`].
macro_rules! take_common {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn common(&mut self) -> Common {
                Common {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    n: self.n,
                    stream: self.stream,
                    stream_options: self.stream_options.take(),
                    stop: self.stop.take(),
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    seed: self.seed,
                    user: self.user.take(),
                    ignore_eos: self.ignore_eos,
                    logit_bias: self.logit_bias.take(),
                }
            }
        }
    )*};
}

take_common!(CompletionRequest, ChatRequest);
