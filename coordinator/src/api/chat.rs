//! `POST /v1/chat/completions`: the request's own checks (text messages with known roles, `logprobs` and
//! `top_logprobs`, structured outputs, tools), the conversation rendered through the model's chat template
//! (with the tools) and tokenized, then the shared run.

use std::sync::Arc;

use axum::{
    Extension,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    response::{IntoResponse, Response},
};
use serde_json::Value;

use super::{
    admission::{body, check_model},
    auth::{self, Caller},
    chat_template::ChatMessage,
    error::ApiError,
    generate::{Job, run},
    offload,
    reply::Kind,
    request::{self, ChatRequest, Content, MAX_TOP_LOGPROBS, Message},
    state::AppState,
    structured, tools,
};

pub(super) async fn chat(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!(target: "tessera::http", "validate");
    let (state, who) = (s.clone(), caller.clone());
    let prepare = move || span.in_scope(|| prepare_chat(&state, &who, b));
    match offload::run(&offload::CHAT, "rendering the chat template and tokenizing", "messages", prepare).await {
        Ok(job) => run(s, &caller, job).await,
        Err(e) => e.into_response(),
    }
}

fn prepare_chat(s: &AppState, caller: &Caller, b: Result<Bytes, BytesRejection>) -> Result<Job, ApiError> {
    let mut r: ChatRequest = request::parse(&body(b, s.max_body_bytes)?)?;
    // The key's own list first: a name outside it is 403 whether or not this server serves it, so a
    // key learns nothing of other tenants' adapters.
    auth::check_model(caller, &r.model)?;
    let adapter = check_model(s, &r.model)?;
    let template = s.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            None,
            format!("The model `{}` has no chat template; use /v1/completions instead.", s.model_name),
        )
    })?;
    refuse_unsupported(&r)?;
    let structured = structured::constraint(s, r.response_format.as_ref(), r.structured_outputs.as_ref())?;
    let tools = tools::read(
        r.tools.as_ref(),
        r.tool_choice.as_ref(),
        r.parallel_tool_calls,
        s.tool_format,
        structured.is_some(),
    )?;
    let text = template.render_with_tools(&messages(&r.messages)?, tools.as_ref().map(|t| &t.tools))?;
    // The template writes the special tokens itself (e.g. "<s>"); like transformers, add none.
    let prompt = s.tokenizer.encode(&text, false).map_err(|e| ApiError::param("messages", e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::param("messages", "The rendered conversation is empty."));
    }
    let logprobs = logprobs(r.logprobs, r.top_logprobs)?;
    let max_tokens = match (
        request::max_tokens("max_completion_tokens", r.max_completion_tokens)?,
        request::max_tokens("max_tokens", r.max_tokens)?,
    ) {
        (Some(m), _) | (None, Some(m)) => m,
        // Without a limit, a chat answer may run to the end of the context.
        (None, None) => s.engine.info().max_position_embeddings.saturating_sub(prompt.len()).max(1),
    };
    let mut opts = request::options(r.common(), logprobs)?;
    let (tool_output, forced) = tools.map(|t| (t.output, t.constraint)).unwrap_or_default();
    let constraint = match forced {
        Some(spec) => Some(structured::compile(s, "tool_choice", &spec)?),
        None => structured,
    };
    opts.tool_output = tool_output;
    let model = std::mem::take(&mut r.model);
    Ok(Job { kind: Kind::Chat, model, adapter, prompts: vec![prompt], max_tokens, opts, echo: None, constraint })
}

/// What would change what the model is asked to produce and cannot be served: refusing it beats answering
/// as if it had not been asked for.
fn refuse_unsupported(r: &ChatRequest) -> Result<(), ApiError> {
    if r.functions.as_ref().is_some_and(|t| !t.is_null()) || r.function_call.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::param("functions", "Function calling is not supported by this server."));
    }
    for (param, v) in [("audio", &r.audio), ("web_search_options", &r.web_search_options)] {
        if v.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::param(param, format!("`{param}` is not supported by this server.")));
        }
    }
    if let Some(m) = &r.modalities
        && m.iter().any(|m| m != "text")
    {
        return Err(ApiError::param("modalities", "Only the \"text\" modality is supported by this server."));
    }
    Ok(())
}

