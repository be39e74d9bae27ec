//! Turning a choice's tokens into the text a client sees: incremental detokenizing, stop strings (matched
//! on text, across token boundaries, cut from the output), what can be streamed without revealing a stop
//! string's beginning, and logprob entries in both of OpenAI's formats.

use serde_json::{Value, json};

use crate::{
    engine::contract::FinishReason,
    tokenizer::{IncrementalDecoder, Tokenizer},
};

/// One token's logprob entry.
#[derive(Debug, Clone)]
pub struct TokenLp {
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
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

pub struct ChoiceText {
    decoder: IncrementalDecoder,
    pub text: String,
    /// Bytes of `text` already streamed.
    sent: usize,
    /// Completion tokens consumed into this choice.
    pub tokens: usize,
    pub finish: Option<FinishReason>,
    pub logprobs: Vec<TokenLp>,
    /// Logprob entries not yet streamed.
    unsent_lp: usize,
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
            unsent_lp: 0,
        }
    }

    /// Adds a token; returns true if the text now contains a stop string (the choice is then finished with
    /// `stop` and the text cut before it).
    pub fn push(&mut self, tok: &Tokenizer, id: u32, lp: Option<(f32, &[(u32, f32)])>, stops: &[String]) -> bool {
        if self.finish.is_some() {
            return false;
        }
        self.tokens += 1;
        let before = self.text.len();
        if let Some((logprob, top)) = lp {
            let (text, bytes) = token_text(tok, id);
            let top = top
                .iter()
                .map(|&(t, l)| {
                    let (s, b) = token_text(tok, t);
                    (s, b, l)
                })
                .collect();
            self.logprobs.push(TokenLp { text, bytes, logprob, top, offset: before });
            self.unsent_lp += 1;
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

    /// Logprob entries not yet streamed.
    pub fn take_logprobs(&mut self) -> &[TokenLp] {
        let n = self.logprobs.len();
        let start = n - self.unsent_lp.min(n);
        self.unsent_lp = 0;
        &self.logprobs[start..]
    }
}

/// The legacy completions `logprobs` object.
pub fn completion_logprobs(entries: &[TokenLp]) -> Value {
    json!({
        "tokens": entries.iter().map(|e| &e.text).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| {
            e.top.iter().map(|(t, _, l)| (t.clone(), json!(l))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
    })
}

/// The chat `logprobs` object.
pub fn chat_logprobs(entries: &[TokenLp]) -> Value {
    json!({
        "content": entries.iter().map(|e| json!({
            "token": e.text,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top_logprobs": e.top.iter().map(|(t, b, l)| json!({"token": t, "logprob": l, "bytes": b})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "refusal": null,
    })
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
