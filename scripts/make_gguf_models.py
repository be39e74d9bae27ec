#!/usr/bin/env python3
"""Makes the GGUF model fixtures of testdata/gguf-models/ with llama.cpp's own converter, and what the tests
compare them against. CI needs neither torch nor llama.cpp: everything written is committed.

    target/peft-venv/bin/pip install torch "transformers==5.25.0" safetensors sentencepiece protobuf tokenizers numpy
    target/peft-venv/bin/python scripts/make_gguf_models.py

It rewrites testdata/gguf-models/ (see its README.md); the same versions write the same bytes.

The converter is `convert_hf_to_gguf.py` (with its `conversion/` package and `gguf-py`) from the llama.cpp
vendored in the llama-cpp-python sdist (LLAMA_CPP_PYTHON below), fetched with
`pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==VERSION` into target/gguf-models-work/
(`--no-binary :all:` would also build pip's build dependencies, cmake and ninja, from source just to read the
sdist's metadata) and unpacked there (set LLAMA_CPP_DIR to a llama.cpp checkout to use that instead). It is run in this Python,
unchanged, with two documented patches applied before its `main()` (see `_convert`):

- `--pre NAME`: the converter recognises a byte-level BPE tokenizer's pre-tokenizer by hashing the ids that
  the model's own vocabulary gives a test string (`get_vocab_base_pre`); a vocabulary trained here is in no
  table, so we name the pre-tokenizer we built it with, as `convert_hf_to_gguf_update.py` would once the
  model were registered.
- `--vocab llama-hf`: tiny-qwen2 carries the stories260K (SentencePiece-style BPE) tokenizer, which
  `Qwen2Model.set_vocab` would send down the byte-level path (and fail on the hash); it is converted with
  the path `LlamaModel.set_vocab` takes for the same tokenizer.json (`_set_vocab_llama_hf`). The weights go
  through the converter untouched.

What it writes (testdata/gguf-models/):

- `stories260K-f32.gguf`, `stories260K-q8_0.gguf`: models/stories260K (llama arch, q/k permuted by the
  converter, tied embeddings, a SentencePiece-style "llama" vocabulary from tokenizer.json), and
  `stories260K-q8_0-golden/golden.json`: transformers' outputs with the weights dequantized from the Q8_0 file.
- `tiny-qwen2-f32.gguf`: testdata/models/tiny-qwen2 (qwen2 arch: q/k/v bias, not permuted).
- `tiny-llama-bpe/`: a Hugging Face model directory made here (random seeded weights, llama3 RoPE scaling,
  q/k/v/o bias, untied lm_head, a byte-level BPE tokenizer trained here with a llama3-style pre-tokenizer
  and a chat template) with its `golden.json` from transformers (float32 CPU, greedy, EOS ignored), and
  `tiny-llama-bpe-f32.gguf` converted from it (its `rope_freqs.weight` holds the llama3 factors).
- `tokenizers/*.gguf`: vocabulary-only files (`--vocab-only`): the trained BPE vocabulary with each
  pre-tokenizer we support (`qwen2`, `gpt-2`, `smollm`, `default`), and `spm.gguf` from a SentencePiece
  BPE model trained here (real scores, byte fallback), with the Hugging Face tokenizer.json each was made
  from beside it in `tokenizers/hf/<name>/`.
- `tokenizer_cases.json`: a few hundred lines of varied text and, per GGUF file, the ids the Hugging Face
  tokenizer of the same model gives each line (and a few with special tokens added), and the text it decodes
  them back to.
- `reference.json`: per model file, the SHA-256 of every weight as the worker must load it (Hugging Face
  name and layout, f32 little-endian), from `gguf.quants.dequantize` and the inverse of the converter's
  `LlamaModel.permute` (checked here against the converter's permute itself); the versions used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata" / "gguf-models"
WORK = ROOT / "target" / "gguf-models-work"
LLAMA_CPP_PYTHON = "0.3.36"
SEED = 20250919

# ---------------------------------------------------------------------------------------------------------
# Text: what tokenizers are trained on, and the lines the tests encode.
# ---------------------------------------------------------------------------------------------------------

PIECES = [
    "Once upon a time, there was a little girl named Lily.",
    "The cat sat on the mat. It was a sunny day!",
    "She said: \"I'll be there at 5 o'clock, won't you?\"",
    "I've been told he's there; you'RE sure? I'M NOT. We'Ve a'lL gone.",
    "Café, naïve, résumé, façade, jalapeño, Ærøskøbing, Straße, Œuvre.",
    "Ünïcödé àccénts: àáâãäå èéêë ìíîï òóôõö ùúûü ÿ ç ñ",
    "Ελληνικά: Καλημέρα κόσμε! Русский: Привет, мир! Українська: Ґанок.",
    "עברית: שלום עולם. العربية: مرحبا بالعالم.",
    "हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก",
    "中文：你好，世界！我想在apple工作1314151天～",
    "日本語：こんにちは、世界。カタカナとひらがな。",
    "한국어: 안녕하세요 세계",
    "Emoji: 🚀 🦙🦙 😶‍🌫️ 👩🏽‍💻 🇫🇷 ❤️ ✅ 👍🏿",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{v:?}\");\n}",
    "{\"key\": [1, 2.5, -3e10, null, true], \"nested\": {\"a\": \"b\"}}",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC;",
    "<html><body><p class=\"x\">Hello &amp; goodbye</p></body></html>",
    "x = a**2 + b**2; y = (x >> 3) | 0xFF; z != w && p || !q",
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3",
    "Prices: $12.99, €7,50, £3, ¥1000, 50% off!!! ???",
    "------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "   leading spaces and trailing spaces   ",
    "tabs\tbetween\t\twords\t",
    "line one\nline two\n\nline four\r\nwindows line\r\n",
    "multiple     spaces      between     words",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "URL: https://example.com/path?q=1&r=two#frag and mail@example.org",
    "Math: ∑ᵢ xᵢ² ≤ ∞, √2 ≈ 1.414, π ≠ 3, ½ + ¼ = ¾, x² + y³",
    "Numbers in other scripts: ٣٤٥ ९८७ 〇一二三 Ⅻ",
    "ſ long s, ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ, ⅷ, ™ ©",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX.",
    "He didn't know what to do, so he asked his mom for help.",
    "Tom and his dog went to the park to play with a big red ball.",
    "!@#$%^&*()_+-=[]{}|;':\",./<>?`~\\",
    "a",
    " ",
    "",
]

WORDS = (
    "the a little girl boy dog cat park ball happy sad big small red blue green tree house sun moon star play "
    "run jump said asked loved wanted went saw found friend mom dad day night time once upon there was named "
    "café naïve Straße мир мама 世界 猫 こんにちは 안녕 🙂 🐈 ⭐ 123 4567 89 3.14 x_y fooBar HTTP2 v1.2.3"
).split()

SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", "\n\n", " \n", ", ", ". ", "! ", "? ", "   ", "\r\n", "-", "_", "/"]


def test_lines() -> list[str]:
    """The lines the tests encode: every piece, then random mixtures of words, separators and pieces."""
    rng = random.Random(SEED)
    lines = list(PIECES)
    while len(lines) < 320:
        kind = rng.random()
        if kind < 0.6:
            n = rng.randint(1, 14)
            text = "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(n))
            if rng.random() < 0.5:
                text = text.rstrip()
        elif kind < 0.85:
            a, b = rng.sample(PIECES[:-3], 2)
            text = a + rng.choice(SEPARATORS) + b
        else:
            p = rng.choice(PIECES[:-3])
            i = rng.randint(0, len(p))
            text = p[:i] + rng.choice(SEPARATORS) * rng.randint(1, 4) + p[i:]
        lines.append(text)
    return lines


def training_text() -> str:
    """A few KB of varied text for training the test tokenizers (another seed than the test lines)."""
    rng = random.Random(SEED + 1)
    parts = list(PIECES) * 3
    for _ in range(300):
        parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "?", ","]))
    rng.shuffle(parts)
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# The converter.
# ---------------------------------------------------------------------------------------------------------


def llama_cpp_dir() -> Path:
    """llama.cpp's converter: LLAMA_CPP_DIR, or the one vendored in the llama-cpp-python sdist."""
    if "LLAMA_CPP_DIR" in os.environ:
        return Path(os.environ["LLAMA_CPP_DIR"])
    dest = WORK / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    WORK.mkdir(parents=True, exist_ok=True)
    sdist = WORK / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            # Only the package itself as an sdist: with `--no-binary :all:` pip would also build its build
            # dependencies (cmake, ninja) from source to prepare the metadata, which takes very long.
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(WORK)],
            check=True,
        )
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and (rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/"))):
                m.name = rel
                members.append(m)
        dest.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest, members=members, filter="data")
    return dest


