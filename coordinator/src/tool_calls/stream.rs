//! [`StreamParser`]: a model's output read as it is generated, into content and tool-call deltas.
//!
//! Every decision depends only on the text so far (with a little lookahead held back: a possible marker,
//! a number still being written), never on where the deltas were cut, so any split of the output gives the
//! same content and calls; [`super::parse`] is this parser fed the whole output at once.

use super::json::{CallScanner, Step};
use super::types::{Delta, Format};

const TOOL_CALL: &str = "<tool_call>";
const TOOL_CALL_END: &str = "</tool_call>";
const TOOL_CALLS: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";
/// A Mistral name header (`f`, `f[ARGS]`, `f[CALL_ID]id[ARGS]`) longer than this is prose, not a name,
/// and is not held back any longer.
const MAX_HEADER: usize = 256;

#[derive(Debug)]
enum State {
    /// Llama 3 JSON and JSON arrays: leading whitespace; the first other character decides.
    Start,
    /// Content, watching for the format's marker (Hermes, Mistral).
    Text,
    /// Content to the end.
    Passthrough,
    /// Expecting a call object's `{` (after `<tool_call>` or `<|python_tag|>`).
    AwaitObject,
    /// Inside a call; `index` is given when its `CallStart` goes out. Boxed to keep the parser small, as
    /// it is held per streamed choice.
    Call { scanner: Box<CallScanner>, index: Option<usize> },
    /// Hermes: after a call object, expecting `</tool_call>`.
    HermesClose,
    /// Llama 3 JSON: after a call, where `;` and whitespace separate calls.
    LlamaNext,
    /// Mistral: after `[TOOL_CALLS]`: a JSON array of calls, or a name header.
    MistralBody,
    /// Mistral (v11+ tokenizers): the name, maybe with `[CALL_ID]…` and `[ARGS]`, before the arguments.
    MistralHeader(String),
    /// In an array of calls, expecting a call (or, if `first`, the `]` of an empty array).
    ArrayItem { first: bool },
    /// In an array of calls, after one: `,` or `]`.
    ArrayNext,
}

enum Marker {
    Yes,
    Maybe,
    No,
}

fn marker(rest: &str, m: &str, eof: bool) -> Marker {
    if rest.starts_with(m) {
        Marker::Yes
    } else if !eof && m.starts_with(rest) {
        Marker::Maybe
    } else {
        Marker::No
    }
}

/// How many bytes at the end of `text` could be the start of `m` (markers are ASCII, so this is a char
/// boundary).
fn held_prefix(text: &str, m: &str) -> usize {
    (1..m.len()).rev().find(|&k| text.ends_with(&m[..k])).unwrap_or(0)
}

/// Appends a delta, merging it into the last one when both are content or both the same call's arguments.
fn push_delta(out: &mut Vec<Delta>, d: Delta) {
    match (out.last_mut(), d) {
        (Some(Delta::Content(a)), Delta::Content(b)) => a.push_str(&b),
        (Some(Delta::Arguments { index: i, fragment: a }), Delta::Arguments { index: j, fragment: b }) if *i == j => {
            a.push_str(&b)
        }
        (_, d) => out.push(d),
    }
}

/// Incremental tool-call parser: fed the text deltas as they are generated.
#[derive(Debug)]
pub struct StreamParser {
    format: Format,
    state: State,
    /// Input not yet consumed: a possible marker, or everything after it when it is not one.
    buf: String,
    /// Text consumed since the last call or closing marker that is neither content nor part of a call
    /// yet: it goes out as content if the call it belongs to fails.
    raw: String,
    calls: usize,
    failed: bool,
    /// Whether content other than whitespace has gone out; until then whitespace is held, so that an
    /// output whose content is only whitespace streams none (the whole parse gives `None`).
    content_started: bool,
    held_ws: String,
}

impl StreamParser {
    pub fn new(format: Format) -> Self {
        let state = match format {
            Format::Llama3Json | Format::JsonArray => State::Start,
            Format::Hermes | Format::Mistral => State::Text,
        };
        let (buf, raw, held_ws) = Default::default();
        Self { format, state, buf, raw, calls: 0, failed: false, content_started: false, held_ws }
    }

