//! The model's vocabulary as bytes, for llguidance: each token id's byte string (what it adds to the text)
//! in a [`TokTrie`], and a tokenizer for the text a grammar forces. Built from the `tokenizers` tokenizer
//! the API already uses, for the two ways Hugging Face tokenizers spell bytes: byte-level BPE (GPT-2's
//! printable-character map: Llama 3, Qwen2) and SentencePiece-style pieces with byte fallback (`<0x41>`
//! tokens and `▁` for a space: Llama 2, Mistral, stories260K).

use std::collections::HashMap;
use std::sync::Arc;

use tokenizers::{DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, normalizers, pre_tokenizers};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::Tokenizer;

/// How the tokenizer's pieces map to bytes, read from its decoder.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Spelling {
    /// GPT-2's map of bytes to printable characters.
    ByteLevel,
    /// `<0xNN>` pieces are bytes; `space` stands for a space in the others.
    ByteFallback { space: char },
}

fn spelling(d: &DecoderWrapper) -> Option<Spelling> {
    let (mut level, mut fallback, mut space) = (false, false, '▁');
    fn walk(d: &DecoderWrapper, level: &mut bool, fallback: &mut bool, space: &mut char) {
        match d {
            DecoderWrapper::ByteLevel(_) => *level = true,
            DecoderWrapper::ByteFallback(_) => *fallback = true,
            DecoderWrapper::Metaspace(m) => *space = m.get_replacement(),
            DecoderWrapper::Replace(r) => {
                // The pattern is private; its serialised form names it.
                let v = serde_json::to_value(r).unwrap_or_default();
                let one = v["pattern"]["String"].as_str().map(|s| s.chars().collect::<Vec<_>>());
                if v["content"] == " "
                    && let Some([c]) = one.as_deref()
                {
                    *space = *c;
                }
            }
            DecoderWrapper::Sequence(s) => {
                for d in s.get_decoders() {
                    walk(d, level, fallback, space);
                }
            }
            _ => {}
        }
    }
    walk(d, &mut level, &mut fallback, &mut space);
    match (level, fallback) {
        (true, _) => Some(Spelling::ByteLevel),
        (false, true) => Some(Spelling::ByteFallback { space }),
        // A Metaspace decoder without byte fallback: pieces are text with `space` for spaces.
        (false, false) if matches!(d, DecoderWrapper::Metaspace(_)) => Some(Spelling::ByteFallback { space }),
        _ => None,
    }
}

/// GPT-2's byte-to-character map, inverted: printable bytes stand for themselves, the rest were shifted
/// to code points from U+0100 on, in byte order.
fn byte_level_map() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                next += 1;
                (char::from_u32(next - 1).expect("below U+0200"), b)
            }
        })
        .collect()
}

/// A copy of the tokenizer that tokenizes a grammar's forced text as it stands: without the space that
/// SentencePiece-style normalizers put before the first word.
fn without_prefix_space(mut t: tokenizers::Tokenizer) -> tokenizers::Tokenizer {
    fn norm(n: NormalizerWrapper) -> Option<NormalizerWrapper> {
        match n {
            NormalizerWrapper::Prepend(_) => None,
            NormalizerWrapper::Sequence(s) => {
                let kept: Vec<_> = s.as_ref().iter().filter_map(|n| norm(n.clone())).collect();
                (!kept.is_empty()).then(|| NormalizerWrapper::Sequence(normalizers::Sequence::new(kept)))
            }
            n => Some(n),
        }
    }
    fn pre(p: PreTokenizerWrapper) -> PreTokenizerWrapper {
        match p {
            PreTokenizerWrapper::Metaspace(mut m) => {
                m.prepend_scheme = pre_tokenizers::metaspace::PrependScheme::Never;
                PreTokenizerWrapper::Metaspace(m)
            }
            PreTokenizerWrapper::Sequence(s) => PreTokenizerWrapper::Sequence(pre_tokenizers::sequence::Sequence::new(
                s.as_ref().iter().map(|p| pre(p.clone())).collect(),
            )),
            p => p,
        }
    }
    if let Some(n) = t.get_normalizer().cloned() {
        t.with_normalizer(norm(n));
    }
    if let Some(p) = t.get_pre_tokenizer().cloned() {
        t.with_pre_tokenizer(Some(pre(p)));
    }
    t
}

