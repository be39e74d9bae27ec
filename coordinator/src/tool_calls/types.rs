//! What the tool-call modules share: the formats, a call, a parsed output and the deltas of a stream. Its
//! own module so that the stream parser and the whole-output parser depend on it and not on each other.

/// The tool-call formats, named as vLLM's `--tool-call-parser` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Llama 3.1/3.2/3.3: `{"name": "f", "parameters": {…}}`, maybe after `<|python_tag|>`, calls
    /// separated by `;`.
    Llama3Json,
    /// Mistral: `[TOOL_CALLS][{"name": "f", "arguments": {…}}, …]`, or (v11+ tokenizers)
    /// `[TOOL_CALLS]f[ARGS]{…}`, repeated.
    Mistral,
    /// Hermes 2/3, Qwen2/2.5: `<tool_call>\n{"name": "f", "arguments": {…}}\n</tool_call>` blocks.
    Hermes,
    /// Internal, no name: the JSON array `[{"name": "f", "parameters": {…}}, …]` that a
    /// `tool_choice: "required"` request is constrained to generate.
    JsonArray,
}

impl Format {
    /// The format vLLM's `--tool-call-parser` calls `name`.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "llama3_json" => Some(Format::Llama3Json),
            "mistral" => Some(Format::Mistral),
            "hermes" => Some(Format::Hermes),
            _ => None,
        }
    }

    /// The names [`Self::from_name`] knows, for error messages and help.
    pub fn names() -> &'static [&'static str] {
        &["llama3_json", "mistral", "hermes"]
    }

    /// The format a chat template writes, from markers in its source: `<tool_call>` → Hermes (Qwen2/2.5,
    /// Hermes), `[TOOL_CALLS]` → Mistral, `<|python_tag|>` or Llama 3.1's JSON instructions (a
    /// `"parameters"` object, with the `ipython` role) → Llama3Json; None otherwise.
    pub fn detect(chat_template_source: &str) -> Option<Format> {
        let src = chat_template_source;
        if src.contains("<tool_call>") {
            Some(Format::Hermes)
        } else if src.contains("[TOOL_CALLS]") {
            Some(Format::Mistral)
        } else if src.contains("<|python_tag|>") || (src.contains("ipython") && src.contains("\"parameters\"")) {
            Some(Format::Llama3Json)
        } else {
            None
        }
    }
}

/// One call, as the API returns it in `message.tool_calls[].function`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object as compact JSON text: what `serde_json::to_string` writes for it (an object
    /// that repeats a key keeps every occurrence), so it always parses.
    pub arguments: String,
}

/// A whole output read: its content and its calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// The text outside the calls; None if it is only whitespace.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

/// What a [`StreamParser`] sends as the output streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Content(String),
    /// A call begins; its name is known. Indices count from 0 in order.
    CallStart {
        index: usize,
        name: String,
    },
    /// More of call `index`'s arguments: its fragments concatenate to the arguments [`parse`] returns.
    Arguments {
        index: usize,
        fragment: String,
    },
}