/// The conversation as the chat template takes it: a role and plain text per message.
pub(super) fn messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param("messages", "messages must contain at least one message."));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(ApiError::param(&format!("messages.[{i}].role"), format!("Invalid role {:?}.", m.role)));
        }
        let content = m.content.as_ref().map(|c| message_text(i, c)).transpose()?;
        // OpenAI requires content of every message but an assistant's that calls tools instead.
        let calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
        if content.is_none() && !(m.role == "assistant" && calls) {
            return Err(ApiError::param(&format!("messages.[{i}].content"), "Missing required parameter: content."));
        }
        if m.tool_calls.is_some() && m.role != "assistant" {
            return Err(ApiError::param(
                &format!("messages.[{i}].tool_calls"),
                "Only assistant messages have tool_calls.",
            ));
        }
        if m.role == "tool" && m.tool_call_id.is_none() {
            return Err(ApiError::param(&format!("messages.[{i}].tool_call_id"), "A tool message needs tool_call_id."));
        }
        let tool_calls = match &m.tool_calls {
            Some(c) => Some(template_tool_calls(i, c)?),
            None => None,
        };
        out.push(ChatMessage {
            role: m.role.clone(),
            content,
            name: m.name.clone(),
            tool_calls,
            tool_call_id: m.tool_call_id.clone(),
        });
    }
    Ok(out)
}

/// An assistant's tool calls as chat templates read them: OpenAI sends each call's `arguments` as a JSON
/// string, templates (as Hugging Face documents them, and as vLLM hands them over) expect the object.
fn template_tool_calls(i: usize, calls: &[Value]) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(calls.len());
    for (j, call) in calls.iter().enumerate() {
        let param = |field: &str| format!("messages.[{i}].tool_calls.[{j}]{field}");
        let mut call = call.clone();
        let function = call
            .get_mut("function")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::param(&param(".function"), "A tool call needs a function object."))?;
        if !function.get("name").is_some_and(Value::is_string) {
            return Err(ApiError::param(&param(".function.name"), "A tool call's function needs a name."));
        }
        if let Some(Value::String(args)) = function.get("arguments") {
            let parsed: Value = serde_json::from_str(args).map_err(|e| {
                ApiError::param(&param(".function.arguments"), format!("The arguments are not JSON: {e}"))
            })?;
            function.insert("arguments".into(), parsed);
        }
        out.push(call);
    }
    Ok(Value::Array(out))
}

/// Message `i`'s content as one text: the model reads text only, so other kinds of parts are refused.
fn message_text(i: usize, content: &Content) -> Result<String, ApiError> {
    Ok(match content {
        Content::Text(t) => t.clone(),
        Content::Parts(parts) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::param(
                            &format!("messages.[{i}].content"),
                            format!("Content parts of type {kind:?} are not supported; only text."),
                        ));
                    }
                }
            }
            text
        }
    })
}

/// Chat asks for logprobs with a flag and for alternatives with a count; `Some(k)` is the count.
fn logprobs(logprobs: Option<bool>, top_logprobs: Option<i64>) -> Result<Option<usize>, ApiError> {
    match (logprobs.unwrap_or(false), top_logprobs) {
        (false, Some(k)) if k > 0 => Err(ApiError::param("top_logprobs", "top_logprobs requires logprobs to be true.")),
        (false, _) => Ok(None),
        (true, None) => Ok(Some(0)),
        (true, Some(k)) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
        (true, Some(k)) => Err(ApiError::param(
            "top_logprobs",
            format!("{k} is not a valid value for 'top_logprobs': expected 0 to {MAX_TOP_LOGPROBS}."),
        )),
    }
}
