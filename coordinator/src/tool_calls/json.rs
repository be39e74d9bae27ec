//! Incremental JSON for tool calls: [`Compactor`] re-serialises one JSON value compactly as its characters
//! arrive, and [`CallScanner`] reads a call object (`{"name": …, "arguments": {…}}`) or a bare arguments
//! object with it, so a call's name is known as soon as it is written and its arguments can be streamed.
//!
//! The compact text is byte for byte what `serde_json::to_string` writes for the parsed value (strings
//! re-escaped the way serde escapes them, numbers re-formatted through serde), so streamed fragments
//! concatenate to the same `arguments` the whole parse returns. The scanners reject early what serde would
//! reject, but the last word on validity is serde's, on the call's raw text once it closes.

use serde_json::Value;

/// Where a value stands after one more character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// The value goes on.
    More,
    /// The character closed the value.
    Done,
    /// The value (a number or literal, which has no closing character) ended just before this character,
    /// which belongs to the enclosing text and was not consumed.
    DoneBefore,
    /// Not JSON.
    Bad,
}

/// Inside a string: what the next character means.
#[derive(Debug, Clone, Copy)]
enum Str {
    Plain,
    Escape,
    /// After `\u`: `n` hex digits read into `acc`; `high` is a leading surrogate waiting for its pair.
    Hex {
        high: Option<u32>,
        acc: u32,
        n: u8,
    },
    /// After a leading surrogate's escape: the trailing one must follow (`\` then `u`).
    NeedLow {
        high: u32,
        backslash: bool,
    },
}

/// Compact re-serialisation of one JSON value, a character at a time.
#[derive(Debug, Default)]
pub(super) struct Compactor {
    depth: u32,
    string: Option<Str>,
    /// A number or literal being read: written out once complete, since only then can serde format it.
    scalar: String,
    started: bool,
}

impl Compactor {
    /// Whether the value's first character has been read (whitespace before it is skipped).
    pub(super) fn started(&self) -> bool {
        self.started
    }

    pub(super) fn feed(&mut self, c: char, out: &mut String) -> Step {
        if let Some(s) = self.string {
            return self.feed_string(s, c, out);
        }
        if !self.scalar.is_empty() {
            if is_scalar_char(c) {
                self.scalar.push(c);
                return Step::More;
            }
            if !flush_scalar(&mut self.scalar, out) {
                return Step::Bad;
            }
            if self.depth == 0 {
                return Step::DoneBefore;
            }
        }
        match c {
            ' ' | '\t' | '\n' | '\r' => return Step::More,
            '"' => {
                self.string = Some(Str::Plain);
                out.push('"');
            }
            '{' | '[' => {
                self.depth += 1;
                out.push(c);
            }
            '}' | ']' | ',' | ':' if self.depth == 0 => return Step::Bad,
            '}' | ']' => {
                self.depth -= 1;
                out.push(c);
                if self.depth == 0 {
                    return Step::Done;
                }
            }
            ',' | ':' => out.push(c),
            c if is_scalar_char(c) => self.scalar.push(c),
            _ => return Step::Bad,
        }
        self.started = true;
        Step::More
    }

    /// End of input: a number or literal at the top level is complete (nothing else is). Calls never
    /// need it (their values all end inside an object), the tests of bare values do.
    #[cfg(test)]
    pub(super) fn finish(&mut self, out: &mut String) -> bool {
        self.depth == 0 && self.string.is_none() && flush_scalar(&mut self.scalar, out)
    }

    fn feed_string(&mut self, s: Str, c: char, out: &mut String) -> Step {
        let next = match (s, c) {
            (Str::Plain, '"') => {
                out.push('"');
                self.string = None;
                return if self.depth == 0 { Step::Done } else { Step::More };
            }
            (Str::Plain, '\\') => Str::Escape,
            // serde refuses raw control characters inside strings.
            (Str::Plain, c) if c < ' ' => return Step::Bad,
            (Str::Plain, c) => {
                escape_into(out, c);
                Str::Plain
            }
            (Str::Escape, 'u') => Str::Hex { high: None, acc: 0, n: 0 },
            (Str::Escape, c) => {
                let Some(decoded) = simple_escape(c) else { return Step::Bad };
                escape_into(out, decoded);
                Str::Plain
            }
            (Str::Hex { high, acc, n }, c) => {
                let Some(d) = c.to_digit(16) else { return Step::Bad };
                let acc = acc * 16 + d;
                if n < 3 {
                    Str::Hex { high, acc, n: n + 1 }
                } else {
                    match unicode_escape(high, acc, out) {
                        Some(next) => next,
                        None => return Step::Bad,
                    }
                }
            }
            (Str::NeedLow { high, backslash: false }, '\\') => Str::NeedLow { high, backslash: true },
            (Str::NeedLow { high, backslash: true }, 'u') => Str::Hex { high: Some(high), acc: 0, n: 0 },
            (Str::NeedLow { .. }, _) => return Step::Bad,
        };
        self.string = Some(next);
        Step::More
    }
}