/// The byte string of every id in `0..vocab_size` (the model's vocabulary, which may be larger than the
/// tokenizer's: ids past the tokenizer's are placeholders no grammar can produce). Special tokens are
/// spelt as llguidance marks them, so that text can never produce them.
fn token_bytes(t: &tokenizers::Tokenizer, spelling: Spelling, vocab_size: usize) -> Vec<Vec<u8>> {
    let special = |name: &str| {
        let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        b.extend_from_slice(name.as_bytes());
        b
    };
    let added = t.get_added_tokens_decoder();
    let map = byte_level_map();
    (0..vocab_size as u32)
        .map(|id| {
            if let Some(a) = added.get(&id) {
                return if a.special { special(&a.content) } else { a.content.clone().into_bytes() };
            }
            let Some(piece) = t.id_to_token(id) else { return special(&format!("<[{id}]>")) };
            match spelling {
                Spelling::ByteLevel => match piece.chars().map(|c| map.get(&c).copied()).collect::<Option<Vec<u8>>>() {
                    Some(b) => b,
                    // A piece outside the byte map cannot be written as bytes: never allowed.
                    None => special(&piece),
                },
                Spelling::ByteFallback { space } => {
                    let hex = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                    match hex.filter(|h| h.len() == 2).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(b) => vec![b],
                        None => piece.replace(space, " ").into_bytes(),
                    }
                }
            }
        })
        .collect()
}

struct Env {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
        })
    }
}

/// The vocabulary of `tokenizer` for a model of `vocab_size` ids, or why it cannot be had.
pub fn tok_env(tokenizer: &Tokenizer, vocab_size: usize) -> Result<TokEnv, String> {
    let hf = tokenizer.hf();
    let spelling = hf
        .get_decoder()
        .and_then(spelling)
        .ok_or("the tokenizer's decoder is neither byte-level nor byte-fallback, so its tokens' bytes are unknown")?;
    if vocab_size < hf.get_vocab_size(true) {
        // The model cannot produce the tokenizer's last ids; they are left out.
        tracing::debug!(
            vocab_size,
            tokenizer = hf.get_vocab_size(true),
            "tokenizer larger than the model's vocabulary"
        );
    }
    let words = token_bytes(hf, spelling, vocab_size);
    let eos = &tokenizer.eos_token_ids;
    let Some(&first_eos) = eos.iter().find(|&&e| (e as usize) < vocab_size) else {
        return Err("the model has no end-of-sequence token".into());
    };
    let mut info = TokRxInfo::new(vocab_size as u32, first_eos);
    info.tok_bos = tokenizer.bos_token_id;
    let mut trie = TokTrie::from(&info, &words);
    let eos: Vec<u32> = eos.iter().copied().filter(|&e| (e as usize) < vocab_size).collect();
    if eos.len() > 1 {
        trie = trie.with_eos_tokens(&eos);
    }
    Ok(Arc::new(Env { trie, tokenizer: without_prefix_space(hf.clone()) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_map_covers_every_byte_once() {
        let m = byte_level_map();
        assert_eq!(m.len(), 256);
        let mut bytes: Vec<u8> = m.values().copied().collect();
        bytes.sort();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(m[&'A'], b'A');
        // GPT-2 writes a space as Ġ (U+0120) and a newline as Ċ (U+010A).
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
    }

    #[test]
    fn the_default_models_pieces_spell_their_decoded_text() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
        let tok = Tokenizer::load(&dir).unwrap();
        let env = tok_env(&tok, 512).unwrap();
        let trie = env.tok_trie();
        // Every ordinary token's bytes are what the tokenizer decodes it to, after a word before it.
        let word = tok.encode("a", false).unwrap();
        for id in 3..512u32 {
            let mut ids = word.clone();
            ids.push(id);
            let text = tok.decode(&ids).unwrap();
            let ours = String::from_utf8_lossy(trie.token(id)).to_string();
            if trie.token(id).len() == 1 && trie.token(id)[0] >= 0x80 {
                continue; // a lone UTF-8 continuation byte decodes to U+FFFD
            }
            assert_eq!(format!("a{ours}"), text, "token {id}");
        }
        assert!(trie.is_special_token(tok.eos_token_ids[0]));
        // The forced text of a grammar tokenizes without a space before it.
        let ids = env.tokenize_bytes(b"{\"a\"");
        assert_eq!(tok.decode(&ids).unwrap(), "{\"a\"");
    }
}
