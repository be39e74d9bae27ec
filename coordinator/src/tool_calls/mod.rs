//! Tool calls in a model's output. The OpenAI API returns them as `message.tool_calls`; the model writes
//! them as text in its family's format (Llama 3 JSON, Mistral's `[TOOL_CALLS]`, Hermes/Qwen's
//! `<tool_call>` blocks, or the JSON array a `tool_choice: "required"` request is constrained to). This
//! module owns reading that text back into calls: whole ([`parse`]) or as it streams ([`StreamParser`]),
//! the two agreeing on every split of the output, and telling a chat template's format ([`Format::detect`]).
//!
//! - `json`: incremental JSON: compact re-serialisation of the arguments as they arrive, call objects;
//! - `stream`: the per-format state machine that separates content from calls;
//! - `types`: the formats, a call, a parsed output and a stream's deltas (what the others share).

mod json;
mod stream;
#[cfg(test)]
mod tests;
mod types;

pub use stream::StreamParser;
pub use types::{Delta, Format, Parsed, ToolCall};

/// The whole output: the text outside the calls is content. A malformed call (bad JSON, no name, arguments
/// that are not an object) is not an error: the whole text is then content and there are no calls, as in
/// vLLM.
pub fn parse(format: Format, text: &str) -> Parsed {
    let mut p = StreamParser::new(format);
    let mut deltas = p.push(text);
    deltas.extend(p.finish());
    if p.failed() {
        return Parsed { content: (!text.trim().is_empty()).then(|| text.to_string()), calls: Vec::new() };
    }
    assemble(deltas)
}

/// The content and calls a stream of deltas adds up to.
fn assemble(deltas: impl IntoIterator<Item = Delta>) -> Parsed {
    let (mut content, mut calls) = (String::new(), Vec::<ToolCall>::new());
    for d in deltas {
        match d {
            Delta::Content(s) => content.push_str(&s),
            Delta::CallStart { name, .. } => calls.push(ToolCall { name, arguments: String::new() }),
            Delta::Arguments { index, fragment } => {
                if let Some(c) = calls.get_mut(index) {
                    c.arguments.push_str(&fragment);
                }
            }
        }
    }
    Parsed { content: (!content.trim().is_empty()).then_some(content), calls }
}