/// A complete `\uXXXX`: surrogates must pair up, as serde requires when it decodes into a `String`.
fn unicode_escape(high: Option<u32>, code: u32, out: &mut String) -> Option<Str> {
    let low = (0xDC00..=0xDFFF).contains(&code);
    let c = match high {
        Some(h) if low => char::from_u32(0x1_0000 + ((h - 0xD800) << 10) + (code - 0xDC00))?,
        Some(_) => return None,
        None if low => return None,
        None if (0xD800..=0xDBFF).contains(&code) => return Some(Str::NeedLow { high: code, backslash: false }),
        None => char::from_u32(code)?,
    };
    escape_into(out, c);
    Some(Str::Plain)
}

fn simple_escape(c: char) -> Option<char> {
    Some(match c {
        '"' => '"',
        '\\' => '\\',
        '/' => '/',
        'b' => '\u{8}',
        'f' => '\u{c}',
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        _ => return None,
    })
}

fn is_scalar_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.')
}

/// Writes a finished number or literal as serde would; false if it is neither.
fn flush_scalar(scalar: &mut String, out: &mut String) -> bool {
    if scalar.is_empty() {
        return true;
    }
    let ok = match serde_json::from_str::<Value>(scalar) {
        Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => {
            out.push_str(&v.to_string());
            true
        }
        _ => false,
    };
    scalar.clear();
    ok
}

/// One character inside a JSON string, escaped exactly as `serde_json` escapes it.
pub(super) fn escape_into(out: &mut String, c: char) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        c if c < ' ' => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let b = c as u8;
            out.push_str("\\u00");
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xF)] as char);
        }
        c => out.push(c),
    }
}

/// Which member of a call object a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Key,
    Name,
    Args,
    Other,
}

/// Where a call object's top level stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Key,
    Value(Slot),
    Colon,
    Between,
}

/// One call being read: a call object `{"name": "f", "arguments": {…}}` (`"parameters"` is read as
/// `"arguments"`, other members are ignored), or a bare arguments object whose name was written before it
/// (Mistral's `f[ARGS]{…}`).
#[derive(Debug)]
pub(super) struct CallScanner {
    bare: bool,
    phase: Phase,
    value: Compactor,
    /// The call's text as written, which serde validates once it closes.
    raw: String,
    /// The compact text of the current key, the name, or a value nobody needs.
    scratch: String,
    name: Option<String>,
    saw_args: bool,
    args: String,
    /// How much of `args` has been handed out.
    taken: usize,
}

impl CallScanner {
    /// A call object; fed from its `{`.
    pub(super) fn object() -> Self {
        Self::new(false, Phase::Open, None)
    }

    /// A bare arguments object for the named function; fed from its `{`.
    pub(super) fn bare_args(name: String) -> Self {
        Self::new(true, Phase::Value(Slot::Args), Some(name))
    }

    fn new(bare: bool, phase: Phase, name: Option<String>) -> Self {
        let (value, raw, scratch, args) = Default::default();
        Self { bare, phase, value, raw, scratch, name, saw_args: bare, args, taken: 0 }
    }

    /// Whether this is a bare arguments object (named before it).
    pub(super) fn is_bare(&self) -> bool {
        self.bare
    }

    /// The function's name, once it is known and the arguments object has begun: an object with a name
    /// but no arguments is not a call (Llama's JSON answers often have a "name"), so it is not started
    /// before that.
    pub(super) fn name(&self) -> Option<&str> {
        self.name.as_deref().filter(|_| !self.args.is_empty())
    }