    /// The next text delta; returns what it completes.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        self.buf.push_str(text);
        self.run(false)
    }

    /// End of output: what was held back goes out, and a call left open is malformed: its text goes out
    /// as content.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = self.run(true);
        match self.state {
            State::Start | State::Text | State::Passthrough | State::HermesClose | State::LlamaNext => {}
            _ => {
                self.fail(&mut out);
            }
        }
        out
    }

    /// Whether any call was started (the API then answers finish_reason "tool_calls").
    pub fn saw_calls(&self) -> bool {
        self.calls > 0
    }

    /// Whether a call turned out malformed (from then on everything was content).
    pub(super) fn failed(&self) -> bool {
        self.failed
    }

    fn run(&mut self, eof: bool) -> Vec<Delta> {
        let mut out = Vec::new();
        let buf = std::mem::take(&mut self.buf);
        let mut pos = 0;
        while pos < buf.len() {
            match self.step(&buf[pos..], eof, &mut out) {
                Some(n) => pos += n,
                None => break,
            }
        }
        self.flush_call(&mut out);
        self.buf = buf;
        self.buf.drain(..pos);
        out
    }

    /// Consumes what it can from the front of `rest`: `Some(bytes)` (0 when only the state changed),
    /// `None` when it must see more text to decide.
    fn step(&mut self, rest: &str, eof: bool, out: &mut Vec<Delta>) -> Option<usize> {
        let c = rest.chars().next()?;
        let ws = c.is_whitespace();
        match self.state {
            State::Start => self.start(rest, c, eof, out),
            State::Text => self.text(rest, eof, out),
            State::Passthrough => {
                self.content(rest, out);
                Some(rest.len())
            }
            State::Call { .. } => Some(self.call(rest, out)),
            State::MistralHeader(_) => self.header(c, out),
            _ if ws => self.keep(c),
            State::AwaitObject | State::ArrayItem { .. } if c == '{' => self.begin_call(CallScanner::object()),
            State::ArrayItem { first: true } | State::ArrayNext if c == ']' => {
                self.raw.clear();
                self.state = if self.format == Format::Mistral { State::Text } else { State::Passthrough };
                Some(1)
            }
            State::ArrayNext if c == ',' => {
                self.state = State::ArrayItem { first: false };
                self.keep(c)
            }
            State::MistralBody if c == '[' => {
                self.state = State::ArrayItem { first: true };
                self.keep(c)
            }
            State::MistralBody => {
                self.state = State::MistralHeader(String::new());
                Some(0)
            }
            State::HermesClose => self.hermes_close(rest, eof, out),
            State::LlamaNext => self.llama_next(rest, c, eof),
            State::AwaitObject | State::ArrayItem { .. } | State::ArrayNext => self.fail(out),
        }
    }

    /// Llama 3 JSON or a JSON array: only an output that opens with a call is one; anything else is all
    /// content.
    fn start(&mut self, rest: &str, c: char, eof: bool, out: &mut Vec<Delta>) -> Option<usize> {
        if c.is_whitespace() {
            self.content(&rest[..c.len_utf8()], out);
            return Some(c.len_utf8());
        }
        match (self.format, c) {
            (Format::JsonArray, '[') => {
                self.state = State::ArrayItem { first: true };
                self.keep(c)
            }
            (Format::Llama3Json, '{') => self.begin_call(CallScanner::object()),
            (Format::Llama3Json, '<') => self.python_tag(rest, eof),
            _ => {
                self.state = State::Passthrough;
                Some(0)
            }
        }
    }

    /// Content up to the format's marker; the end of the text is held back while it could be the start of
    /// one.
    fn text(&mut self, rest: &str, eof: bool, out: &mut Vec<Delta>) -> Option<usize> {
        let (m, next) = match self.format {
            Format::Hermes => (TOOL_CALL, State::AwaitObject),
            Format::Mistral => (TOOL_CALLS, State::MistralBody),
            Format::Llama3Json | Format::JsonArray => {
                self.state = State::Passthrough;
                return Some(0);
            }
        };
        if let Some(i) = rest.find(m) {
            self.content(&rest[..i], out);
            self.raw.push_str(m);
            self.state = next;
            return Some(i + m.len());
        }
        let n = rest.len() - if eof { 0 } else { held_prefix(rest, m) };
        self.content(&rest[..n], out);
        (n > 0).then_some(n)
    }

    /// Llama's `<|python_tag|>` (at the start, or before another call); text that is not the tag is
    /// content.
    fn python_tag(&mut self, rest: &str, eof: bool) -> Option<usize> {
        match marker(rest, PYTHON_TAG, eof) {
            Marker::Yes => {
                self.raw.push_str(PYTHON_TAG);
                self.state = State::AwaitObject;
                Some(PYTHON_TAG.len())
            }
            Marker::Maybe => None,
            Marker::No => {
                self.state = State::Passthrough;
                Some(0)
            }
        }
    }

    fn llama_next(&mut self, rest: &str, c: char, eof: bool) -> Option<usize> {
        match c {
            ';' => self.keep(c),
            '{' => self.begin_call(CallScanner::object()),
            '<' if !matches!(marker(rest, PYTHON_TAG, eof), Marker::No) => self.python_tag(rest, eof),
            // Text after the calls is content; the separators before it are not.
            _ => {
                self.raw.clear();
                self.state = State::Passthrough;
                Some(0)
            }
        }
    }

    /// Hermes after a call object: its closing tag; at the end of output an unterminated (or partly
    /// written) tag is fine, since the call itself is complete.
    fn hermes_close(&mut self, rest: &str, eof: bool, out: &mut Vec<Delta>) -> Option<usize> {
        if eof && TOOL_CALL_END.starts_with(rest) {
            return Some(rest.len());
        }
        match marker(rest, TOOL_CALL_END, eof) {
            Marker::Yes => {
                self.raw.clear();
                self.state = State::Text;
                Some(TOOL_CALL_END.len())
            }
            Marker::Maybe => None,
            Marker::No => self.fail(out),
        }
    }

    /// Mistral's name header, up to the `{` of the arguments.
    fn header(&mut self, c: char, out: &mut Vec<Delta>) -> Option<usize> {
        let State::MistralHeader(h) = &mut self.state else { return Some(0) };
        if c != '{' {
            h.push(c);
            let long = h.len() > MAX_HEADER;
            self.raw.push(c);
            if long {
                self.fail(out);
            }
            return Some(c.len_utf8());
        }
        let name = h.split('[').next().unwrap_or_default().trim();
        if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || "_-.:".contains(c)) {
            return self.fail(out);
        }
        let scanner = CallScanner::bare_args(name.to_string());
        self.begin_call(scanner)
    }

    fn keep(&mut self, c: char) -> Option<usize> {
        self.raw.push(c);
        Some(c.len_utf8())
    }

    fn begin_call(&mut self, scanner: CallScanner) -> Option<usize> {
        self.state = State::Call { scanner: Box::new(scanner), index: None };
        Some(0)
    }

    /// Feeds a call as much of `rest` as it takes; returns the bytes consumed. The call's start goes out
    /// at the character that makes it known, and its arguments before it closes or fails, so that a call
    /// that turns out malformed has sent the same start and arguments however its text was split.
    fn call(&mut self, rest: &str, out: &mut Vec<Delta>) -> usize {
        for (i, c) in rest.char_indices() {
            let State::Call { scanner, index } = &mut self.state else { return i };
            let step = scanner.feed(c);
            if index.is_none() || step != Step::More {
                self.flush_call(out);
            }
            if step == Step::More {
                continue;
            }
            let n = i + c.len_utf8();
            self.raw.push_str(&rest[..n]);
            if step == Step::Done {
                self.close_call(out);
            } else {
                self.fail(out);
            }
            return n;
        }
        self.raw.push_str(rest);
        rest.len()
    }

    fn close_call(&mut self, out: &mut Vec<Delta>) {
        let State::Call { scanner, .. } = &mut self.state else { return };
        let bare = scanner.is_bare();
        if scanner.finish().is_none() {
            self.fail(out);
            return;
        }
        self.flush_call(out);
        self.raw.clear();
        self.state = match self.format {
            Format::Hermes => State::HermesClose,
            Format::Llama3Json => State::LlamaNext,
            Format::Mistral if bare => State::Text,
            Format::Mistral | Format::JsonArray => State::ArrayNext,
        };
    }

    /// Sends what the open call has: its start once the name is known, then its arguments so far.
    fn flush_call(&mut self, out: &mut Vec<Delta>) {
        let State::Call { scanner, index } = &mut self.state else { return };
        let index = match *index {
            Some(i) => i,
            None => {
                let Some(name) = scanner.name() else { return };
                let i = self.calls;
                self.calls += 1;
                out.push(Delta::CallStart { index: i, name: name.to_string() });
                *index = Some(i);
                i
            }
        };
        let fragment = scanner.take_args();
        if !fragment.is_empty() {
            push_delta(out, Delta::Arguments { index, fragment: fragment.to_string() });
        }
    }

    /// A malformed call: what was held for it goes out as content, as does everything after it.
    fn fail(&mut self, out: &mut Vec<Delta>) -> Option<usize> {
        tracing::debug!(format = ?self.format, "malformed tool call: returned as content");
        self.failed = true;
        self.state = State::Passthrough;
        let raw = std::mem::take(&mut self.raw);
        self.content(&raw, out);
        Some(0)
    }

    fn content(&mut self, s: &str, out: &mut Vec<Delta>) {
        if s.is_empty() {
            return;
        }
        if self.content_started {
            push_delta(out, Delta::Content(s.to_string()));
        } else if s.trim().is_empty() {
            self.held_ws.push_str(s);
        } else {
            self.content_started = true;
            let text = std::mem::take(&mut self.held_ws) + s;
            push_delta(out, Delta::Content(text));
        }
    }
}
