//! Turning a choice's tokens into the text a client sees: incremental detokenizing, stop strings (matched
//! on text, across token boundaries, cut from the output), what can be streamed without revealing a stop
//! string's beginning, and logprob entries in both of OpenAI's formats.
//!
//! A logprob entry is kept as the engine sent it (token ids and numbers, about 200 bytes with 20
//! alternatives) and turned into text only while it is written out, straight into the response: a whole
//! response with logprobs holds little more than its own bytes.

use serde::{
    Serialize, Serializer,
    ser::{SerializeMap, SerializeSeq},
};

use tessera_proto::step::Sampled;

use crate::{
    engine::contract::FinishReason,
    tokenizer::{IncrementalDecoder, Tokenizer},
};

/// One token's logprob entry, as the engine reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLp {
    pub token: u32,
    pub logprob: f32,
    /// The alternatives, most likely first.
    pub top: Vec<(u32, f32)>,
    /// Byte offset of the token's text in the choice's text.
    pub offset: usize,
}

/// A token's text as a client wants to see it alone: SentencePiece word marks become spaces, byte-fallback
/// tokens become their byte.
pub fn token_text(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let piece = tok.id_to_token(id).unwrap_or_default();
    let bytes = if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        u8::from_str_radix(hex, 16).map(|b| vec![b]).unwrap_or_else(|_| piece.clone().into_bytes())
    } else if piece.contains('\u{2581}') {
        piece.replace('\u{2581}', " ").into_bytes()
    } else {
        tok.decode(&[id]).unwrap_or(piece).into_bytes()
    };
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// A choice's prompt, for `echo` and prompt logprobs: its text as the client sees it, its tokens with their
/// offsets in that text, and each position's score once the workers have sent it (the first position has
/// none: nothing comes before it).
pub struct PromptEcho {
    pub text: String,
    tokens: Vec<u32>,
    offsets: Vec<usize>,
    scores: Vec<Option<Score>>,
    /// The echo has gone out on the stream.
    pub sent: bool,
}

/// A prompt token's logprob, its alternatives and its rank.
#[derive(Debug, Clone, PartialEq)]
struct Score {
    logprob: f32,
    top: Vec<(u32, f32)>,
    rank: u32,
}

impl PromptEcho {
    /// `text`: the prompt as the client sent it; `None` (sent as token ids) decodes it.
    pub fn new(tok: &Tokenizer, prompt: &[u32], text: Option<&str>) -> Self {
        let mut decoder = IncrementalDecoder::new(&[]);
        let mut decoded = String::new();
        let mut offsets = Vec::with_capacity(prompt.len());
        for &t in prompt {
            offsets.push(decoded.len());
            decoded.push_str(&decoder.push(tok, t).unwrap_or_default());
        }
        decoded.push_str(&decoder.finish(tok).unwrap_or_default());
        let text = text.map_or(decoded, str::to_string);
        // Offsets are into the decoded text; the sent text may differ slightly (normalization), never past it.
        let offsets = offsets.into_iter().map(|o| o.min(text.len())).collect();
        PromptEcho { text, tokens: prompt.to_vec(), offsets, scores: vec![None; prompt.len()], sent: false }
    }

    /// Scores from the workers for positions `first..`; the first score of a position is kept (a recompute
    /// after a preemption or a failover sends them again).
    pub fn record(&mut self, first: usize, tokens: &[Sampled], ranks: &[u32]) {
        for (i, (t, &rank)) in tokens.iter().zip(ranks).enumerate() {
            if let Some(slot @ None) = self.scores.get_mut(first + i) {
                *slot = Some(Score { logprob: t.logprob.unwrap_or(f32::NAN), top: t.top_logprobs.clone(), rank });
            }
        }
    }

    /// The prompt's logprob entries with `k` alternatives, in the legacy completions' shape: the first token
    /// (and any position never scored) has a NaN logprob, written as `null` with `null` alternatives.
    pub fn entries(&self, k: usize) -> Vec<TokenLp> {
        self.tokens
            .iter()
            .zip(&self.offsets)
            .zip(&self.scores)
            .map(|((&token, &offset), score)| match score {
                Some(s) => TokenLp { token, logprob: s.logprob, top: s.top[..k.min(s.top.len())].to_vec(), offset },
                None => TokenLp { token, logprob: f32::NAN, top: Vec::new(), offset },
            })
            .collect()
    }
}

