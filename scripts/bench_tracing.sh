#!/usr/bin/env bash
# Throughput cost of tracing: the same concurrency-64 load on `tessera serve` with tracing off, and with
# every request traced (sampling 1.0) and exported over OTLP to a local receiver, alternating runs.
#   cargo build --release && cargo build --release --example otlp_sink && scripts/bench_tracing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tessera=${TESSERA:-target/release/tessera}
sink=${SINK:-target/release/examples/otlp_sink}
port=8178; sink_addr=127.0.0.1:4319
"$sink" "$sink_addr" 2>/tmp/tessera-otlp-sink.log &
sink_pid=$!
trap 'kill $sink_pid 2>/dev/null || true' EXIT
run() {
  "$tessera" serve --port "$port" --max-num-seqs 64 "$@" 2>/dev/null &
  local pid=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
  "$tessera" bench serve --url "http://127.0.0.1:$port" --concurrency 64 --requests "${REQUESTS:-512}" \
    --prompt-len 64 --max-tokens 64 --json | grep -E '"output_tokens_per_s"' | tr -dc '0-9.\n'
  kill $pid; wait $pid 2>/dev/null || true
}
for round in $(seq "${ROUNDS:-3}"); do
  off=$(run)
  before=$(tail -1 /tmp/tessera-otlp-sink.log | tr -dc '0-9')
  # Flush every 200 ms with room for every span, so that all of them are exported (and paid for).
  on=$(OTEL_BSP_SCHEDULE_DELAY=200 OTEL_BSP_MAX_QUEUE_SIZE=262144 run --otlp-endpoint "http://$sink_addr" --otlp-sampling-ratio 1.0)
  sleep 1.2
  after=$(tail -1 /tmp/tessera-otlp-sink.log | tr -dc '0-9')
  echo "round $round: $((after - before)) spans exported" 
  echo "round $round: off $off tok/s, on $on tok/s, cost $(python3 -c "print(f'{(1 - $on / $off) * 100:.1f}%')")"
done
tail -1 /tmp/tessera-otlp-sink.log
