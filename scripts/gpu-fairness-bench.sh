#!/usr/bin/env bash
# The fair-share check of the paid-endpoint issue on a GPU server, run on the device machine from gpu-bin/:
# `tessera serve --device cuda:0 --api-keys ... --max-num-seqs 64` on stories260K; key B sends one request
# at a time (60 requests, 8 tokens), first alone, then while key A keeps 200 requests in flight (128 tokens
# each) with a backlog; B's TTFT percentiles both times, and one more request of A's for comparison.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh
T=${BIN:-gpu-bin}/tessera
d=$(mktemp -d)
a=$("$T" keys create --tenant flood --id flood) || exit 1
b=$("$T" keys create --tenant single --id single) || exit 1
printf '{"keys": [%s, %s]}\n' "$(echo "$a" | tail -n 1)" "$(echo "$b" | tail -n 1)" >"$d/keys.json"
ka=$(echo "$a" | head -n 1 | awk '{print $NF}')
kb=$(echo "$b" | head -n 1 | awk '{print $NF}')
"$T" serve --device cuda:0 --port ${PORT:-18002} --api-keys "$d/keys.json" --max-num-seqs 64 >"$d/serve.log" 2>&1 &
srv=$!
flood=
# Stop the load first, then the server, and wait for both: a second run must find the port free.
trap 'kill $flood 2>/dev/null; kill $srv 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 200); do curl -sf localhost:${PORT:-18002}/ready >/dev/null && break; sleep 0.2; done
url=http://127.0.0.1:${PORT:-18002}
load() { "$T" bench serve --url $url --model stories260K --vocab 500 --prompt-len 16 "$@"; }
load --api-key "$kb" --concurrency 1 --requests 10 --max-tokens 8 >/dev/null   # compiles the kernels
echo "=== B alone"
load --api-key "$kb" --concurrency 1 --requests 60 --max-tokens 8
load --api-key "$ka" --concurrency 200 --requests 100000 --max-tokens 128 >/dev/null 2>&1 &
flood=$!
for _ in $(seq 300); do
  w=$(curl -s $url/metrics | awk '/^tessera:num_requests_waiting/ {print $NF}')
  [ "${w%.*}" -ge 100 ] 2>/dev/null && break
  sleep 0.1
done
echo "=== B under A's flood (A waiting: $w)"
load --api-key "$kb" --concurrency 1 --requests 60 --max-tokens 8
echo "=== one more of A's"
load --api-key "$ka" --concurrency 1 --requests 3 --max-tokens 8
echo "A waiting at the end: $(curl -s $url/metrics | awk '/^tessera:num_requests_waiting/ {print $NF}')"
# On a GPU a step costs about the same whatever its size, so B's prefills should ride along with A's
# decodes: only the separate steps that measure a size (about one a second) are expected here.
echo "newcomer steps: $(curl -s $url/metrics | awk '/^tessera:newcomer_steps_total/ {print $NF}') (B sent 60)"
