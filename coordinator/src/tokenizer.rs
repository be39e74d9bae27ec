//! Text ↔ token ids for a model directory: `tokenizer.json` through the `tokenizers` crate, special tokens
//! and BOS handling from `tokenizer_config.json`, EOS ids from `generation_config.json`/`config.json`.
//! For a GGUF file, the same from its `tokenizer.*` metadata ([`crate::gguf_tokenizer`]); a Hugging Face
//! `tokenizer.json` in the file's directory wins over the file's own (the directory is then read as a model
//! directory's would be), as llama.cpp users sometimes ship the original tokenizer beside a GGUF.
//!
//! [`IncrementalDecoder`] turns a growing list of ids into text pieces for streaming. It decodes a short
//! window of earlier tokens together with the new ones (so word-boundary spaces come out right) and holds
//! back text that ends in an incomplete UTF-8 sequence, so a character split across byte-fallback tokens
//! is never emitted half-way.

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// A GGUF file's tokenizer metadata (the message names the file and the key).
    #[error("{0}")]
    Gguf(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    add_bos: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The raw `tokenizer_config.json` (chat template and friends are read from it by the API layer).
    pub config: Value,
}

/// Largest tokenizer file read: a 256k-entry vocabulary with its merges is tens of megabytes.
const MAX_FILE_BYTES: u64 = 256 << 20;

/// `path` is a regular file of a sane size, checked before it is opened: opening a FIFO blocks until a
/// writer comes, and a device may never end. `Ok(false)` if it does not exist.
fn check_file(path: &Path) -> Result<bool, TokenizerError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(TokenizerError::File { path: path.into(), message: format!("cannot read: {e}") }),
    };
    if !meta.is_file() {
        return Err(TokenizerError::File { path: path.into(), message: "not a regular file".into() });
    }
    if meta.len() > MAX_FILE_BYTES {
        let message = format!("{} bytes, more than the {MAX_FILE_BYTES} a tokenizer file may have", meta.len());
        return Err(TokenizerError::File { path: path.into(), message });
    }
    Ok(true)
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !check_file(path)? {
        return Ok(None);
    }
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TokenizerError::File { path: path.into(), message: format!("not valid JSON: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TokenizerError::File { path: path.into(), message: format!("cannot read: {e}") }),
    }
}

/// A special-token entry of tokenizer_config.json: a plain string or an AddedToken object.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        Some(v) => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        None => vec![],
    }
}

impl Tokenizer {
    /// The tokenizer of a model directory, or of a GGUF file (unless a `tokenizer.json` sits beside it).
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        if !path.is_file() {
            return Self::load_dir(path);
        }
        if let Some(dir) = path.parent()
            && check_file(&dir.join("tokenizer.json"))?
        {
            return Self::load_dir(dir);
        }
        let g = crate::gguf_tokenizer::load(path).map_err(TokenizerError::Gguf)?;
        // What the API layer reads from tokenizer_config.json.
        let mut config = serde_json::json!({
            "add_bos_token": g.add_bos, "bos_token": g.bos_token, "eos_token": g.eos_token,
        });
        if let Some(t) = &g.chat_template {
            config["chat_template"] = Value::String(t.clone());
        }
        Ok(Tokenizer {
            inner: g.tokenizer,
            bos_token_id: g.bos_token_id,
            eos_token_ids: g.eos_token_ids,
            add_bos: g.add_bos,
            bos_token: g.bos_token,
            eos_token: g.eos_token,
            config,
        })
    }

    fn load_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !check_file(&path)? {
            return Err(TokenizerError::File {
                path,
                message: "missing (the model directory needs a tokenizer.json)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| TokenizerError::File { path: path.clone(), message: format!("cannot load: {e}") })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let bos_token = token_str(config.get("bos_token"));
        let eos_token = token_str(config.get("eos_token"));
        let gen_cfg = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let model_cfg = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let mut eos_token_ids = ids(gen_cfg.get("eos_token_id"));
        if eos_token_ids.is_empty() {
            eos_token_ids = ids(model_cfg.get("eos_token_id"));
        }
        if eos_token_ids.is_empty()
            && let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t))
        {
            eos_token_ids.push(id);
        }
        let bos_token_id = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| ids(gen_cfg.get("bos_token_id")).first().copied())
            .or_else(|| ids(model_cfg.get("bos_token_id")).first().copied());
        let add_bos = config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        Ok(Tokenizer { inner, bos_token_id, eos_token_ids, add_bos, bos_token, eos_token, config })
    }

    /// The `tokenizers` tokenizer itself (constrained decoding reads its vocabulary).
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes a prompt as the model expects it: special tokens added by the tokenizer's post-processor,
    /// and BOS prepended when `add_bos_token` asks for it and the post-processor did not.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.encode(text, true)?;
        if self.add_bos
            && let Some(bos) = self.bos_token_id
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Encodes text; `special` adds the post-processor's special tokens.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, special).map_err(|e| TokenizerError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_with(ids, true)
    }

    /// Decodes ids to text, with or without the special tokens among them.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Tokenize(e.to_string()))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Tokens of left context decoded with new ones, so that spaces at word starts come out as they would in
