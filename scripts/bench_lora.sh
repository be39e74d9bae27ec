#!/usr/bin/env bash
# What serving LoRA fine-tunes costs: the 124.7M benchmark shape with 8 random rank-16 adapters on all seven
# projections, loaded at start. Rounds alternate, against the same server, between the base model alone and
# the same load spread over the 8 adapters (requests take turns), so the two are measured side by side on
# the same noisy machine. Then one adapter is loaded while the base streams at the same concurrency, and
# the longest gap between two tokens of any stream then is compared with the steps around it. Not run in CI.
#
#   scripts/bench_lora.sh [ROUNDS] [REQUESTS] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
tessera=${TESSERA:-target/release/tessera}
python=${PYTHON:-target/ci-venv/bin/python}
rounds=${1:-3}; requests=${2:-96}; concurrency=${3:-32}
model=${MODEL:-/tmp/bench-model}
adapters=${ADAPTERS:-/tmp/bench-loras}
[ -f "$model/model.safetensors" ] || "$tessera" bench --models synthetic --save-synthetic "$model" >/dev/null
# Random PEFT adapters for the model's shape (numpy + safetensors, as PEFT writes them).
"$python" - "$model" "$adapters" <<'PY'
import json, os, sys
import numpy as np
from safetensors.numpy import save_file
model, out = sys.argv[1], sys.argv[2]
c = json.load(open(os.path.join(model, "config.json")))
h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
hd = c.get("head_dim") or h // c["num_attention_heads"]
q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
          "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
r = 16
for a in range(8):
    d = os.path.join(out, f"lora{a}")
    if os.path.exists(os.path.join(d, "adapter_model.safetensors")):
        continue
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(a)
    t = {}
    for l in range(layers):
        for m, (fin, fout) in shapes.items():
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            p = f"base_model.model.model.layers.{l}.{part}.{m}"
            t[f"{p}.lora_A.weight"] = (rng.standard_normal((r, fin)) * 0.01).astype(np.float32)
            t[f"{p}.lora_B.weight"] = (rng.standard_normal((fout, r)) * 0.01).astype(np.float32)
    save_file(t, os.path.join(d, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": list(shapes), "bias": "none"},
              open(os.path.join(d, "adapter_config.json"), "w"))
PY
port=${PORT:-8179}
loras=()
names=()
for a in $(seq 0 7); do loras+=(--lora "lora$a=$adapters/lora$a"); names+=("lora$a"); done
"$tessera" serve --port "$port" --model "$model" --max-num-seqs 64 --kv-cache-mib 2048 "${loras[@]}" \
  2>/tmp/tessera-bench-lora.log &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
all=$(IFS=,; echo "${names[*]}")
run() {
  local n=$1; shift
  "$tessera" bench serve --url "http://127.0.0.1:$port" --concurrency "$concurrency" --requests "$n" \
    --prompt-len 64 --max-tokens 64 --vocab 32000 --json "$@"
}
field() { "$python" -c 'import json,sys; r=json.load(sys.stdin); print(r["output_tokens_per_s"], r["itl_ms"]["max"], r["failed"])'; }
run 32 --model bench-model >/dev/null
run 32 --model "$all" >/dev/null
for r in $(seq "$rounds"); do
  base=$(run "$requests" --model bench-model | field)
  lora=$(run "$requests" --model "$all" | field)
  "$python" - "$r" $base $lora <<'PY'
import sys
r, b, bi, bf, l, li, lf = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6], sys.argv[7]
print(f"round {r}: base {b:.1f} tok/s (longest gap {float(bi):.1f} ms, {bf} failed), 8 adapters {l:.1f} tok/s "
      f"(longest gap {float(li):.1f} ms, {lf} failed): {100 * l / b:.1f}%")
PY
done
# Loading while serving: a ninth adapter loaded in the middle of a run on the base at the same concurrency.
run "$requests" --model bench-model > /tmp/tessera-bench-lora-during.json &
load_gen=$!
sleep 2
t0=$(date +%s.%N)
curl -sf "http://127.0.0.1:$port/v1/unload_lora_adapter" -H 'content-type: application/json' \
  -d '{"lora_name": "lora7"}' >/dev/null
curl -sf "http://127.0.0.1:$port/v1/load_lora_adapter" -H 'content-type: application/json' \
  -d "{\"lora_name\": \"lora7b\", \"lora_path\": \"$adapters/lora7\"}" >/dev/null
t1=$(date +%s.%N)
wait $load_gen
"$python" - "$t0" "$t1" <<'PY'
import json, sys
t0, t1 = float(sys.argv[1]), float(sys.argv[2])
r = json.load(open("/tmp/tessera-bench-lora-during.json"))
print(f"unload + load while serving took {1000 * (t1 - t0):.0f} ms (HTTP round trips included); during that run "
      f"ITL p50 {r['itl_ms']['p50']:.1f} ms, p99 {r['itl_ms']['p99']:.1f} ms, longest gap of any stream "
      f"{r['itl_ms']['max']:.1f} ms")
PY
grep -o 'LoRA adapter loaded.*' /tmp/tessera-bench-lora.log | tail -1 || true