pub struct ChoiceText {
    decoder: IncrementalDecoder,
    pub text: String,
    /// Bytes of `text` already streamed.
    sent: usize,
    /// Completion tokens consumed into this choice.
    pub tokens: usize,
    pub finish: Option<FinishReason>,
    /// Logprob entries: all of them for a whole response, those not yet sent for a stream.
    pub logprobs: Vec<TokenLp>,
    /// The prompt, when the request echoes it or asks for its logprobs.
    pub prompt: Option<PromptEcho>,
}

impl ChoiceText {
    pub fn new(prompt: &[u32]) -> Self {
        ChoiceText {
            decoder: IncrementalDecoder::new(prompt),
            text: String::new(),
            sent: 0,
            tokens: 0,
            finish: None,
            logprobs: Vec::new(),
            prompt: None,
        }
    }

    pub fn with_prompt(mut self, prompt: Option<PromptEcho>) -> Self {
        self.prompt = prompt;
        self
    }

    /// Adds a token; returns true if the text now contains a stop string (the choice is then finished with
    /// `stop` and the text cut before it).
    pub fn push(&mut self, tok: &Tokenizer, id: u32, lp: Option<(f32, Vec<(u32, f32)>)>, stops: &[String]) -> bool {
        if self.finish.is_some() {
            return false;
        }
        self.tokens += 1;
        let before = self.text.len();
        if let Some((logprob, top)) = lp {
            self.logprobs.push(TokenLp { token: id, logprob, top, offset: before });
        }
        let piece = self.decoder.push(tok, id).unwrap_or_default();
        self.text.push_str(&piece);
        self.check_stops(before, stops)
    }

    fn check_stops(&mut self, before: usize, stops: &[String]) -> bool {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        if longest == 0 {
            return false;
        }
        // A stop may straddle earlier text: search from `longest` bytes before the new piece.
        let mut from = before.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        match hit {
            Some(at) => {
                self.text.truncate(at);
                self.sent = self.sent.min(at);
                self.finish = Some(FinishReason::Stop);
                true
            }
            None => false,
        }
    }

    /// Ends the choice (the engine finished it): flushes text held back for incomplete characters.
    pub fn end(&mut self, tok: &Tokenizer, reason: FinishReason, stops: &[String]) {
        if self.finish.is_some() {
            return;
        }
        let before = self.text.len();
        let rest = self.decoder.finish(tok).unwrap_or_default();
        self.text.push_str(&rest);
        if !self.check_stops(before, stops) {
            self.finish = Some(reason);
        }
    }

    /// Text that can be streamed now: all of it once finished, else all but a tail that could be the start
    /// of a stop string.
    pub fn take_delta(&mut self, stops: &[String]) -> String {
        let mut end = self.text.len();
        if self.finish.is_none() {
            let mut hold = 0;
            for s in stops {
                for (k, _) in s.char_indices().skip(1) {
                    if self.text.ends_with(&s[..k]) {
                        hold = hold.max(k);
                    }
                }
            }
            end -= hold;
        }
        let delta = self.text.get(self.sent..end).unwrap_or_default().to_string();
        self.sent = self.sent.max(end);
        delta
    }

    /// Logprob entries not yet streamed (a stream sends each once and keeps none).
    pub fn take_logprobs(&mut self) -> Vec<TokenLp> {
        std::mem::take(&mut self.logprobs)
    }
}

/// A choice's `logprobs` object, in the shape its endpoint answers with, written from the entries as they
/// are (the text of each token and alternative is looked up while writing).
///
/// The output is byte for byte what serializing a `serde_json::Value` of it gives (this crate's
/// `serde_json` keeps object keys sorted): keys in sorted order, each logprob widened to `f64` (a
/// non-finite one is `null`), and the legacy `top_logprobs` an object keyed by the alternatives' text, so
/// that of two alternatives with the same text only the later one is kept.
pub struct LogprobsJson<'a> {
    pub chat: bool,
    pub tok: &'a Tokenizer,
    pub entries: &'a [TokenLp],
}

impl<'a> Serialize for LogprobsJson<'a> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (tok, entries) = (self.tok, self.entries);
        let mut m = s.serialize_map(Some(if self.chat { 2 } else { 4 }))?;
        if self.chat {
            m.serialize_entry("content", &column(entries, |e| ChatEntry { tok, e }))?;
            m.serialize_entry("refusal", &())?;
        } else {
            m.serialize_entry("text_offset", &column(entries, |e| e.offset))?;
            m.serialize_entry("token_logprobs", &column(entries, |e| f64::from(e.logprob)))?;
            m.serialize_entry("tokens", &column(entries, |e| token_text(tok, e.token).0))?;
            // A prompt's first token has no logprob, and no alternatives: `null` for both.
            let top = |e: &'a TokenLp| (!e.logprob.is_nan()).then_some(TopMap { tok, top: &e.top });
            m.serialize_entry("top_logprobs", &column(entries, top))?;
        }
        m.end()
    }
}

