#!/usr/bin/env python3
"""Makes the LoRA adapter fixtures of testdata/lora/ and their golden outputs, with PyPI `peft` and
`transformers` on torch (float32, CPU). CI needs no torch: the outputs are committed.

    python3 -m venv target/peft-venv
    target/peft-venv/bin/pip install torch peft "transformers==5.25.0" safetensors
    target/peft-venv/bin/python scripts/make_lora_fixtures.py

For each base model, several adapters with random non-zero A and B (PEFT initialises B to zero, which would
make every adapter the base model), different ranks and target sets, one with rsLoRA, one that skips a
layer; each written by `save_pretrained` as Hugging Face users get them. `golden.json` holds, per adapter
and prompt, the prompt's ids, the greedy continuation (EOS ignored) and the logits at the last prompt
position, computed by `PeftModel` over the base.
"""

import json
import pathlib
import shutil
import zlib

import peft
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / "testdata" / "models"
OUT = ROOT / "testdata" / "lora"
NEW_TOKENS = 24

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (base model, adapter name, LoraConfig arguments)
ADAPTERS = [
    ("tiny-llama3", "qv-r8", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    ("tiny-llama3", "all-r4-rslora", dict(r=4, lora_alpha=8, target_modules=ALL, use_rslora=True)),
    ("tiny-llama3", "mlp-o-r16", dict(r=16, lora_alpha=8, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
                                      layers_to_transform=[0, 2])),
    ("tiny-qwen2", "all-r8", dict(r=8, lora_alpha=32, target_modules=ALL)),
]

PROMPTS = ["Once upon a time", "The little dog ran to the park and saw a big red ball", "Lily"]


def main():
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    golden = {}
    for base_name in sorted({a[0] for a in ADAPTERS}):
        base_dir = MODELS / base_name
        tok = transformers.AutoTokenizer.from_pretrained(base_dir)
        cases = {}
        for model_name, name, args in ADAPTERS:
            if model_name != base_name:
                continue
            base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            cfg = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **args)
            model = peft.get_peft_model(base, cfg)
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "lora_A" in pname or "lora_B" in pname:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            out_dir = OUT / base_name / name
            model.save_pretrained(out_dir)
            # The model card PEFT writes is a template; the base path it records is this machine's.
            (out_dir / "README.md").unlink(missing_ok=True)
            cfg_path = out_dir / "adapter_config.json"
            saved = json.loads(cfg_path.read_text())
            saved["base_model_name_or_path"] = f"testdata/models/{base_name}"
            cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
            model.eval()
            per_prompt = []
            for prompt in PROMPTS:
                ids = tok(prompt, return_tensors="pt").input_ids
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0, -1].tolist()
                    gen = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                    )[0, ids.shape[1]:].tolist()
                per_prompt.append(
                    {"prompt": prompt, "prompt_ids": ids[0].tolist(), "greedy_ids": gen, "last_prompt_logits": logits}
                )
            cases[name] = per_prompt
        golden[base_name] = cases
    (OUT / "golden.json").write_text(
        json.dumps(
            {
                "produced_by": f"peft {peft.__version__}, transformers {transformers.__version__}, "
                f"torch {torch.__version__}, float32 CPU, greedy, EOS ignored",
                "new_tokens": NEW_TOKENS,
                "models": golden,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