def convert(src: Path, out: Path, outtype: str = "f32", pre: str | None = None, vocab: str | None = None,
            vocab_only: bool = False) -> None:
    """Runs the converter on `src` in a child of this Python (see `_convert` for the patches)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [str(src), "--outtype", outtype, "--outfile", str(out)]
    if vocab_only:
        args.append("--vocab-only")
    spec = json.dumps({"llama_cpp": str(llama_cpp_dir()), "pre": pre, "vocab": vocab, "args": args})
    subprocess.run([sys.executable, __file__, "_convert", spec], check=True)


def _convert(spec: str) -> None:
    spec = json.loads(spec)
    llama_cpp = Path(spec["llama_cpp"])
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(1, str(llama_cpp / "gguf-py"))
    import convert_hf_to_gguf  # noqa: E402  (the converter itself)
    from conversion import base  # noqa: E402

    if spec["pre"] is not None:
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: spec["pre"]
    if spec["vocab"] == "llama-hf":
        from conversion.qwen import Qwen2Model
        Qwen2Model.set_vocab = base.TextModel._set_vocab_llama_hf
    sys.argv = ["convert_hf_to_gguf.py", *spec["args"]]
    convert_hf_to_gguf.main()


def gguf_module():
    """The gguf-py that the converter uses (not whatever version is installed)."""
    sys.path.insert(0, str(llama_cpp_dir() / "gguf-py"))
    import gguf  # noqa: E402
    return gguf


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_convert":
    _convert(sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------------
# Tokenizers made here.
# ---------------------------------------------------------------------------------------------------------

# Pre-tokenizer regexes as the models' own tokenizer.json files write them (llama.cpp's llama-vocab.cpp
# quotes the same ones as "original regex from tokenizer.json").
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's "default" BPE pre-tokenizer: these four, one after the other (no Hugging Face model has it).
DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
USER_DEFINED = ["<tool_call>", "</tool_call>"]
BPE_VOCAB = 512

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# name -> (`tokenizer.ggml.pre` written, pre_tokenizer of tokenizer.json, BOS added, ignore_merges, template)
BPE_VARIANTS = {
    "llama-bpe": ("llama-bpe", {"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(False)]}, True, True,
                  LLAMA3_TEMPLATE),
    "qwen2": ("qwen2", {"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(False)]}, False, False,
              CHATML_TEMPLATE),
    "gpt-2": ("gpt-2", byte_level(True), False, False, None),
    "smollm": ("smollm", {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                byte_level(True)]}, False, False, CHATML_TEMPLATE),
    "default": ("default", {"type": "Sequence", "pretokenizers": [*map(split, DEFAULT), byte_level(False)]}, False,
                False, None),
}


def train_bpe() -> dict:
    """A byte-level BPE vocabulary (llama3 pre-tokenizer) with special and user-defined tokens appended."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    n_added = len(SPECIAL) + len(USER_DEFINED)
    # Two ids past the last token stay unused: the model's vocab_size is larger than the tokenizer, as in
    # real checkpoints (the converter writes them as [PAD..] UNUSED tokens).
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB - n_added - 2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text().split("\n"), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED])
    return json.loads(tok.to_str())


