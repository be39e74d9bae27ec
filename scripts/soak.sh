#!/usr/bin/env bash
# Soak test (not in CI: it takes half an hour). Starts `tessera serve --tp 2` on the default model, drives
# it with scripts/soak.py (mixed load at concurrency 64: streams and not, n > 1, stop strings, logprobs,
# hang-ups at random points, slow readers) and SIGKILLs one of its workers every KILL_EVERY seconds. At the
# end it checks that:
#   - every request is accounted for: answered, hung up by its client, or a 503 while no replica was ready
#     (soak.py counts them; any other outcome fails the run);
#   - nothing is left running or waiting, and the KV pool is empty (/metrics);
#   - the server's RSS after the last request is within 10% of its RSS after the first minute.
#
#   scripts/soak.sh [DURATION_S=1800] [CONCURRENCY=64] [KILL_EVERY_S=300]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-1800}; concurrency=${2:-64}; kill_every=${3:-300}
tessera=${TESSERA:-target/release/tessera}
python=${PYTHON:-python3}
port=${PORT:-8188}
log=${LOG:-/tmp/tessera-soak.log}
[ -x "$tessera" ] || cargo build --release --locked --bin tessera
"$tessera" serve --tp 2 --port "$port" --max-num-seqs 64 --kv-cache-mib 64 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/ready" >/dev/null || { echo "server did not become ready; log: $log"; exit 1; }

rss() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }
metric() {  # sum of a metric's samples
  curl -sf "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 {s += $2} END {print s + 0}'
}

"$python" scripts/soak.py "http://127.0.0.1:$port" "$duration" "$concurrency" >/tmp/tessera-soak-result.json &
load=$!
start=$(date +%s)
sleep 60
rss_first_minute=$(rss)
echo "RSS after the first minute: ${rss_first_minute} kB"
kills=0
while kill -0 "$load" 2>/dev/null; do
  now=$(date +%s)
  if (( now - start >= (kills + 1) * kill_every && now - start < duration - 30 )); then
    victim=$(pgrep -P "$pid" | tail -n 1 || true)
    if [ -n "$victim" ]; then
      kill -9 "$victim"
      kills=$((kills + 1))
      echo "$(date +%T) SIGKILLed worker $victim (kill $kills)"
    fi
  fi
  sleep 1
done
wait "$load" && load_ok=1 || load_ok=0
result=$(cat /tmp/tessera-soak-result.json)
echo "load: $result"

# The last stream's bookkeeping finishes just after its [DONE]: wait for the gauges to settle.
for _ in $(seq 100); do
  [ "$(metric tessera:num_requests_running)" = 0 ] && [ "$(metric tessera:num_requests_waiting)" = 0 ] && break
  sleep 0.1
done
# An idle server gives freed memory back every 5 s (`give_back_memory_when_idle`): let it.
sleep 6
running=$(metric tessera:num_requests_running); waiting=$(metric tessera:num_requests_waiting)
kv=$(metric tessera:kv_cache_usage_perc)
rss_end=$(rss)
growth=$(awk -v a="$rss_first_minute" -v b="$rss_end" 'BEGIN {printf "%.1f", (b - a) * 100 / a}')
echo "after the last request: running $running, waiting $waiting, kv_cache_usage_perc $kv, RSS ${rss_end} kB (${growth}% vs the first minute), worker kills $kills"
echo "server: requests ok $(metric tessera:request_success_total), failed $(metric tessera:request_failure_total), migrated sequences $(metric tessera:migrated_sequences_total), replica failures $(metric tessera:replica_failures_total)"
ok=1
[ "$load_ok" = 1 ] || { echo "FAIL: some requests were not accounted for (see failures above)"; ok=0; }
[ "$running" = 0 ] && [ "$waiting" = 0 ] || { echo "FAIL: requests left running or waiting"; ok=0; }
awk -v k="$kv" 'BEGIN {exit !(k == 0)}' || { echo "FAIL: KV blocks still in use"; ok=0; }
awk -v g="$growth" 'BEGIN {exit !(g <= 10)}' || { echo "FAIL: RSS grew more than 10%"; ok=0; }
[ "$ok" = 1 ] && echo "soak passed" || exit 1
