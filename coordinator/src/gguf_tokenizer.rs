//! A `tokenizers::Tokenizer`, its special tokens and its chat template from a GGUF file's `tokenizer.*`
//! metadata, for the two vocabularies llama.cpp's converter writes for Llama-family models. It builds the
//! `tokenizer.json` the Hugging Face model had, so that ids come out as that model's own tokenizer gives
//! them (`testdata/gguf-models/tokenizer_cases.json` holds a few hundred lines and their Hugging Face ids).
//!
//! - **`llama`** (SentencePiece-style BPE, Llama 2, Mistral, TinyLlama): `tokenizer.ggml.tokens`, `scores`
//!   and `token_type` (normal, unknown, control, user-defined, unused, byte). The merges are not in the file:
//!   they are rebuilt as transformers rebuilds them from a SentencePiece model: every normal token that
//!   splits into two vocabulary tokens is a merge, ranked by the token's score (highest first; equal
//!   scores in id order, which is also how a converter that wrote every score as -1000 (from a
//!   tokenizer.json without tokenizer.model) left them ranked). Spaces become `▁`, with one prepended to the
//!   text (and after each special token, as llama.cpp does) unless `tokenizer.ggml.add_space_prefix` is
//!   false; characters without a token fall back to their bytes `<0xNN>`.
//! - **`gpt2`** (byte-level BPE, Llama 3, Qwen2, SmolLM): tokens, `tokenizer.ggml.merges`, and the
//!   pre-tokenizer regexes chosen by `tokenizer.ggml.pre` as llama.cpp's `llama-vocab.cpp` chooses them:
//!   `default` (its four regexes in turn), the llama3 family (`llama3`, `llama-bpe`, ...: whole words found
//!   in the vocabulary skip the merges, BOS added by default), `qwen2` (digits one by one), `gpt-2` and
//!   `smollm` (GPT-2's regex, after `smollm` splits digits). Regexes are written as the models'
//!   tokenizer.json files write them (llama.cpp spells `(?i:'s|...)` out by hand, as its engine lacks it).
//!   Another `pre` is refused by name.
//!
//! Control and unknown tokens become special added tokens, user-defined ones plain added tokens; BOS and
//! EOS are added when `tokenizer.ggml.add_bos_token` / `add_eos_token` say so (llama.cpp's defaults
//! otherwise). The ids that end generation are llama.cpp's: `eos_token_id`, `eot_token_id`,
//! `eom_token_id`, and the control tokens it recognises by their text (`<|eot_id|>`, `<|im_end|>`, ...).
//! The chat template is `tokenizer.chat_template`. Every missing or mistyped key is an error naming the
//! file and the key.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};
use tessera_gguf::{GgufFile, Metadata};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// GPT-2's pre-tokenizer regex (llama.cpp's, which leaves unmatched whitespace as its own piece, as the
/// trailing `|\s+` of Hugging Face's ByteLevel regex does).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEFAULT: [&str; 4] = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];

/// Control tokens llama.cpp treats as the end of generation by their text.
const EOG_TEXTS: [&str; 10] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<EOT>",
    "<eos>",
    "<｜end▁of▁sentence｜>",
];

/// A tokenizer read from a GGUF file.
pub struct GgufTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation.
    pub eos_token_ids: Vec<u32>,
    /// Whether encoding a prompt adds BOS (the post-processor does it).
    pub add_bos: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

/// The pre-tokenizer of a `gpt2` vocabulary: the regexes in turn, whether whole words skip the merges, and
/// whether BOS is added by default (llama.cpp's table in `llama-vocab.cpp`).
fn bpe_pre(pre: &str) -> Option<(Vec<&'static str>, bool, bool)> {
    Some(match pre {
        "default" => (DEFAULT.to_vec(), false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
            (vec![LLAMA3], true, true)
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan" => {
            (vec![QWEN2], false, false)
        }
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" => (vec![GPT2], false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            (vec![r"\p{N}", GPT2], false, false)
        }
        _ => return None,
    })
}

/// Reads the tokenizer of the GGUF file at `path`. Errors name the file and the key.
pub fn load(path: &Path) -> Result<GgufTokenizer, String> {
    let file = GgufFile::open(path).map_err(|e| e.to_string())?;
    from_file(&file)
}

