#!/usr/bin/env python3
"""Side-by-side CPU benchmark of Tessera and llama.cpp on the same GGUF files.

Writes the 124.7M-parameter benchmark shape (`tessera bench`'s `synthetic`: hidden 768, 12 layers, 12 heads,
4 KV heads, intermediate 2048, vocabulary 32000) with random weights as an F16 GGUF file, quantizes it with
llama.cpp's own quantizer to Q8_0, Q4_0 and Q4_K_M, then measures on each file, with 2 threads:
llama.cpp (llama-cpp-python) batch-1 decode after 128 tokens of context and a 512-token prefill, and
`tessera bench --models FILE` (batch 1 and 8 decode, 512-token prefill). Prints one JSON report.

    target/llama-venv/bin/python scripts/bench_gguf.py [--tessera target/release/tessera] [--out DIR]
"""

import argparse
import json
import math
import pathlib
import subprocess
import time

import gguf
import llama_cpp
import numpy as np
from llama_gguf import FTYPES, add_llama_hparams, quantize

ROOT = pathlib.Path(__file__).resolve().parent.parent
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB, CTX = 768, 2048, 12, 12, 4, 32000, 2048


def write_f16(path):
    rng = np.random.default_rng(124)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tessera benchmark shape")
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(VOCAB - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(VOCAB - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    add_llama_hparams(
        w, vocab=VOCAB, ctx=CTX, hidden=HIDDEN, inter=INTER, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS
    )
    hd = HIDDEN // HEADS

    def matrix(name, rows, cols):
        w.add_tensor(name, (rng.standard_normal((rows, cols), dtype=np.float32) / math.sqrt(cols)).astype(np.float16))

    def norm(name):
        w.add_tensor(name, np.ones(HIDDEN, dtype=np.float32))

    matrix("token_embd.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        matrix(f"blk.{i}.attn_k.weight", KV_HEADS * hd, HIDDEN)
        matrix(f"blk.{i}.attn_v.weight", KV_HEADS * hd, HIDDEN)
        matrix(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", INTER, HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", INTER, HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", HIDDEN, INTER)
    norm("output_norm.weight")
    matrix("output.weight", VOCAB, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_figures(path, context=128, steps=32, prefill=512):
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2,
                          verbose=False, seed=0)
    rng = np.random.default_rng(0)
    ids = [int(x) for x in rng.integers(3, VOCAB, size=prefill)]
    best_prefill = math.inf
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        best_prefill = min(best_prefill, time.perf_counter() - t)
    llm.reset()
    llm.eval(ids[:context])
    for tok in ids[context:context + 2]:
        llm.eval([tok])
    t = time.perf_counter()
    for tok in ids[context + 2:context + 2 + steps]:
        llm.eval([tok])
    decode = (time.perf_counter() - t) / steps
    return {"decode_b1_tokens_per_s": 1 / decode, "prefill_tokens_per_s": prefill / best_prefill}


def tessera_figures(binary, path):
    out = subprocess.run([binary, "bench", "--models", str(path), "--batch", "1,8", "--prefill", "512",
                          "--threads", "2", "--json"], check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    m = report["models"][0]
    return {
        "decode_tokens_per_s": {str(d["batch"]): d["tokens_per_s"] for d in m["decode"]},
        "prefill_tokens_per_s": m["prefill_tokens_per_s"],
        "weight_bytes_per_token": m["weight_bytes_per_token"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tessera", default=str(ROOT / "target" / "release" / "tessera"))
    ap.add_argument("--out", default=str(ROOT / "target" / "bench-gguf"))
    ap.add_argument("--types", default=",".join(FTYPES))
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "synthetic-f16.gguf"
    if not src.exists():
        write_f16(src)
    report = {"llama_cpp_python": llama_cpp.__version__, "threads": 2, "files": {}}
    for name in a.types.split(","):
        dst = out / f"synthetic-{name}.gguf"
        if not dst.exists():
            quantize(src, dst, FTYPES[name])
        report["files"][dst.name] = {
            "bytes": dst.stat().st_size,
            "llama.cpp": llama_cpp_figures(dst),
            "tessera": tessera_figures(a.tessera, dst),
        }
        print(json.dumps({dst.name: report["files"][dst.name]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
