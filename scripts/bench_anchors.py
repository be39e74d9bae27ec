#!/usr/bin/env python3
"""Side-by-side CPU anchors for `tessera bench`: Hugging Face transformers and llama.cpp on the same weights.

Run in a virtualenv outside the repository (not in CI), on the same machine and in the same sitting as
tessera, since absolute figures on shared machines drift between sittings:

    python3 -m venv ~/anchors && ~/anchors/bin/pip install torch transformers safetensors numpy \
        llama-cpp-python gguf
    cargo build --release
    ~/anchors/bin/python scripts/bench_anchors.py --tessera target/release/tessera --dir /tmp/bench-model

It writes the synthetic 124.7M-parameter model with `tessera bench --save-synthetic DIR` (if DIR has none),
converts it to an f32 GGUF for llama.cpp, then measures all three engines with the same thread count:
decode tokens/s at batch 1 and 8 after a 128-token context, prefill tokens/s for a 512-token prompt, and
batch-1 decode as a fraction of the memory-read bandwidth roofline that tessera measures.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_tessera(exe, model_dir, threads, steps):
    out = subprocess.run(
        [exe, "bench", "--models", str(model_dir), "--batch", "1,8", "--threads", str(threads),
         "--steps", str(steps), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def run_transformers(model_dir, threads, context, steps, prefill, batches):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    res = {"decode": {}, "prefill_tokens_per_s": None}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(3, vocab, (b, context), generator=g)
            out = model(ids, use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(2):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            dt = time.perf_counter() - t
            res["decode"][b] = b * steps / dt
        ids = torch.randint(3, vocab, (1, prefill), generator=g)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - t)
        res["prefill_tokens_per_s"] = prefill / best
    return res


def write_gguf(model_dir, path):
    """An f32 GGUF of the HF Llama in model_dir, laid out as llama.cpp's converter does."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    w = load_file(str(Path(model_dir) / "model.safetensors"))
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // nh

    def permute(t, heads):
        # HF rotates halves; GGML's llama RoPE rotates adjacent pairs: reorder q/k rows to match.
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_rope_dimension_count(hd)
    wr.add_head_count(nh)
    wr.add_head_count_kv(nkv)
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_rope_freq_base(cfg["rope_theta"])
    wr.add_file_type(0)  # all f32
    vocab = cfg["vocab_size"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores([0.0] * vocab)
    wr.add_token_types(types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    wr.add_tensor("output_norm.weight", w["model.norm.weight"])
    wr.add_tensor("output.weight", w["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        wr.add_tensor(f"blk.{i}.attn_norm.weight", w[p + "input_layernorm.weight"])
        wr.add_tensor(f"blk.{i}.attn_q.weight", np.ascontiguousarray(permute(w[p + "self_attn.q_proj.weight"], nh)))
        wr.add_tensor(f"blk.{i}.attn_k.weight", np.ascontiguousarray(permute(w[p + "self_attn.k_proj.weight"], nkv)))
        wr.add_tensor(f"blk.{i}.attn_v.weight", w[p + "self_attn.v_proj.weight"])
        wr.add_tensor(f"blk.{i}.attn_output.weight", w[p + "self_attn.o_proj.weight"])
        wr.add_tensor(f"blk.{i}.ffn_norm.weight", w[p + "post_attention_layernorm.weight"])
        wr.add_tensor(f"blk.{i}.ffn_gate.weight", w[p + "mlp.gate_proj.weight"])
        wr.add_tensor(f"blk.{i}.ffn_up.weight", w[p + "mlp.up_proj.weight"])
        wr.add_tensor(f"blk.{i}.ffn_down.weight", w[p + "mlp.down_proj.weight"])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def run_llama_cpp(gguf_path, threads, context, steps, prefill):
    """llama.cpp through llama-cpp-python: batch-1 decode and prefill (its Python API has no multi-sequence
    batch, so batch 8 is not measured)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                n_batch=512, n_ubatch=512, verbose=False)
    ids = [3 + (i * 7919) % 30000 for i in range(context)]
    llm.eval(ids)
    for _ in range(2):
        llm.eval([5])
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([5])
    dt = time.perf_counter() - t
    res = {"decode": {1: steps / dt}}
    prompt = [3 + (i * 104729) % 30000 for i in range(prefill)]
    best = float("inf")
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        best = min(best, time.perf_counter() - t)
    res["prefill_tokens_per_s"] = prefill / best
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tessera", default="target/release/tessera")
    ap.add_argument("--dir", default="/tmp/tessera-bench-model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    a = ap.parse_args()
    d = Path(a.dir)
    if not (d / "model.safetensors").exists():
        subprocess.run([a.tessera, "bench", "--models", "synthetic", "--save-synthetic", str(d), "--batch", "1",
                        "--steps", "4", "--prefill", "16"], check=True, capture_output=True)
    rows = []
    t = run_tessera(a.tessera, d, a.threads, a.steps)
    bw = t["read_bandwidth_gb_s"] * 1e9
    m = t["models"][0]
    wbytes = m["weight_bytes_per_token"]
    dec = {r["batch"]: r["tokens_per_s"] for r in m["decode"]}
    rows.append(("tessera", dec.get(1), dec.get(8), m["prefill_tokens_per_s"]))
    hf = run_transformers(d, a.threads, 128, a.steps, 512, [1, 8])
    rows.append(("transformers (torch)", hf["decode"][1], hf["decode"][8], hf["prefill_tokens_per_s"]))
    if not a.skip_llama_cpp:
        g = d / "model-f32.gguf"
        if not g.exists():
            write_gguf(d, g)
        lc = run_llama_cpp(g, a.threads, 128, a.steps, 512)
        rows.append(("llama.cpp (f32 GGUF)", lc["decode"][1], None, lc["prefill_tokens_per_s"]))
    print(f"threads {a.threads}, read bandwidth {bw / 1e9:.1f} GB/s, {wbytes / 1e6:.1f} MB of weights per token")
    print(f"{'engine':<22} {'b=1 tok/s':>10} {'roofline':>9} {'b=8 tok/s':>10} {'prefill tok/s':>14}")
    for name, d1, d8, pf in rows:
        roof = f"{d1 * wbytes / bw * 100:.1f}%" if d1 else "-"
        d8s = f"{d8:.1f}" if d8 else "-"
        print(f"{name:<22} {d1:>10.1f} {roof:>9} {d8s:>10} {pf:>14.1f}")


if __name__ == "__main__":
    sys.exit(main())