/// The tokenizer of an opened GGUF file.
pub fn from_file(file: &GgufFile) -> Result<GgufTokenizer, String> {
    let model = file.metadata().get_str("tokenizer.ggml.model").map_err(gguf_err)?;
    let v = Vocab::read(file)?;
    let parts = match model {
        "llama" => v.sentencepiece()?,
        "gpt2" => v.byte_level()?,
        other => {
            return Err(v.err(
                "tokenizer.ggml.model",
                format!(
                    "unsupported tokenizer {other:?}; supported: llama (SentencePiece-style BPE), gpt2 (byte-level BPE)"
                ),
            ));
        }
    };
    let add_bos = v.flag("tokenizer.ggml.add_bos_token")?.unwrap_or(parts.default_bos);
    let add_eos = v.flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": v.added_tokens(),
        "normalizer": parts.normalizer, "pre_tokenizer": parts.pre_tokenizer,
        "post_processor": v.post_processor(add_bos, add_eos)?, "decoder": parts.decoder, "model": parts.model,
    });
    let tokenizer: tokenizers::Tokenizer = spec
        .to_string()
        .parse()
        .map_err(|e| format!("{}: cannot build a tokenizer from the tokenizer.ggml metadata: {e}", v.path))?;
    let chat_template =
        v.md.optional("tokenizer.chat_template", Metadata::get_str).map_err(gguf_err)?.map(str::to_string);
    Ok(GgufTokenizer {
        tokenizer,
        bos_token_id: v.bos,
        eos_token_ids: v.end_of_generation_ids(),
        add_bos,
        bos_token: v.text(v.bos),
        eos_token: v.text(v.eos),
        chat_template,
    })
}

fn gguf_err(e: tessera_gguf::GgufError) -> String {
    e.to_string()
}

/// The parts of a `tokenizers` spec that depend on the tokenizer model.
struct ModelParts {
    model: Value,
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
    /// Whether BOS is added when the file does not say.
    default_bos: bool,
}

/// A GGUF file's vocabulary and special token ids, read and checked against each other.
struct Vocab<'a> {
    md: &'a Metadata,
    path: String,
    tokens: Vec<&'a str>,
    types: Vec<i32>,
    /// Text to id; the first id of a text wins (unused padding tokens may repeat a text).
    ids: HashMap<&'a str, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
}

impl<'a> Vocab<'a> {
    fn read(file: &'a GgufFile) -> Result<Self, String> {
        let md = file.metadata();
        let path = file.path().display().to_string();
        let err = |key: &str, message: String| format!("{path}: metadata key {key}: {message}");
        let tokens = md.get_str_array("tokenizer.ggml.tokens").map_err(gguf_err)?;
        if tokens.is_empty() {
            return Err(err("tokenizer.ggml.tokens", "is empty".into()));
        }
        let n = tokens.len();
        let types = match md.optional("tokenizer.ggml.token_type", Metadata::get_i32_array).map_err(gguf_err)? {
            Some(t) if t.len() != n => {
                return Err(err("tokenizer.ggml.token_type", format!("{} entries for {n} tokens", t.len())));
            }
            Some(t) => t,
            None => vec![NORMAL; n],
        };
        let id_key = |key: &str| -> Result<Option<u32>, String> {
            match md.optional(key, Metadata::get_u32).map_err(gguf_err)? {
                Some(id) if id as usize >= n => Err(err(key, format!("token id {id} is outside the {n} tokens"))),
                id => Ok(id),
            }
        };
        let (bos, eos, unk) = (
            id_key("tokenizer.ggml.bos_token_id")?,
            id_key("tokenizer.ggml.eos_token_id")?,
            id_key("tokenizer.ggml.unknown_token_id")?,
        );
        let (eot, eom) = (id_key("tokenizer.ggml.eot_token_id")?, id_key("tokenizer.ggml.eom_token_id")?);
        let mut ids: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (id, t) in tokens.iter().enumerate() {
            ids.entry(t).or_insert(id as u32);
        }
        let v = Vocab { md, path, tokens, types, ids, bos, eos, unk, eot, eom };
        if v.flag("tokenizer.ggml.remove_extra_whitespaces")? == Some(true) {
            return Err(v.err("tokenizer.ggml.remove_extra_whitespaces", "true is not supported".into()));
        }
        Ok(v)
    }

