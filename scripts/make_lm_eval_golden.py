#!/usr/bin/env python3
"""Makes testdata/lm_eval/golden.json: what lm-evaluation-harness's own `hf` backend (transformers, float32,
CPU) answers for the repository's two tasks on the default model, stories260K. Run once, offline, with
torch, transformers and lm_eval installed; the test (tessera/tests/lm_eval.rs) needs only lm_eval.

  - tessera_ll (loglikelihood, multiple choice): every (doc, choice) loglikelihood and is-greedy flag;
  - tessera_gen (generate_until, through the chat template): every generated text.

Usage: python scripts/make_lm_eval_golden.py   (from the repository root)
"""

import glob
import json
import os
import subprocess
import sys
import tempfile

MODEL = "models/stories260K"


def run(task, extra):
    out = tempfile.mkdtemp()
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={MODEL},dtype=float32", "--device", "cpu",
           "--tasks", task, "--include_path", "testdata/lm_eval", "--batch_size", "1",
           "--log_samples", "--output_path", out] + extra
    subprocess.run(cmd, check=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    [path] = glob.glob(f"{out}/**/samples_{task}_*.jsonl", recursive=True)
    return [json.loads(line) for line in open(path)]


def main():
    ll = run("tessera_ll", [])
    gen = run("tessera_gen", ["--apply_chat_template"])
    golden = {
        "model": MODEL,
        "made_with": "lm_eval hf backend (transformers, torch float32, CPU)",
        "tessera_ll": {str(s["doc_id"]): [[float(r[0][0]), bool(r[0][1])] for r in s["resps"]] for s in ll},
        "tessera_gen": {str(s["doc_id"]): s["resps"][0][0] for s in gen},
    }
    with open("testdata/lm_eval/golden.json", "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(json.dumps(golden, indent=1))


if __name__ == "__main__":
    main()