def bpe_tokenizer_dir(base: dict, variant: str, dest: Path) -> None:
    """tokenizer.json, tokenizer_config.json and a config.json (for the converter) of a BPE variant."""
    _, pre, bos, ignore_merges, template = BPE_VARIANTS[variant]
    t = json.loads(json.dumps(base))
    t["pre_tokenizer"] = pre
    t["model"]["ignore_merges"] = ignore_merges
    bos_id = t["model"]["vocab"].get("<|begin_of_text|>") or next(
        a["id"] for a in t["added_tokens"] if a["content"] == "<|begin_of_text|>")
    t["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos_id], "tokens": ["<|begin_of_text|>"]}},
    } if bos else None
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(json.dumps(t, ensure_ascii=False, indent=1) + "\n")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|eot_id|>" if template == LLAMA3_TEMPLATE else "<|end_of_text|>",
           "add_bos_token": bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": 256}
    if template:
        cfg["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")


def tiny_llama_config(**extra) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": BPE_VOCAB, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": False, "initializer_range": 0.1,
        "bos_token_id": None, "eos_token_id": None,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }
    cfg.update(extra)
    return cfg


def train_spm(dest: Path) -> None:
    """A SentencePiece BPE model with byte fallback (`tokenizer.model`) and the tokenizer.json transformers
    makes of it, in `dest`."""
    import sentencepiece as spm
    import transformers

    dest.mkdir(parents=True, exist_ok=True)
    corpus = WORK / "spm-corpus.txt"
    corpus.write_text(training_text())
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(WORK / "spm"), model_type="bpe", vocab_size=640, byte_fallback=True,
        character_coverage=0.98, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    shutil.copy(WORK / "spm.model", dest / "tokenizer.model")
    tok = transformers.LlamaTokenizer.from_pretrained(dest)
    tok.save_pretrained(dest)
    # transformers 5 writes no BOS into the post-processor; llama.cpp's SPM vocabularies add it by default.
    t = json.loads((dest / "tokenizer.json").read_text())
    # transformers 5 writes a Metaspace pre-tokenizer, which adds no "▁" before text that starts with a space;
    # sentencepiece itself and llama.cpp always add one. The legacy form transformers used to write for Llama
    # (Llama 2's and stories260K's own tokenizer.json: a Prepend + Replace normalizer) always adds it too, and
    # is checked below to give sentencepiece's ids on every test line.
    from tokenizers import Tokenizer
    metaspace = Tokenizer.from_str(json.dumps(t))
    assert t["pre_tokenizer"]["type"] == "Metaspace", t["pre_tokenizer"]
    t["pre_tokenizer"] = None
    t["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": "\u2581"}]}
    legacy = Tokenizer.from_str(json.dumps(t))
    sp = spm.SentencePieceProcessor(model_file=str(dest / "tokenizer.model"))
    differ = 0
    for line in test_lines():
        want = sp.encode(line)
        assert legacy.encode(line, add_special_tokens=False).ids == want, line
        differ += metaspace.encode(line, add_special_tokens=False).ids != want
    print(f"spm: the legacy tokenizer.json agrees with sentencepiece on every line; transformers 5's Metaspace "
          f"form differs on {differ}")
    t["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (dest / "tokenizer.json").write_text(json.dumps(t, ensure_ascii=False, indent=1) + "\n")
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg.update({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>"})
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")


# Lines with special and added tokens in them.
SPECIAL_LINES = [
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCafé?<|eot_id|>",
    "text <tool_call>{\"a\": 1}</tool_call> more",
    "<s>Once upon a time</s> there was <unk>",
]

# ---------------------------------------------------------------------------------------------------------
# The tiny byte-level BPE llama and its golden outputs.
# ---------------------------------------------------------------------------------------------------------

GOLDEN_PROMPTS = ["Once upon a time", "The cat sat on the mat.", "Café 🚀 中文 1234 and more",
                  "def fib(n):\n    return n"]
NEW_TOKENS = 32


def make_tiny_llama_bpe(base_tok: dict, dest: Path) -> None:
    import torch
    import transformers

    bpe_tokenizer_dir(base_tok, "llama-bpe", dest)
    vocab = json.loads((dest / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in vocab["added_tokens"]}
    bos, eos, eot = ids["<|begin_of_text|>"], ids["<|end_of_text|>"], ids["<|eot_id|>"]
    cfg = transformers.LlamaConfig(**tiny_llama_config(bos_token_id=bos, eos_token_id=[eos, eot]))
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        # Norm weights away from 1 and biases away from 0, so that a mix-up of either shows in the logits.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape))
    model.save_pretrained(dest, safe_serialization=True)
    gen = {"bos_token_id": bos, "eos_token_id": [eos, eot]}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok = transformers.AutoTokenizer.from_pretrained(dest)
    cases, worst_gap = [], float("inf")
    for prompt in GOLDEN_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == bos, ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
        for s in out.scores:
            top = torch.topk(s[0], 2).values
            worst_gap = min(worst_gap, (top[0] - top[1]).item())
        cases.append({"prompt": prompt, "prompt_ids": ids[0].tolist(),
                      "greedy_ids": out.sequences[0, ids.shape[1]:].tolist(), "last_prompt_logits": logits.tolist()})
    print(f"tiny-llama-bpe: smallest gap between the two best logits of a greedy step: {worst_gap:.2e}")
    golden = {"produced_by": f"transformers {transformers.__version__}, torch {torch.__version__}, float32 CPU, "
                             "greedy (do_sample=False), eos ignored",
              "new_tokens": NEW_TOKENS, "cases": cases}
    (dest / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Reference data.
# ---------------------------------------------------------------------------------------------------------

HF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(name: str) -> str:
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    if name.startswith("blk."):
        _, n, part, kind = name.split(".")
        return f"model.layers.{n}.{HF_NAMES[part]}.{kind}"
    return name


def weights_reference(path: Path, original: Path | None) -> dict:
    """SHA-256 of each weight as the worker loads it (HF name and layout, f32), from gguf-py's dequantize and
    the inverse of the converter's permute; with `original` (a safetensors file), also checks that an f32
    file gives back exactly the original weights."""
    import numpy as np
    import torch

    gguf = gguf_module()
    sys.path.insert(0, str(llama_cpp_dir()))
    from conversion.llama import LlamaModel

    r = gguf.GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n_head = int(r.fields[f"{arch}.attention.head_count"].parts[-1][0])
    n_kv = int(r.fields[f"{arch}.attention.head_count_kv"].parts[-1][0])
    orig = None
    if original is not None:
        from safetensors.numpy import load_file
        orig = load_file(original)
    out = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # numpy order: [rows, cols]
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        name = hf_name(t.name)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = n_head if ".q_proj." in name else n_kv
            rows = data.shape[0]
            # Inverse of LlamaModel.permute: in each head, the rows the converter interleaved go back to halves.
            un = data.reshape(heads, rows // heads // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
            again = LlamaModel.permute(torch.from_numpy(un.copy()), n_head, heads if heads != n_head else n_head)
            assert np.array_equal(again.numpy(), data), f"{path.name}: {t.name}: un-permute is not the inverse"
            data = un
        data = np.ascontiguousarray(data, dtype="<f4")
        if orig is not None and name in orig:
            assert np.array_equal(orig[name].astype(np.float32), data), f"{path.name}: {t.name} != {name}"
        out[name] = {"gguf": t.name, "type": t.tensor_type.name, "shape": shape,
                     "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
    return out


def tokenizer_cases(pairs: list[tuple[str, Path, bool]]) -> dict:
    """Per GGUF file: the ids its Hugging Face tokenizer gives each test line, and the decoded text."""
    from tokenizers import Tokenizer

    lines = test_lines()
    result = {"lines": lines, "special_lines": SPECIAL_LINES, "tokenizers": {}}
    for gguf_name, hf_json, with_special_lines in pairs:
        tok = Tokenizer.from_file(str(hf_json))
        entry = {"hf": str(hf_json.relative_to(ROOT)), "ids": [], "decoded": {}, "prompt_ids": []}
        for i, line in enumerate(lines):
            ids = tok.encode(line, add_special_tokens=False).ids
            entry["ids"].append(ids)
            text = tok.decode(ids, skip_special_tokens=True)
            if text != line:
                entry["decoded"][str(i)] = text
            if i < 16:
                entry["prompt_ids"].append(tok.encode(line, add_special_tokens=True).ids)
        if with_special_lines:
            entry["special_ids"] = [tok.encode(line, add_special_tokens=False).ids for line in SPECIAL_LINES]
            entry["special_decoded"] = [tok.decode(ids, skip_special_tokens=False)
                                        for ids in entry["special_ids"]]
        result["tokenizers"][gguf_name] = entry
    return result


def compact_json(value) -> str:
    """JSON with each list of numbers on one line."""
    text = json.dumps(value, ensure_ascii=False, indent=1)
    import re
    return re.sub(r"\[\s*(-?\d[\d,\s.eE+-]*?)\s*\]", lambda m: "[" + ",".join(m.group(1).split()).replace(",,", ",") + "]",
                  text) + "\n"


def main() -> None:
    import numpy as np
    import tokenizers
    import torch
    import transformers

    llama_cpp_dir()
    # Everything but the README is written anew.
    OUT.mkdir(parents=True, exist_ok=True)
    for p in OUT.iterdir():
        if p.name != "README.md":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    src = WORK / "src"
    shutil.rmtree(src, ignore_errors=True)

    # Tokenizers and the tiny BPE llama.
    base_tok = train_bpe()
    make_tiny_llama_bpe(base_tok, OUT / "tiny-llama-bpe")
    for variant in BPE_VARIANTS:
        if variant == "llama-bpe":
            continue
        d = src / variant
        bpe_tokenizer_dir(base_tok, variant, d)
        (d / "config.json").write_text(json.dumps(tiny_llama_config(), indent=2) + "\n")
        hf = OUT / "tokenizers" / "hf" / variant
        hf.mkdir(parents=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(d / f, hf / f)
        convert(d, OUT / "tokenizers" / f"{variant}.gguf", pre=BPE_VARIANTS[variant][0], vocab_only=True)
    spm_dir = src / "spm"
    train_spm(spm_dir)
    (spm_dir / "config.json").write_text(json.dumps(tiny_llama_config(vocab_size=640), indent=2) + "\n")
    shutil.copytree(spm_dir, OUT / "tokenizers" / "hf" / "spm", ignore=shutil.ignore_patterns("config.json"))
    convert(spm_dir, OUT / "tokenizers" / "spm.gguf", vocab_only=True)

    # Models.
    stories = ROOT / "models" / "stories260K"
    qwen = ROOT / "testdata" / "models" / "tiny-qwen2"
    bpe = OUT / "tiny-llama-bpe"
    convert(stories, OUT / "stories260K-f32.gguf")
    convert(stories, OUT / "stories260K-q8_0.gguf", outtype="q8_0")
    convert(qwen, OUT / "tiny-qwen2-f32.gguf", vocab="llama-hf")
    convert(bpe, OUT / "tiny-llama-bpe-f32.gguf", pre="llama-bpe")

    reference = {
        "produced_by": {"llama-cpp-python sdist": LLAMA_CPP_PYTHON, "python": sys.version.split()[0],
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "tokenizers": tokenizers.__version__, "numpy": np.__version__},
        "weights": {
            "stories260K-f32.gguf": weights_reference(OUT / "stories260K-f32.gguf", stories / "model.safetensors"),
            "stories260K-q8_0.gguf": weights_reference(OUT / "stories260K-q8_0.gguf", None),
            "tiny-qwen2-f32.gguf": weights_reference(OUT / "tiny-qwen2-f32.gguf", qwen / "model.safetensors"),
            "tiny-llama-bpe-f32.gguf": weights_reference(OUT / "tiny-llama-bpe-f32.gguf", bpe / "model.safetensors"),
        },
    }
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    q8_golden = OUT / "stories260K-q8_0-golden"
    q8_golden.mkdir()
    dequantized_golden(OUT / "stories260K-q8_0.gguf", stories, q8_golden / "golden.json")

    pairs = [("stories260K-f32.gguf", stories / "tokenizer.json", True),
             ("tiny-qwen2-f32.gguf", qwen / "tokenizer.json", True),
             ("tiny-llama-bpe-f32.gguf", bpe / "tokenizer.json", True),
             ("tokenizers/spm.gguf", OUT / "tokenizers" / "hf" / "spm" / "tokenizer.json", True)]
    pairs += [(f"tokenizers/{v}.gguf", OUT / "tokenizers" / "hf" / v / "tokenizer.json", True)
              for v in BPE_VARIANTS if v != "llama-bpe"]
    (OUT / "tokenizer_cases.json").write_text(compact_json(tokenizer_cases(pairs)))

    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>9}  {p.relative_to(OUT)}")



def dequantized_golden(gguf_path: Path, hf_dir: Path, out: Path) -> None:
    """Golden outputs of `hf_dir`'s model with the weights of `gguf_path` as gguf-py dequantizes them (q/k
    un-permuted): what the engine must give from a quantized file."""
    import numpy as np
    import torch
    import transformers

    gguf = gguf_module()
    r = gguf.GGUFReader(gguf_path)
    n_head = int(r.fields["llama.attention.head_count"].parts[-1][0])
    n_kv = int(r.fields["llama.attention.head_count_kv"].parts[-1][0])
    state = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        name = hf_name(t.name)
        if ".q_proj." in name or ".k_proj." in name:
            heads = n_head if ".q_proj." in name else n_kv
            data = data.reshape(heads, data.shape[0] // heads // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(shape)
        state[name] = torch.from_numpy(np.ascontiguousarray(data))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    golden = json.loads((hf_dir / "golden.json").read_text())
    cases = []
    for c in golden["cases"]:
        ids = torch.tensor([c["prompt_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=golden["new_tokens"], min_new_tokens=golden["new_tokens"],
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        cases.append({"prompt": c["prompt"], "prompt_ids": c["prompt_ids"], "greedy_ids": gen,
                      "last_prompt_logits": logits.tolist()})
    out.write_text(json.dumps({"produced_by": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                                              f"float32 CPU, weights dequantized from {gguf_path.name} by gguf-py, "
                                              "greedy, eos ignored",
                               "new_tokens": golden["new_tokens"], "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