/// vLLM's `prompt_logprobs` of a choice: `null` for the first token, then per token an object keyed by
/// token id of the prompt's token and its alternatives, each `{logprob, rank, decoded_token}` (an
/// alternative's rank is its place among them).
pub struct PromptLogprobsJson<'a> {
    pub tok: &'a Tokenizer,
    pub prompt: &'a PromptEcho,
    /// Alternatives per position.
    pub k: usize,
}

impl Serialize for PromptLogprobsJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.prompt;
        let mut seq = s.serialize_seq(Some(p.tokens.len()))?;
        for (&token, score) in p.tokens.iter().zip(&p.scores) {
            match score {
                None => seq.serialize_element(&())?,
                Some(sc) => seq.serialize_element(&PositionLogprobs { tok: self.tok, token, score: sc, k: self.k })?,
            }
        }
        seq.end()
    }
}

struct PositionLogprobs<'a> {
    tok: &'a Tokenizer,
    token: u32,
    score: &'a Score,
    k: usize,
}

impl Serialize for PositionLogprobs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Entry {
            decoded_token: String,
            logprob: f64,
            rank: u32,
        }
        let entry = |id: u32, logprob: f32, rank: u32| Entry {
            decoded_token: token_text(self.tok, id).0,
            logprob: f64::from(logprob),
            rank,
        };
        let mut m = s.serialize_map(None)?;
        m.serialize_entry(&self.token.to_string(), &entry(self.token, self.score.logprob, self.score.rank))?;
        for (i, &(id, lp)) in self.score.top.iter().take(self.k).enumerate() {
            if id != self.token {
                m.serialize_entry(&id.to_string(), &entry(id, lp, i as u32 + 1))?;
            }
        }
        m.end()
    }
}

/// A JSON array of one value per entry.
struct Column<'a, F>(&'a [TokenLp], F);

fn column<'a, F: Fn(&'a TokenLp) -> T, T: Serialize>(entries: &'a [TokenLp], value: F) -> Column<'a, F> {
    Column(entries, value)
}

impl<'a, F, T> Serialize for Column<'a, F>
where
    F: Fn(&'a TokenLp) -> T,
    T: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for e in self.0 {
            seq.serialize_element(&(self.1)(e))?;
        }
        seq.end()
    }
}

/// The legacy completions' alternatives: `{text: logprob}`, keys sorted, the later of equal keys kept.
struct TopMap<'a> {
    tok: &'a Tokenizer,
    top: &'a [(u32, f32)],
}

impl Serialize for TopMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut top: Vec<(String, f32)> = self.top.iter().map(|&(t, l)| (token_text(self.tok, t).0, l)).collect();
        // Stable: among equal texts the later stays last, and is the one written.
        top.sort_by(|a, b| a.0.cmp(&b.0));
        let mut m = s.serialize_map(None)?;
        for (i, (text, l)) in top.iter().enumerate() {
            if top.get(i + 1).is_none_or(|next| next.0 != *text) {
                m.serialize_entry(text, &f64::from(*l))?;
            }
        }
        m.end()
    }
}

/// One token of chat's `logprobs.content`.
struct ChatEntry<'a> {
    tok: &'a Tokenizer,
    e: &'a TokenLp,
}

impl Serialize for ChatEntry<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (text, bytes) = token_text(self.tok, self.e.token);
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("bytes", &bytes)?;
        m.serialize_entry("logprob", &f64::from(self.e.logprob))?;
        m.serialize_entry("token", &text)?;
        m.serialize_entry("top_logprobs", &ChatAlternatives(self.tok, &self.e.top))?;
        m.end()
    }
}

/// Chat's alternatives of one token: `[{bytes, logprob, token}]`.
struct ChatAlternatives<'a>(&'a Tokenizer, &'a [(u32, f32)]);

