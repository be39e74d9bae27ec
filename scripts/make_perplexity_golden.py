#!/usr/bin/env python3
"""Makes testdata/perplexity/golden.json: the perplexity of models/stories260K on
testdata/perplexity/tinystories.txt as llama.cpp's `llama-perplexity` defines it, computed with
Hugging Face `transformers` (float32, CPU). CI needs no torch: the output is committed.

    target/peft-venv/bin/python scripts/make_perplexity_golden.py

llama-perplexity's procedure (tools/perplexity/perplexity.cpp): tokenize the whole file with BOS; cut
it into len // n_ctx chunks of n_ctx tokens; in each chunk put BOS in place of the first token; score the
tokens at positions n_ctx/2 + 1 .. n_ctx - 1 by the log-softmax of the logits before them; PPL is
exp(mean NLL) over all scored tokens, printed after each chunk, and its error estimate
sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)) * PPL.
"""

import json
import math
import pathlib

import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "stories260K"
TEXT = ROOT / "testdata" / "perplexity" / "tinystories.txt"
CONTEXTS = [64, 128]


def main():
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.eval()
    tokens = tok(TEXT.read_text(), add_special_tokens=True).input_ids
    assert tokens[0] == tok.bos_token_id
    runs = []
    for n_ctx in CONTEXTS:
        first = n_ctx // 2
        nll = nll2 = 0.0
        count = 0
        running = []
        for c in range(len(tokens) // n_ctx):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
            chunk[0] = tok.bos_token_id
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([chunk])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for pos in range(first + 1, n_ctx):
                v = -logp[pos - 1, chunk[pos]].item()
                nll += v
                nll2 += v * v
                count += 1
            running.append(math.exp(nll / count))
        mean = nll / count
        var = nll2 / count - mean * mean
        ppl = math.exp(mean)
        runs.append({"context": n_ctx, "chunks": len(running), "scored_tokens": count, "ppl": ppl,
                     "ppl_error": math.sqrt(var / (count - 1)) * ppl, "running_ppl": running})
    out = {"produced_by": f"transformers {transformers.__version__}, torch {torch.__version__}, float32 CPU",
           "model": "models/stories260K", "text": "testdata/perplexity/tinystories.txt",
           "tokens": len(tokens), "runs": runs}
    (ROOT / "testdata" / "perplexity" / "golden.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