    fn err(&self, key: &str, message: String) -> String {
        format!("{}: metadata key {key}: {message}", self.path)
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, String> {
        self.md.optional(key, Metadata::get_bool).map_err(gguf_err)
    }

    fn text(&self, id: Option<u32>) -> Option<String> {
        id.map(|i| self.tokens[i as usize].to_string())
    }

    fn vocab_json(&self) -> Value {
        let mut m = serde_json::Map::with_capacity(self.ids.len());
        for (t, id) in &self.ids {
            m.insert(t.to_string(), json!(id));
        }
        Value::Object(m)
    }

    /// `llama`: SentencePiece-style BPE with byte fallback, merges rebuilt from the scores.
    fn sentencepiece(&self) -> Result<ModelParts, String> {
        let n = self.tokens.len();
        let scores = match self.md.optional("tokenizer.ggml.scores", Metadata::get_f32_array).map_err(gguf_err)? {
            Some(sc) if sc.len() != n => {
                return Err(self.err("tokenizer.ggml.scores", format!("{} entries for {n} tokens", sc.len())));
            }
            Some(sc) => sc.to_vec(),
            None => vec![0.0; n],
        };
        let merges = spm_merges(&self.tokens, &self.types, &scores, &self.ids);
        let space_prefix = self.flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        let model = json!({
            "type": "BPE", "dropout": null, "unk_token": self.unk.map(|u| self.tokens[u as usize]),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": self.vocab_json(), "merges": merges,
        });
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = if space_prefix {
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
        } else {
            replace
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let decoder = json!({"type": "Sequence", "decoders": decoders});
        Ok(ModelParts { model, normalizer, pre_tokenizer: Value::Null, decoder, default_bos: true })
    }

    /// `gpt2`: byte-level BPE, split first by the regexes `tokenizer.ggml.pre` names.
    fn byte_level(&self) -> Result<ModelParts, String> {
        let pre = self.md.optional("tokenizer.ggml.pre", Metadata::get_str).map_err(gguf_err)?.unwrap_or("default");
        let Some((regexes, ignore_merges, default_bos)) = bpe_pre(pre) else {
            return Err(self.err(
                "tokenizer.ggml.pre",
                format!(
                    "unsupported pre-tokenizer {pre:?}; supported: default, the llama3 family (llama3, \
                         llama-bpe, ...), qwen2, gpt-2, smollm and those llama.cpp splits the same way"
                ),
            ));
        };
        let merges_raw = self.md.get_str_array("tokenizer.ggml.merges").map_err(gguf_err)?;
        let mut merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                self.err("tokenizer.ggml.merges", format!("element {i} ({m:?}) is not two tokens separated by a space"))
            })?;
            merges.push(json!([a, b]));
        }
        let model = json!({
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": self.vocab_json(), "merges": merges,
        });
        let mut pre_tokenizers: Vec<Value> = regexes
            .iter()
            .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
            .collect();
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
        pre_tokenizers.push(byte_level.clone());
        let pre_tokenizer = json!({"type": "Sequence", "pretokenizers": pre_tokenizers});
        Ok(ModelParts { model, normalizer: Value::Null, pre_tokenizer, decoder: byte_level, default_bos })
    }

    /// BOS and/or EOS around every encoding, as the file asks.
    fn post_processor(&self, add_bos: bool, add_eos: bool) -> Result<Value, String> {
        if !add_bos && !add_eos {
            return Ok(Value::Null);
        }
        let mut specials = serde_json::Map::new();
        let mut ends = |wanted: bool, id: Option<u32>, key: &str| -> Result<Vec<Value>, String> {
            if !wanted {
                return Ok(vec![]);
            }
            let id = id.ok_or_else(|| self.err(key, "missing, but the tokenizer adds that token".into()))?;
            let t = self.tokens[id as usize];
            specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
            Ok(vec![json!({"SpecialToken": {"id": t, "type_id": 0}})])
        };
        let (b, e) = (
            ends(add_bos, self.bos, "tokenizer.ggml.bos_token_id")?,
            ends(add_eos, self.eos, "tokenizer.ggml.eos_token_id")?,
        );
        let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        let single: Vec<Value> = b.iter().cloned().chain([seq("A", 0)]).chain(e.iter().cloned()).collect();
        let pair: Vec<Value> =
            single.iter().cloned().chain(b.iter().cloned()).chain([seq("B", 1)]).chain(e.iter().cloned()).collect();
        Ok(json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}))
    }

    /// Control, unknown and user-defined tokens: matched whole before the model splits text.
    fn added_tokens(&self) -> Vec<Value> {
        self.types
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t == CONTROL || t == UNKNOWN || t == USER_DEFINED)
            .filter(|&(id, _)| self.ids.get(self.tokens[id]) == Some(&(id as u32)))
            .map(|(id, &t)| {
                json!({"id": id, "content": self.tokens[id], "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": t != USER_DEFINED})
            })
            .collect()
    }

    /// EOS, EOT and EOM, and every control token whose text llama.cpp treats as an end of generation.
    fn end_of_generation_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = [self.eos, self.eot, self.eom].into_iter().flatten().collect();
        for (id, t) in self.tokens.iter().enumerate() {
            if self.types[id] == CONTROL && EOG_TEXTS.contains(t) && !ids.contains(&(id as u32)) {
                ids.push(id as u32);
            }
        }
        ids
    }
}

/// The merges of a SentencePiece-style vocabulary: each normal token that splits into two tokens of the
/// vocabulary, once per such split, ranked by the token's score (highest first), then by id, then by the
/// ids of the two halves (transformers' `SentencePieceExtractor`).
fn spm_merges(tokens: &[&str], types: &[i32], scores: &[f32], vocab: &HashMap<&str, u32>) -> Vec<Value> {
    let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if types[id] != NORMAL && types[id] != 0 {
            continue;
        }
        for (i, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&t[..i]), vocab.get(&t[i..])) {
                merges.push((scores[id], id as u32, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then((a.2, a.3).cmp(&(b.2, b.3))));
    merges.into_iter().map(|(_, _, l, r)| json!([tokens[l as usize], tokens[r as usize]])).collect()
}
