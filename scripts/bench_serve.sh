#!/usr/bin/env bash
# Serving benchmark: starts `tessera serve` on a model, drives it with `tessera bench serve` at
# concurrency 1, 8 and 64, then stops it. Not run in CI (it measures, it does not check).
#
#   scripts/bench_serve.sh [MODEL_DIR|default] [PROMPT_LEN] [MAX_TOKENS] [VOCAB] [extra serve args...]
#
# The 124.7M benchmark shape: target/release/tessera bench --models synthetic --save-synthetic /tmp/bench-model
# then scripts/bench_serve.sh /tmp/bench-model 128 64 32000 --kv-cache-mib 2048
set -euo pipefail
cd "$(dirname "$0")/.."
tessera=${TESSERA:-target/release/tessera}
model=${1:-default}; prompt_len=${2:-64}; max_tokens=${3:-64}; vocab=${4:-500}
shift $(( $# < 4 ? $# : 4 ))
port=${PORT:-8177}
args=(serve --port "$port" --max-num-seqs 64 "$@")
[ "$model" = default ] || args+=(--model "$model")
"$tessera" "${args[@]}" 2>/tmp/tessera-bench-serve.log &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
for c in 1 8 64; do
  case $c in 1) n=${R1:-8};; 8) n=${R8:-32};; 64) n=${R64:-128};; esac
  echo "--- concurrency $c, $n requests"
  "$tessera" bench serve --url "http://127.0.0.1:$port" --concurrency "$c" --requests "$n" \
    --prompt-len "$prompt_len" --max-tokens "$max_tokens" --vocab "$vocab"
done
