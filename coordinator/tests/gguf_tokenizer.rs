//! Tokenizers read from GGUF files (`testdata/gguf-models/`, converted by llama.cpp's own converter) against
//! the Hugging Face tokenizer of the same model: a few hundred lines of varied text (accents, scripts, CJK,
//! emoji, code, runs of spaces, tabs and newlines) encode to exactly its ids and decode back to its text,
//! for SentencePiece-style vocabularies (with real scores, and with the -1000 placeholders a tokenizer.json
//! conversion writes) and byte-level BPE with each pre-tokenizer supported. Also: BOS and the chat template
//! from the metadata, a `tokenizer.json` beside the file winning, and refusals naming the file and key.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tessera_coordinator::tokenizer::Tokenizer;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/gguf-models")
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("tokenizer_cases.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

#[test]
fn every_gguf_tokenizer_encodes_and_decodes_every_line_as_hugging_face_does() {
    let all = cases();
    let lines = strs(&all["lines"]);
    let special_lines = strs(&all["special_lines"]);
    assert!(lines.len() >= 300);
    let tokenizers = all["tokenizers"].as_object().unwrap();
    assert!(tokenizers.len() >= 8, "{:?}", tokenizers.keys());
    let mut failures = Vec::new();
    for (file, want) in tokenizers {
        let t = Tokenizer::load(&dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut wrong = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let expected = ids(&want["ids"][i]);
            let got = t.encode(line, false).unwrap();
            if got != expected {
                let toks = |v: &[u32]| v.iter().map(|&id| t.id_to_token(id).unwrap_or_default()).collect::<Vec<_>>();
                wrong.push(format!("line {i} {line:?}:\n  got  {:?}\n  want {:?}", toks(&got), toks(&expected)));
                continue;
            }
            let text = want["decoded"].get(i.to_string()).and_then(Value::as_str).unwrap_or(line);
            assert_eq!(t.decode(&got).unwrap(), text, "{file}: decoding line {i}");
        }
        if !wrong.is_empty() {
            failures.push(format!("{file}: {} of {} lines differ:\n{}", wrong.len(), lines.len(), wrong.join("\n")));
            continue;
        }
        // With the special tokens the tokenizer adds (BOS where the model wants it).
        for (i, expected) in want["prompt_ids"].as_array().unwrap().iter().enumerate() {
            assert_eq!(t.encode_prompt(&lines[i]).unwrap(), ids(expected), "{file}: prompt {i} {:?}", lines[i]);
        }
        // Special and added tokens written in the text.
        if let Some(special) = want.get("special_ids") {
            for (i, line) in special_lines.iter().enumerate() {
                let got = t.encode(line, false).unwrap();
                assert_eq!(got, ids(&special[i]), "{file}: {line:?}");
                assert_eq!(t.decode_with(&got, false).unwrap(), want["special_decoded"][i].as_str().unwrap(), "{file}");
            }
        }
        let n: usize = want["ids"].as_array().unwrap().iter().map(|v| v.as_array().unwrap().len()).sum();
        println!("{file}: {} lines, {n} tokens: all equal", lines.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn special_tokens_bos_eos_and_the_chat_template_come_from_the_metadata() {
    let t = Tokenizer::load(&dir().join("tiny-llama-bpe-f32.gguf")).unwrap();
    let hf = Tokenizer::load(&dir().join("tiny-llama-bpe")).unwrap();
    assert_eq!(t.bos_token_id, Some(500));
    assert_eq!(t.bos_token.as_deref(), Some("<|begin_of_text|>"));
    assert_eq!(t.eos_token.as_deref(), Some("<|eot_id|>"));
    // The model's own EOS ids (generation_config.json) all end generation; llama.cpp also ends at the other
    // end-of-turn tokens it knows by name.
    for id in &hf.eos_token_ids {
        assert!(t.is_eos(*id), "{id} must end generation: {:?}", t.eos_token_ids);
    }
    assert_eq!(t.config["chat_template"], hf.config["chat_template"]);
    assert_eq!(t.config["add_bos_token"], true);
    assert_eq!(t.vocab_size(), 512, "the unused ids past the tokenizer are in the vocabulary");

    let stories = Tokenizer::load(&dir().join("stories260K-f32.gguf")).unwrap();
    assert_eq!(stories.encode_prompt("Once upon a time").unwrap(), [1, 403, 407, 261, 378]);
    assert_eq!((stories.bos_token_id, stories.eos_token_ids.clone()), (Some(1), vec![2]));
    assert!(stories.config["chat_template"].as_str().unwrap().contains("bos_token"));
    // A vocabulary without BOS (qwen2) and without a template (gpt-2).
    let qwen = Tokenizer::load(&dir().join("tokenizers/qwen2.gguf")).unwrap();
    assert_eq!(qwen.encode_prompt("Hi").unwrap(), qwen.encode("Hi", false).unwrap());
    assert!(qwen.is_eos(qwen.hf().token_to_id("<|im_end|>").unwrap()));
    let gpt2 = Tokenizer::load(&dir().join("tokenizers/gpt-2.gguf")).unwrap();
    assert!(gpt2.config.get("chat_template").is_none());
}

#[test]
fn a_tokenizer_json_beside_the_gguf_file_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.gguf");
    std::fs::copy(dir().join("stories260K-f32.gguf"), &file).unwrap();
    let from_gguf = Tokenizer::load(&file).unwrap();
    assert_eq!(
        from_gguf.encode("café", false).unwrap(),
        Tokenizer::load(&dir().join("stories260K-f32.gguf")).unwrap().encode("café", false).unwrap()
    );
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(dir().join("tiny-llama-bpe").join(f), tmp.path().join(f)).unwrap();
    }
    let beside = Tokenizer::load(&file).unwrap();
    let hf = Tokenizer::load(&dir().join("tiny-llama-bpe")).unwrap();
    assert_eq!(beside.encode_prompt("café 🚀").unwrap(), hf.encode_prompt("café 🚀").unwrap());
    assert_ne!(beside.encode_prompt("café 🚀").unwrap(), from_gguf.encode_prompt("café 🚀").unwrap());
}

/// `file`'s bytes with the first occurrence of `from` replaced by `to` (same length), written to a
/// temporary file; the error loading its tokenizer, which must name the file and each of `expect`.
fn refused(file: &str, from: &[u8], to: &[u8], expect: &[&str]) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(dir().join(file)).unwrap();
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap_or_else(|| panic!("{from:?} not in {file}"));
    bytes[at..at + to.len()].copy_from_slice(to);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("edited.gguf");
    std::fs::write(&path, bytes).unwrap();
    let e = match Tokenizer::load(&path) {
        Ok(_) => panic!("{file} with {to:?}: must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&path.display().to_string()), "the error must name the file: {e}");
    for x in expect {
        assert!(e.contains(x), "the error must mention {x:?}: {e}");
    }
}

/// A GGUF string as stored: its u64 length, then its bytes.
fn gguf_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

#[test]
fn unsupported_or_broken_tokenizer_metadata_is_refused_naming_the_file_and_key() {
    refused("tokenizers/qwen2.gguf", &gguf_str("qwen2"), &gguf_str("qwen9"), &["tokenizer.ggml.pre", "qwen9"]);
    refused("tokenizers/qwen2.gguf", &gguf_str("gpt2"), &gguf_str("bert"), &["tokenizer.ggml.model", "bert"]);
    refused(
        "tokenizers/qwen2.gguf",
        &gguf_str("tokenizer.ggml.merges"),
        &gguf_str("tokenizer.ggml.mergez"),
        &["tokenizer.ggml.merges", "missing"],
    );
    refused(
        "stories260K-f32.gguf",
        &gguf_str("tokenizer.ggml.tokens"),
        &gguf_str("tokenizer.ggml.tokenz"),
        &["tokenizer.ggml.tokens", "missing"],
    );
    // add_bos_token as a u8 (type 0) instead of a bool (type 7): the same one-byte value.
    let mut from = gguf_str("tokenizer.ggml.add_bos_token");
    let mut to = from.clone();
    from.extend(7u32.to_le_bytes());
    to.extend(0u32.to_le_bytes());
    refused("stories260K-f32.gguf", &from, &to, &["tokenizer.ggml.add_bos_token", "bool"]);
    // A BOS id past the vocabulary.
    let mut from = gguf_str("tokenizer.ggml.bos_token_id");
    let mut to = from.clone();
    from.extend(4u32.to_le_bytes());
    from.extend(1u32.to_le_bytes());
    to.extend(4u32.to_le_bytes());
    to.extend(100_000u32.to_le_bytes());
    refused("stories260K-f32.gguf", &from, &to, &["tokenizer.ggml.bos_token_id", "100000"]);
}

#[test]
fn a_gguf_file_without_tokenizer_metadata_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path: &Path = &tmp.path().join("empty.gguf");
    // GGUF v3, no tensors, no metadata.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
    let e = Tokenizer::load(path).err().unwrap().to_string();
    assert!(e.contains("empty.gguf") && e.contains("tokenizer.ggml.model") && e.contains("missing"), "{e}");
}

/// Constrained decoding reads the tokens' bytes from the tokenizer's decoder: it takes a GGUF one as it
/// takes the Hugging Face one.
#[test]
fn constrained_decoding_takes_the_vocabulary_of_a_gguf_tokenizer() {
    for (file, vocab) in [("stories260K-f32.gguf", 512), ("tiny-llama-bpe-f32.gguf", 512), ("tokenizers/spm.gguf", 640)]
    {
        let t = Tokenizer::load(&dir().join(file)).unwrap();
        if let Err(e) = tessera_coordinator::constrain::Grammars::new(&t, vocab) {
            panic!("{file}: {e}");
        }
    }
}
