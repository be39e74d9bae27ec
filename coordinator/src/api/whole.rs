//! The answer to a request that does not stream: every event until all choices finish, then one JSON body,
//! a `text_completion` or a `chat.completion` as OpenAI shapes them.
//!
//! The body is serialized straight from the choices into the one buffer that becomes the response (no
//! `serde_json::Value` tree of it first): with logprobs, such a tree took about ten times the bytes it
//! wrote. Keys are declared in sorted order, as serializing a `Value` wrote them before.

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use super::{
    error::ApiError,
    output::{ChoiceText, LogprobsJson, PromptLogprobsJson, TokenLp},
    reply::{Kind, Reply, backend_error},
    tools::{self, ToolOutput},
};
use crate::{engine::contract::FinishReason, tokenizer::Tokenizer};

/// Bodies at least this large give their memory back to the system once sent (`malloc_trim`): glibc keeps
/// freed memory in its arenas for reuse, and after a response of tens of megabytes that is tens of
/// megabytes the process keeps for good. Below it, trimming costs more than it returns.
const TRIM_AFTER_BYTES: usize = 4 << 20;

pub(super) async fn whole_reply(mut r: Reply) -> Response {
    while !r.all_finished() {
        let Some(ev) = r.rx.recv().await else {
            return ApiError::internal("The engine stopped before the request finished.").into_response();
        };
        if let Err(m) = r.apply(ev) {
            return backend_error(&m).into_response();
        }
    }
    r.bill_completed().await;
    let body = Body {
        choices: Choices(&r),
        created: r.created,
        id: &r.name,
        model: &r.model,
        object: if r.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        system_fingerprint: (r.kind == Kind::Chat).then_some(()),
        usage: r.usage(),
    };
    let bytes = match serde_json::to_vec(&body) {
        Ok(b) => b,
        Err(e) => return ApiError::internal(format!("The response could not be written: {e}")).into_response(),
    };
    // The choices (their text and logprob entries) are not needed any more: free them before the body is sent.
    drop(r);
    let body = if bytes.len() >= TRIM_AFTER_BYTES { Bytes::from_owner(TrimOnDrop(bytes)) } else { Bytes::from(bytes) };
    let mut resp = body.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[derive(Serialize)]
struct Body<'a> {
    choices: Choices<'a>,
    created: u64,
    id: &'a str,
    model: &'a str,
    object: &'static str,
    /// `null` in a chat completion, absent from a text completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<()>,
    usage: Value,
}

struct Choices<'a>(&'a Reply);

impl Serialize for Choices<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let chat = r.kind == Kind::Chat;
        s.collect_seq(r.choices.iter().enumerate().map(|(index, c)| Choice {
            chat,
            index,
            c,
            tok: &r.s.tokenizer,
            logprobs: r.opts.logprobs.is_some(),
            echo: r.opts.echo,
            logprobs_k: r.opts.logprobs.unwrap_or(0),
            prompt_logprobs: r.opts.prompt_logprobs,
            tools: r.opts.tool_output.as_ref(),
            response: &r.name,
        }))
    }
}

struct Choice<'a> {
    chat: bool,
    index: usize,
    c: &'a ChoiceText,
    tok: &'a Tokenizer,
    logprobs: bool,
    /// The prompt goes first, in the text and in the logprobs.
    echo: bool,
    /// Alternatives per token in `logprobs`, and in `prompt_logprobs` when asked for.
    logprobs_k: usize,
    prompt_logprobs: Option<usize>,
    /// Chat with tools: how the text becomes calls.
    tools: Option<&'a ToolOutput>,
    /// The response's id (call ids are made from it).
    response: &'a str,
}

impl Serialize for Choice<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let logprobs =
            self.logprobs.then_some(LogprobsJson { chat: self.chat, tok: self.tok, entries: &self.c.logprobs });
        if self.chat {
            let Some(output) = self.tools else {
                let message = Message { content: Some(&self.c.text), refusal: (), role: "assistant", tool_calls: None };
                let finish_reason = self.c.finish.map(FinishReason::as_str);
                return ChatChoice { finish_reason, index: self.index, logprobs, message }.serialize(s);
            };
            let (content, calls) = tools::split(output, &self.c.text);
            let tool_calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, c)| tools::call_json(tools::call_id(self.response, self.index, i), &c.name, &c.arguments))
                .collect();
            // OpenAI ends a choice that called tools with `tool_calls`, except when the request named the function.
            let called = !tool_calls.is_empty() && !matches!(output, ToolOutput::Named(_));
            let finish_reason = match self.c.finish {
                Some(FinishReason::Stop) if called => Some("tool_calls"),
                f => f.map(FinishReason::as_str),
            };
            let message = Message {
                content: content.as_deref(),
                refusal: (),
                role: "assistant",
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
            };
            ChatChoice { finish_reason, index: self.index, logprobs, message }.serialize(s)
        } else {
            let echo = self.c.prompt.as_ref().filter(|_| self.echo);
            let Some(p) = echo else {
                let prompt_logprobs = self.prompt_logprobs_json();
                return CompletionChoice {
                    finish_reason: self.c.finish,
                    index: self.index,
                    logprobs,
                    prompt_logprobs,
                    text: &self.c.text,
                }
                .serialize(s);
            };
            // The prompt's entries, then the completion's with their offsets moved past the prompt's text.
            let entries: Vec<TokenLp> = if self.logprobs {
                let shifted = self.c.logprobs.iter().map(|e| TokenLp { offset: e.offset + p.text.len(), ..e.clone() });
                p.entries(self.logprobs_k).into_iter().chain(shifted).collect()
            } else {
                Vec::new()
            };
            let logprobs = self.logprobs.then_some(LogprobsJson { chat: false, tok: self.tok, entries: &entries });
            let text = format!("{}{}", p.text, self.c.text);
            CompletionChoice {
                finish_reason: self.c.finish,
                index: self.index,
                logprobs,
                prompt_logprobs: self.prompt_logprobs_json(),
                text: &text,
            }
            .serialize(s)
        }
    }
}

impl Choice<'_> {
    fn prompt_logprobs_json(&self) -> Option<PromptLogprobsJson<'_>> {
        let (prompt, k) = (self.c.prompt.as_ref()?, self.prompt_logprobs?);
        Some(PromptLogprobsJson { tok: self.tok, prompt, k })
    }
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    finish_reason: Option<FinishReason>,
    index: usize,
    logprobs: Option<LogprobsJson<'a>>,
    /// vLLM's, present only when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_logprobs: Option<PromptLogprobsJson<'a>>,
    text: &'a str,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    finish_reason: Option<&'static str>,
    index: usize,
    logprobs: Option<LogprobsJson<'a>>,
    message: Message<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    content: Option<&'a str>,
    refusal: (),
    role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Value>>,
}

/// A large body's buffer, which trims the allocator's free memory when the body is dropped (sent, or the
/// client went away).
struct TrimOnDrop(Vec<u8>);

impl AsRef<[u8]> for TrimOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for TrimOnDrop {
    fn drop(&mut self) {
        drop(std::mem::take(&mut self.0));
        trim();
    }
}

/// Gives the allocator's free memory back to the system.
#[cfg(target_env = "gnu")]
pub(super) fn trim() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(target_env = "gnu"))]
pub(super) fn trim() {}
