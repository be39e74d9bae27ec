#!/usr/bin/env python3
"""Hugging Face transformers on the same shapes as `tessera bench gpu`, on the same card, for the side by
side in scripts/gpu-check.sh: a random Llama-3-8B-shaped model in bf16 built on the GPU, greedy decode
steps with the KV cache at each batch size after a `context`-token prompt, and one long prefill (logits of
the last position only, as Tessera computes them). Prints and writes JSON."""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--batch", default="1,16,64")
p.add_argument("--context", type=int, default=512)
p.add_argument("--steps", type=int, default=32)
p.add_argument("--prefill", type=int, default=2048)
p.add_argument("--json")
p.add_argument("--device", default="cuda")
p.add_argument("--tiny", action="store_true", help="a 2-layer model of small width: a dry run on the CPU")
a = p.parse_args()

cfg = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
if a.tiny:
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size = 256, 512, 2, 1000
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 64
dev = torch.device(a.device)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
t0 = time.time()
with dev:
    model = LlamaForCausalLM(cfg).eval()
sync()
print(f"transformers: built the model in {time.time() - t0:.1f} s ({name})", flush=True)

report = {"device": name, "transformers": __import__("transformers").__version__,
          "torch": torch.__version__, "context": a.context, "decode": []}
with torch.inference_mode():
    for b in [int(x) for x in a.batch.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (b, a.context), device=dev)
        out = model(ids, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        timed = max(1, a.steps - 2)
        for i in range(a.steps):
            if i == 2:
                sync()
                start = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tok.cpu()
        dt = (time.perf_counter() - start) / timed
        report["decode"].append({"batch": b, "tokens_per_s": b / dt, "ms_per_step": dt * 1e3})
        print(f"transformers decode batch {b}: {b / dt:.1f} tokens/s ({dt * 1e3:.2f} ms/step)", flush=True)
        del past, out
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ids = torch.randint(0, cfg.vocab_size, (1, a.prefill), device=dev)
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1).logits.cpu()
        best = min(best, time.perf_counter() - start)
    report["prefill_tokens"] = a.prefill
    report["prefill_tokens_per_s"] = a.prefill / best
    print(f"transformers prefill {a.prefill}: {a.prefill / best:.0f} tokens/s", flush=True)

if a.json:
    with open(a.json, "w") as f:
        json.dump(report, f, indent=2)
