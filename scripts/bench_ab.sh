#!/usr/bin/env bash
# Two builds side by side: serving the 124.7M benchmark shape at concurrency 64 (prompt 64, output 64,
# unconstrained), alternating between binary A and binary B for ROUNDS rounds on the same machine, so that
# a change can be shown not to slow serving down. Not run in CI. Use an even number of rounds.
#
#   scripts/bench_ab.sh BIN_A BIN_B [ROUNDS] [REQUESTS]
#
# The load generator is BIN_A's for both (CLIENT=BIN to choose another), so that only the servers differ.
# e.g. git worktree add /tmp/old <commit>; (cd /tmp/old && cargo build --release); cp .../tessera /tmp/tessera-old
set -euo pipefail
cd "$(dirname "$0")/.."
a=$1; b=$2; rounds=${3:-3}; requests=${4:-128}
model=${MODEL:-/tmp/bench-model}
[ -f "$model/model.safetensors" ] || "$b" bench --models synthetic --save-synthetic "$model" >/dev/null
port=${PORT:-8179}
client=${CLIENT:-$a}
one() {
  local bin=$1
  "$bin" serve --port "$port" --model "$model" --max-num-seqs 64 --kv-cache-mib 2048 2>/dev/null &
  local pid=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
  # A warm-up, then the measured run.
  "$client" bench serve --url "http://127.0.0.1:$port" --concurrency 64 --requests 64 --prompt-len 64 \
    --max-tokens 64 --vocab 32000 --json >/dev/null
  "$client" bench serve --url "http://127.0.0.1:$port" --concurrency 64 --requests "$requests" --prompt-len 64 \
    --max-tokens 64 --vocab 32000 --json | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("%.1f tok/s, ITL p50 %.1f ms, scheduler %.1f us/step, %d failed"
      % (r["output_tokens_per_s"], r["itl_ms"]["p50"], r["scheduler_us_per_step"], r["failed"]))'
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
# A then B in odd rounds, B then A in even ones: the machine drifts within minutes, and a fixed order
# would hand that drift to one side.
for r in $(seq "$rounds"); do
  if (( r % 2 )); then
    echo "round $r: A $(one "$a")"
    echo "round $r: B $(one "$b")"
  else
    echo "round $r: B $(one "$b")"
    echo "round $r: A $(one "$a")"
  fi
done