/// a full decode (SentencePiece-style decoders strip a leading space).
const CONTEXT_TOKENS: usize = 5;

/// Streams text from a growing id sequence.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the context window.
    prefix: usize,
    /// Ids before this index have been emitted as text.
    read: usize,
}

impl IncrementalDecoder {
    /// Starts after `prompt`: only text of ids pushed later is emitted.
    pub fn new(prompt: &[u32]) -> Self {
        IncrementalDecoder {
            ids: prompt.to_vec(),
            prefix: prompt.len().saturating_sub(CONTEXT_TOKENS),
            read: prompt.len(),
        }
    }

    /// Adds one id and returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        self.emit(tok, false)
    }

    /// Returns whatever text is still held back (at the end of generation).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        self.emit(tok, true)
    }

    fn emit(&mut self, tok: &Tokenizer, flush: bool) -> Result<String, TokenizerError> {
        if self.read >= self.ids.len() {
            return Ok(String::new());
        }
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let all = tok.decode(&self.ids[self.prefix..])?;
        // An incomplete UTF-8 sequence decodes to U+FFFD; wait for the bytes that complete it.
        if !flush && all.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let piece = match all.strip_prefix(&before) {
            Some(p) => p.to_string(),
            // The decoder rewrote earlier text (rare normalisation effects): emit from the first difference.
            None => {
                let common = before.char_indices().zip(all.chars()).take_while(|((_, a), b)| a == b).count();
                all.chars().skip(common).collect()
            }
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokenizer_file_that_is_not_a_regular_file_is_an_error_not_a_hang() {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let tmp = tempfile::tempdir().unwrap();
            for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
                std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
            }
            std::fs::remove_file(tmp.path().join(name)).unwrap();
            let ok = std::process::Command::new("mkfifo").arg(tmp.path().join(name)).status().unwrap().success();
            assert!(ok);
            let dir = tmp.path().to_path_buf();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(Tokenizer::load(&dir).err().map(|e| e.to_string()));
            });
            let e = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("loading a tokenizer whose {name} is a FIFO hangs"))
                .expect("a FIFO is refused");
            assert!(e.contains(name) && e.contains("not a regular file"), "{name}: {e}");
        }
    }

    fn tok() -> Tokenizer {
        Tokenizer::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K")).unwrap()
    }

    #[test]
    fn encodes_prompts_like_transformers() {
        let t = tok();
        // From golden.json: transformers' ids for this prompt (BOS from the post-processor).
        assert_eq!(t.encode_prompt("Once upon a time").unwrap(), [1, 403, 407, 261, 378]);
        assert_eq!(t.bos_token_id, Some(1));
        assert_eq!(t.eos_token_ids, [2]);
        assert!(t.is_eos(2));
    }

    #[test]
    fn incremental_text_equals_full_decode_and_never_splits_characters() {
        let t = tok();
        let prompt = t.encode_prompt("Once upon a time").unwrap();
        // Byte-fallback tokens: "é" is two bytes, "🐈" four, each its own token when not in the vocab.
        let text = " there was a café with a 🐈 named Lily.";
        let new = t.encode(text, false).unwrap();
        let mut d = IncrementalDecoder::new(&prompt);
        let mut out = String::new();
        for &id in &new {
            let piece = d.push(&t, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "emitted a broken character: {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&d.finish(&t).unwrap());
        let mut all = prompt.clone();
        all.extend(&new);
        let full = t.decode(&all).unwrap();
        assert_eq!(format!("Once upon a time{out}"), full);
        assert!(out.contains("🐈") && out.contains("café"), "{out}");
    }
}
