#!/usr/bin/env python3
"""Makes testdata/gguf-quant/: a small llama model with random (seeded) weights, as a Hugging Face
directory (`hf/`: config.json and F16 safetensors) and as the Q8_0, Q4_0 and Q4_K_M GGUF files llama.cpp's
own quantizer makes of the same F16 values (written to target/ as an F16 GGUF first), with what llama.cpp
computes on each (greedy tokens, first-step logits, perplexity) in reference.json. CI needs none of these
tools: the outputs are committed.

    python3 -m venv target/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" target/llama-venv/bin/pip install "llama-cpp-python==0.3.36" numpy gguf safetensors
    target/llama-venv/bin/python scripts/make_quant_fixtures.py

The model's dimensions are multiples of 256, so Q4_K_M really holds K-quants: llama.cpp makes output.weight
and some layers' attn_v/ffn_down Q6_K and the rest Q4_K. Its vocabulary (tokens, scores, types) is
stories260K's, copied from testdata/gguf-models/stories260K-f32.gguf, so prompts and text are real words.
llama.cpp runs with 2 threads on the CPU, `logits_all`, an f32 KV cache and no flash attention, greedy; perplexity follows llama-perplexity
(chunks of n_ctx tokens with BOS first, the second half of each chunk scored).
"""

import json
import math
import pathlib

import gguf
import llama_cpp
import numpy as np
import safetensors.numpy
import tokenizers
from llama_gguf import FTYPES, add_llama_hparams, quantize

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata" / "gguf-quant"
VOCAB_FROM = ROOT / "testdata" / "gguf-models" / "stories260K-f32.gguf"
TEXT = ROOT / "testdata" / "perplexity" / "tinystories.txt"

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, CTX = 256, 512, 2, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS
N_NEW = 16
PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily and Tom went to the park",
    "One day, a big bird",
    "She was very happy because",
    "The sun was hot and",
    "Mom said",
    "He found a red ball under the tree",
]
# The KV cache in f32 and attention without flash attention, as Tessera's CPU engine computes them: what is
# left to differ is the engines' summation order, not llama.cpp's f16 cache.
EXACT = {"type_k": 0, "type_v": 0, "flash_attn": False}