    /// The compact arguments text written since the last call.
    pub(super) fn take_args(&mut self) -> &str {
        let new = &self.args[self.taken..];
        self.taken = self.args.len();
        new
    }

    /// One character of the call: `Done` when it closed the call.
    pub(super) fn feed(&mut self, c: char) -> Step {
        self.raw.push(c);
        let mut step = self.top(c);
        // A number or literal ends at the character after it, which the top level then reads.
        if step == Step::DoneBefore {
            step = self.top(c);
        }
        step
    }

    fn top(&mut self, c: char) -> Step {
        let ws = matches!(c, ' ' | '\t' | '\n' | '\r');
        match self.phase {
            Phase::Open if c == '{' => self.phase = Phase::Key,
            Phase::Key if c == '"' => {
                self.phase = Phase::Value(Slot::Key);
                return self.value(Slot::Key, c);
            }
            Phase::Key | Phase::Between if c == '}' => return Step::Done,
            Phase::Between if c == ',' => self.phase = Phase::Key,
            Phase::Colon if c == ':' => match self.slot() {
                Some(slot) => self.phase = Phase::Value(slot),
                None => return Step::Bad,
            },
            Phase::Value(slot) => return self.value(slot, c),
            _ if ws => {}
            _ => return Step::Bad,
        }
        Step::More
    }

    /// The member the key just read names; a repeated name or arguments member is refused, since the
    /// first may already have been streamed.
    fn slot(&mut self) -> Option<Slot> {
        let key: String = serde_json::from_str(&std::mem::take(&mut self.scratch)).ok()?;
        match key.as_str() {
            "name" if self.name.is_none() => Some(Slot::Name),
            "arguments" | "parameters" if !self.saw_args => {
                self.saw_args = true;
                Some(Slot::Args)
            }
            "name" | "arguments" | "parameters" => None,
            _ => Some(Slot::Other),
        }
    }

    fn value(&mut self, slot: Slot, c: char) -> Step {
        // The name must be a string and the arguments an object: anything else is refused at its first
        // character, before any of it is streamed.
        let first_ok = match slot {
            Slot::Name | Slot::Key => c == '"',
            Slot::Args => c == '{',
            Slot::Other => true,
        };
        if !self.value.started() && !first_ok && !matches!(c, ' ' | '\t' | '\n' | '\r') {
            return Step::Bad;
        }
        let out = if slot == Slot::Args { &mut self.args } else { &mut self.scratch };
        let step = self.value.feed(c, out);
        if !matches!(step, Step::Done | Step::DoneBefore) {
            return step;
        }
        self.value = Compactor::default();
        self.phase = match slot {
            Slot::Key => Phase::Colon,
            _ => Phase::Between,
        };
        match slot {
            Slot::Name => match serde_json::from_str::<String>(&std::mem::take(&mut self.scratch)) {
                Ok(name) if !name.is_empty() => self.name = Some(name),
                _ => return Step::Bad,
            },
            Slot::Args if self.bare => return Step::Done,
            Slot::Other => self.scratch.clear(),
            Slot::Key | Slot::Args => {}
        }
        // The member is complete, not the call: a number or literal still leaves its terminator to the top.
        if step == Step::DoneBefore { step } else { Step::More }
    }

