#!/usr/bin/env bash
# Fair share, side by side: for each binary given (default target/release/tessera), a fresh
# `tessera serve --api-keys --max-num-seqs 64`; key B's time to first token alone, then while key A keeps
# 200 requests of 128 tokens in flight. Load generators are separate processes (tessera bench serve, from
# the first binary). ROUNDS rounds (default 3), binaries interleaved within each, so that they share the
# machine's moods. B's idle figures follow five warm-up requests. One line per run: B's TTFT p50/p99 idle and under the flood, the p99 ratio, newcomer
# steps (of which run in a paused step), and A's output tokens/s while B was measured.
#
# Settings: MODEL (a model directory; default the built-in stories260K), B_REQUESTS (default 300),
# B_MAX_TOKENS (default 8), WARM (seconds of A's flood before B is measured, default 0: raise it for a
# large model, whose prefills of A's first 64 requests take a while), A_NO_STREAM (set: A's requests ask
# for whole responses, so the server writes one response per request instead of a chunk per token),
# PORT (default 18790).
set -euo pipefail
cd "$(dirname "$0")/.."
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(target/release/tessera)
load=${bins[0]}
port=${PORT:-18790}
dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

a_out=$("$load" keys create --tenant a --id a)
b_out=$("$load" keys create --tenant b --id b)
a_key=$(echo "$a_out" | awk 'NR == 1 {print $NF}')
b_key=$(echo "$b_out" | awk 'NR == 1 {print $NF}')
echo "{\"keys\": [$(echo "$a_out" | sed -n 3p), $(echo "$b_out" | sed -n 3p)]}" >"$dir/keys.json"

metric() { curl -s "localhost:$port/metrics" | awk -v m="$1" '$1 ~ "^"m {s += $NF} END {print s + 0}'; }
ttft() {
    "$load" bench serve --url "http://127.0.0.1:$port" --concurrency 1 --requests "${1:-${B_REQUESTS:-300}}" \
        --prompt-len 16 --max-tokens "${B_MAX_TOKENS:-8}" --api-key "$b_key" --json 2>/dev/null
}

for round in $(seq 1 "${ROUNDS:-3}"); do
    for bin in "${bins[@]}"; do
        args=(serve --port "$port" --api-keys "$dir/keys.json" --max-num-seqs 64)
        [ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
        "$bin" "${args[@]}" 2>"$dir/server.log" &
        server=$!
        pids=("$server")
        for _ in $(seq 1 300); do curl -sf "localhost:$port/ready" >/dev/null && break; sleep 0.1; done
        ttft 5 >/dev/null  # warm-up: the first requests touch cold weights and code
        idle=$(ttft)
        "$load" bench serve --url "http://127.0.0.1:$port" --concurrency 200 --requests 1000000 \
            --prompt-len 16 --max-tokens 128 ${A_NO_STREAM:+--no-stream} --api-key "$a_key" >/dev/null 2>&1 &
        flood=$!
        pids+=("$flood")
        until [ "$(metric 'tessera:num_requests_waiting')" -ge 100 ] 2>/dev/null; do sleep 0.05; done
        sleep "${WARM:-0}"
        n0=$(metric 'tessera:newcomer_steps_total'); p0=$(metric 'tessera:steps_paused_total')
        g0=$(metric 'tessera:generation_tokens_total'); t0=$(date +%s.%N)
        loaded=$(ttft)
        g1=$(metric 'tessera:generation_tokens_total'); t1=$(date +%s.%N)
        n1=$(metric 'tessera:newcomer_steps_total'); p1=$(metric 'tessera:steps_paused_total')
        kill "$flood" "$server"
        wait "$flood" "$server" 2>/dev/null || true
        python3 - "$round" "$bin" "$idle" "$loaded" "$((n1 - n0))" "$((p1 - p0))" "$g0" "$g1" "$t0" "$t1" <<'PY'
import json, sys
rnd, b, idle, loaded, newcomer, paused, g0, g1, t0, t1 = sys.argv[1:]
i, l = json.loads(idle)["ttft_ms"], json.loads(loaded)["ttft_ms"]
# B's own tokens are in the counter too: A's rate is the rest.
b_tokens = json.loads(loaded)["output_tokens_per_s"] * json.loads(loaded)["seconds"]
a_rate = (float(g1) - float(g0) - b_tokens) / (float(t1) - float(t0))
print(f"round {rnd} {b}: B idle {i['p50']:.2f}/{i['p99']:.2f} ms, under A's flood {l['p50']:.2f}/{l['p99']:.2f} ms, "
      f"p99 ratio {l['p99'] / i['p99']:.1f}x; newcomer steps {newcomer} (paused {paused}); A {a_rate:.0f} tok/s")
PY
    done
done
