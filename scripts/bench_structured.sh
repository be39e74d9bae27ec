#!/usr/bin/env bash
# What constrained decoding costs: the 124.7M benchmark shape (vocabulary 32000, byte-fallback pieces) served
# at concurrency 64, unconstrained requests and JSON-schema requests in alternating rounds against the same
# server, so the two are measured side by side on the same noisy machine. Not run in CI.
#
#   scripts/bench_structured.sh [ROUNDS] [REQUESTS] [MAX_TOKENS]
#
# The schema is a list of at least 16 objects (a string with a bound and an integer each), longer than
# MAX_TOKENS, so both kinds of request generate MAX_TOKENS tokens: a JSON request that completes early
# spends more of its time on its prompt, and its output rate would then measure that, not the constraint.
set -euo pipefail
cd "$(dirname "$0")/.."
tessera=${TESSERA:-target/release/tessera}
rounds=${1:-3}; requests=${2:-128}; max_tokens=${3:-64}
model=${MODEL:-/tmp/bench-model}
[ -f "$model/model.safetensors" ] || "$tessera" bench --models synthetic --save-synthetic "$model" >/dev/null
port=${PORT:-8178}
"$tessera" serve --port "$port" --model "$model" --max-num-seqs 64 --kv-cache-mib 2048 2>/tmp/tessera-bench-structured.log &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
schema='{"response_format": {"type": "json_schema", "json_schema": {"name": "order", "schema": {"type": "object",
  "properties": {"items": {"type": "array", "minItems": 16, "items": {"type": "object", "properties": {"name": {"type": "string",
  "maxLength": 12}, "qty": {"type": "integer", "minimum": 0}}, "required": ["name", "qty"],
  "additionalProperties": false}}}, "required": ["items"], "additionalProperties": false}}}}'
run() {
  local n=$1; shift
  "$tessera" bench serve --url "http://127.0.0.1:$port" --concurrency 64 --requests "$n" \
    --prompt-len 64 --max-tokens "$max_tokens" --vocab 32000 --json "$@"
}
# One warm-up of each, so the first measured round pays no one-time cost (the grammar compiler's vocabulary).
run 64 >/dev/null
run 64 --extra-body "$schema" >/dev/null
for r in $(seq "$rounds"); do
  plain=$(run "$requests" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["output_tokens_per_s"], r["scheduler_us_per_step"], r["failed"])')
  json=$(run "$requests" --extra-body "$schema" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["output_tokens_per_s"], r["scheduler_us_per_step"], r["failed"])')
  python3 - "$r" $plain $json <<'PY'
import sys
r, p, ps, pf, j, js, jf = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6], sys.argv[7]
print(f"round {r}: unconstrained {p:.1f} tok/s (scheduler {ps} us/step, {pf} failed), "
      f"json_schema {j:.1f} tok/s ({js} us/step, {jf} failed): {100 * j / p:.1f}%")
PY
done