    /// The closed call, checked by serde: its name and compact arguments; None if it is not a valid call.
    pub(super) fn finish(&self) -> Option<(String, String)> {
        let whole: Value = serde_json::from_str(&self.raw).ok()?;
        let args = if self.bare {
            &whole
        } else {
            let o = whole.as_object()?;
            if o.get("name")?.as_str()? != self.name.as_deref()? {
                return None;
            }
            o.get("arguments").or_else(|| o.get("parameters"))?
        };
        // A guard against this scanner misreading: the streamed text must say what serde read. (Where an
        // object repeats a key, the text keeps both and both readings keep the last value.)
        let streamed: Value = serde_json::from_str(&self.args).ok()?;
        if !args.is_object() || &streamed != args {
            return None;
        }
        Some((self.name.clone()?, self.args.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(text: &str) -> Option<String> {
        let (mut c, mut out) = (Compactor::default(), String::new());
        for ch in text.chars() {
            match c.feed(ch, &mut out) {
                Step::More => {}
                Step::Done => return Some(out),
                Step::DoneBefore | Step::Bad => return None,
            }
        }
        c.finish(&mut out).then_some(out)
    }

    #[test]
    fn compact_text_is_what_serde_writes() {
        let texts = [
            r#"{"city": "Paris", "days": 3}"#,
            r#" { "a" : [ 1 , 2.50, -3e2, 1E+2, true, false, null, { } , [ ] ] , "b" : { "c" : "d" } } "#,
            r#"{"s": "tab\there \"quoted\" back\\slash \/ \u00e9\u4e2d \ud83d\ude00 \b\f\n\r \u0001 \u001F"}"#,
            r#"{"emoji": "😀 naïve 東京", "big": 18446744073709551615, "neg": -9223372036854775808}"#,
            r#"{"f": 0.1, "g": 1.0, "h": 123456789012345678901234567890, "i": -0, "j": 1e-7}"#,
            r#""just a string""#,
            "42",
            "[1,\n2]",
        ];
        for text in texts {
            let want = serde_json::to_string(&serde_json::from_str::<Value>(text).unwrap()).unwrap();
            assert_eq!(compact(text).as_deref(), Some(want.as_str()), "{text}");
        }
    }

    #[test]
    fn compactor_refuses_what_serde_refuses() {
        for bad in [
            r#"{"a": 'x'}"#,
            r#"{"a": "\x"}"#,
            r#"{"a": "\ud800"}"#,
            r#"{"a": "\udc00"}"#,
            r#"{"a": "\ud800\u0041"}"#,
            "{\"a\": \"raw\u{1}control\"}",
            r#"{"a": 01}"#,
            r#"{"a": tru}"#,
            r#"{"a": 1e999}"#,
            "}",
        ] {
            assert_eq!(compact(bad), None, "{bad}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_escape_matches_serde() {
        for c in (0u32..0x300).chain([0x2028, 0x2029, 0xFEFF, 0x1F600]).filter_map(char::from_u32) {
            let mut out = String::from("\"");
            escape_into(&mut out, c);
            out.push('"');
            assert_eq!(out, serde_json::to_string(&c.to_string()).unwrap(), "U+{:04X}", c as u32);
        }
    }

    fn scan(text: &str, mut s: CallScanner) -> Option<(String, String)> {
        let mut chars = text.chars();
        for ch in chars.by_ref() {
            match s.feed(ch) {
                Step::More => {}
                Step::Done => break,
                Step::DoneBefore | Step::Bad => return None,
            }
        }
        if chars.next().is_some() {
            return None;
        }
        s.finish()
    }

    #[test]
    fn call_objects_read_as_name_and_compact_arguments() {
        let call = |n: &str, a: &str| Some((n.to_string(), a.to_string()));
        let obj = CallScanner::object;
        assert_eq!(scan(r#"{"name": "f", "arguments": {"a": 1}}"#, obj()), call("f", r#"{"a":1}"#));
        assert_eq!(scan(r#"{"arguments": {"a": [1, 2]}, "name": "f"}"#, obj()), call("f", r#"{"a":[1,2]}"#));
        assert_eq!(scan(r#"{"type": "function", "name": "f", "parameters": {}}"#, obj()), call("f", "{}"));
        assert_eq!(scan(r#"{"name": "f", "n": 5, "x": [true], "arguments": {}}"#, obj()), call("f", "{}"));
        assert_eq!(scan(r#"{"a": 1 }"#, CallScanner::bare_args("g".into())), call("g", r#"{"a":1}"#));
        assert_eq!(scan(r#"{"name": "f", "arguments": {"a": 1, "a": 2}}"#, obj()), call("f", r#"{"a":1,"a":2}"#));
        for bad in [
            r#"{"name": "f", "arguments": "{\"a\": 1}"}"#,
            r#"{"name": 3, "arguments": {}}"#,
            r#"{"name": "", "arguments": {}}"#,
            r#"{"arguments": {}}"#,
            r#"{"name": "f"}"#,
            r#"{"name": "f", "n": 5}"#,
            r#"{"name": "f", "arguments": {}, "parameters": {}}"#,
            r#"{"name": "f", "arguments": {"a": [1}}"#,
            r#"{"name": "f", "arguments": {"a": 1,}}"#,
            r#"{"name": "f" "arguments": {}}"#,
        ] {
            assert_eq!(scan(bad, obj()), None, "{bad}");
        }
    }
}