impl Serialize for ChatAlternatives<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.1.len()))?;
        for &(t, l) in self.1 {
            let (text, bytes) = token_text(self.0, t);
            seq.serialize_element(&Alternative { bytes, logprob: f64::from(l), token: text })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct Alternative {
    bytes: Vec<u8>,
    logprob: f64,
    token: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::load(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K")).unwrap()
    }

    #[test]
    fn stop_strings_cut_the_text_even_across_tokens_and_are_held_back_while_streaming() {
        let t = tok();
        let prompt = t.encode_prompt("Once upon a time").unwrap();
        let ids = t.encode(" there was a little girl named Lily. She loved", false).unwrap();
        let stops = vec!["Lily.".to_string()];
        let mut c = ChoiceText::new(&prompt);
        let mut streamed = String::new();
        let mut stopped = false;
        for &id in &ids {
            if c.push(&t, id, None, &stops) {
                stopped = true;
                break;
            }
            streamed.push_str(&c.take_delta(&stops));
            assert!(!streamed.contains("Lil"), "a stop string's beginning leaked: {streamed:?}");
        }
        assert!(stopped);
        streamed.push_str(&c.take_delta(&stops));
        assert_eq!(c.finish, Some(FinishReason::Stop));
        assert_eq!(c.text, streamed);
        assert!(c.text.ends_with("named "), "{:?}", c.text);
    }

    /// The `Value`s the logprobs objects were built as before they were written from the entries directly:
    /// the format the writer must keep, byte for byte.
    fn reference(tok: &Tokenizer, entries: &[TokenLp], chat: bool) -> serde_json::Value {
        use serde_json::json;
        let text = |id| token_text(tok, id);
        if chat {
            json!({
                "content": entries.iter().map(|e| json!({
                    "token": text(e.token).0,
                    "logprob": e.logprob,
                    "bytes": text(e.token).1,
                    "top_logprobs": e.top.iter().map(|&(t, l)| json!({"token": text(t).0, "logprob": l, "bytes": text(t).1})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "refusal": null,
            })
        } else {
            json!({
                "tokens": entries.iter().map(|e| text(e.token).0).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                "top_logprobs": entries.iter().map(|e| {
                    e.top.iter().map(|&(t, l)| (text(t).0, json!(l))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            })
        }
    }

    #[test]
    fn logprobs_are_written_as_their_value_was_including_equal_texts_and_infinities() {
        let t = tok();
        let words = t.encode(" there was a little girl", false).unwrap();
        // Bytes that are not characters alone: different tokens with the same text ("\u{fffd}").
        let high_byte = |id: u32| t.id_to_token(id).is_some_and(|p| p.starts_with("<0x") && p.as_str() >= "<0x80>");
        let bytes: Vec<u32> = (0..t.vocab_size() as u32).filter(|&id| high_byte(id)).take(3).collect();
        assert_eq!(bytes.len(), 3);
        assert_eq!(token_text(&t, bytes[0]).0, token_text(&t, bytes[1]).0);
        let entries = [
            TokenLp {
                token: words[0],
                logprob: -0.1,
                top: vec![(words[0], -0.1), (words[1], -2.5), (bytes[0], -3.0)],
                offset: 0,
            },
            TokenLp {
                token: bytes[1],
                logprob: f32::NEG_INFINITY,
                top: vec![(bytes[0], -1.25), (words[2], -1e-7), (bytes[1], -7.0), (bytes[2], f32::NAN)],
                offset: 6,
            },
            TokenLp { token: words[3], logprob: -0.333_333_34, top: vec![], offset: 6 },
        ];
        for chat in [false, true] {
            for entries in [&entries[..], &entries[..0]] {
                // Parsed back, as a client reads it (the keys are written sorted; a `Value` keeps them in the
                // order they were inserted).
                let written = serde_json::to_string(&LogprobsJson { chat, tok: &t, entries }).unwrap();
                let read: serde_json::Value = serde_json::from_str(&written).unwrap();
                assert_eq!(read, reference(&t, entries, chat), "chat: {chat}");
                let value = serde_json::to_value(LogprobsJson { chat, tok: &t, entries }).unwrap();
                assert_eq!(value, reference(&t, entries, chat));
            }
        }
        // The later of two alternatives with the same text is the one kept.
        let written = serde_json::to_string(&LogprobsJson { chat: false, tok: &t, entries: &entries[1..2] }).unwrap();
        assert!(written.contains("\"\u{fffd}\":null}"), "{written}");
    }

    #[test]
    fn token_text_turns_pieces_into_client_text() {
        let t = tok();
        let id = t.encode(" there", false).unwrap()[0];
        let (s, _) = token_text(&t, id);
        assert!(s.starts_with(' '), "{s:?}");
        let nl = t.encode("\n", false).unwrap();
        let (s, b) = token_text(&t, *nl.last().unwrap());
        assert_eq!((s.as_str(), b.as_slice()), ("\n", b"\n".as_slice()));
    }
}