def copy_vocab(w):
    r = gguf.GGUFReader(VOCAB_FROM)
    f = r.fields
    strings = lambda k: [bytes(f[k].parts[i]).decode("utf-8") for i in f[k].data]
    numbers = lambda k: [f[k].parts[i][0].item() for i in f[k].data]
    scalar = lambda k: f[k].parts[f[k].data[0]][0].item()
    w.add_tokenizer_model(bytes(f["tokenizer.ggml.model"].parts[-1]).decode())
    w.add_token_list(strings("tokenizer.ggml.tokens"))
    w.add_token_scores(numbers("tokenizer.ggml.scores"))
    w.add_token_types(numbers("tokenizer.ggml.token_type"))
    w.add_bos_token_id(scalar("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(scalar("tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(scalar("tokenizer.ggml.unknown_token_id"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    return len(strings("tokenizer.ggml.tokens"))


def to_hf_rows(a, heads):
    """GGUF's interleaved q/k rows back in Hugging Face's rotate-half order (the inverse of the
    converter's `LlamaModel.permute`): row 2i+s of a head is Hugging Face row s*d/2+i."""
    rows, cols = a.shape
    d = rows // heads
    return a.reshape(heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_f16_model(path, hf_dir):
    rng = np.random.default_rng(20261206)
    hf = {}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tessera quantization fixture")
    vocab = copy_vocab(w)
    add_llama_hparams(
        w, vocab=vocab, ctx=CTX, hidden=HIDDEN, inter=INTER, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS
    )

    def hf_name(name):
        fixed = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                 "output_norm.weight": "model.norm.weight"}
        if name in fixed:
            return fixed[name]
        _, layer, part, kind = name.split(".")
        part = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}[part]
        return f"model.layers.{layer}.{part}.{kind}"

    def matrix(name, rows, cols, scale):
        # [rows, cols] in GGUF's row order (the writer stores ne = [cols, rows]).
        a = (rng.standard_normal((rows, cols)) * scale).astype(np.float16)
        w.add_tensor(name, a)
        heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name.split(".")[2] if name.startswith("blk.") else "")
        hf[hf_name(name)] = to_hf_rows(a, heads) if heads else a

    def norm(name):
        a = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        w.add_tensor(name, a)
        hf[hf_name(name)] = a

    matrix("token_embd.weight", vocab, HIDDEN, 1.0)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN, 1.5 / math.sqrt(HIDDEN))
        matrix(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN, 1.5 / math.sqrt(HIDDEN))
        matrix(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN, 1.0 / math.sqrt(HIDDEN))
        matrix(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN, 1.0 / math.sqrt(HIDDEN))
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", INTER, HIDDEN, 1.0 / math.sqrt(HIDDEN))
        matrix(f"blk.{i}.ffn_up.weight", INTER, HIDDEN, 1.0 / math.sqrt(HIDDEN))
        matrix(f"blk.{i}.ffn_down.weight", HIDDEN, INTER, 1.0 / math.sqrt(INTER))
    norm("output_norm.weight")
    matrix("output.weight", vocab, HIDDEN, 5.0 / math.sqrt(HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf_dir.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(hf, str(hf_dir / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": vocab, "max_position_embeddings": CTX,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
    }
    (hf_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def tensor_types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def greedy(llm, prompt_ids):
    llm.reset()
    llm.eval(prompt_ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    out = []
    for _ in range(N_NEW):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out, first


def load(path):
    return llama_cpp.Llama(str(path), n_ctx=CTX, n_batch=CTX, n_threads=2, logits_all=True, verbose=False, seed=0,
                           **EXACT)


def greedy_cases(llm):
    cases = []
    for p in PROMPTS:
        ids = llm.tokenize(p.encode(), add_bos=True)
        toks, first = greedy(llm, ids)
        cases.append({"prompt": p, "prompt_ids": ids, "greedy_ids": toks,
                      "first_logits": [round(float(x), 5) for x in first]})
    return cases


def perplexity(llm, tokens, n_ctx):
    bos = llm.token_bos()
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for c in range(len(tokens) // n_ctx):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[:n_ctx], dtype=np.float64)
        for pos in range(first + 1, n_ctx):
            row = logits[pos - 1]
            m = row.max()
            logp = row[chunk[pos]] - m - math.log(np.exp(row - m).sum())
            nll -= logp
            nll2 += logp * logp
            count += 1
    mean = nll / count
    ppl = math.exp(mean)
    err = math.sqrt(max(nll2 / count - mean * mean, 0.0) / (count - 1)) * ppl
    return {"context": n_ctx, "scored_tokens": count, "ppl": ppl, "ppl_error": err}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    work = ROOT / "target" / "quant-fixtures"
    work.mkdir(parents=True, exist_ok=True)
    src = work / "quant-llama-f16.gguf"
    write_f16_model(src, OUT / "hf")
    reference = {
        "produced_by": {"llama-cpp-python": llama_cpp.__version__, "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "?", "threads": 2},
        "source": "hf/ (the same F16 values as the GGUF file llama.cpp quantized)",
        "prompts": PROMPTS,
        "files": {},
    }
    # The text's tokens as Hugging Face's tokenizer (and Tessera's, from the same vocabulary) makes them:
    # llama.cpp's own tokenizer splits this converted vocabulary differently (its scores are placeholders,
    # see testdata/gguf-models/README.md), and perplexities of different token sequences do not compare.
    hf_tok = tokenizers.Tokenizer.from_file(str(ROOT / "models" / "stories260K" / "tokenizer.json"))
    text_tokens = hf_tok.encode(TEXT.read_text()).ids
    assert text_tokens[0] == 1, "the tokenizer adds BOS"
    for name, ftype in FTYPES.items():
        dst = OUT / f"quant-llama-{name}.gguf"
        quantize(src, dst, ftype)
        llm = load(dst)
        runs = [perplexity(llm, list(text_tokens), n) for n in (64, 128)]
        reference["files"][dst.name] = {"types": tensor_types(dst), "cases": greedy_cases(llm), "perplexity": runs,
                                        "text_tokens": len(text_tokens)}
        print(dst.name, {r["context"]: round(r["ppl"], 4) for r in runs}, sorted(set(tensor_types(dst).values())))
        del llm
    # The converter-made Q8_0 file of testdata/gguf-models/, as llama.cpp runs it.
    stories = ROOT / "testdata" / "gguf-models" / "stories260K-q8_0.gguf"
    llm = load(stories)
    reference["files"][stories.name] = {"path": "testdata/gguf-models/" + stories.name, "cases": greedy_cases(llm),
                                        "perplexity": [perplexity(llm, list(text_tokens), n) for n in (64, 128)],
                                        "text_tokens": len(text_tokens),
                                        "llama_cpp_text_tokens": len(llm.tokenize(TEXT.read_bytes(), add_bos=True))}
    del llm
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")


if __name__ == "__main__":
    main()
