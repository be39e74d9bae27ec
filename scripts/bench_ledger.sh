#!/usr/bin/env bash
# What the usage ledger costs: `tessera serve` on the default model without and with --usage-db, the same
# load at concurrency 64 (tessera bench serve; REQUESTS per run, default 1024), ROUNDS interleaved rounds
# (default 3; this machine is noisy: compare within a round; odd rounds run without the ledger first, even
# rounds with it). Prints output tokens/s and request/s of each run, the ledger's row count and its writer
# thread's share of the server's CPU time, then the median and mean of the on/off ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/tessera}
PORT=${PORT:-18777}
summary='import json,sys; r=json.load(sys.stdin); print("%.0f output tok/s  %.1f req/s  failed %d" % (r["output_tokens_per_s"], r["requests_per_s"], r["failed"]))'
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for round in $(seq 1 "${ROUNDS:-3}"); do
    # Alternate which goes first, so that neither always runs on a machine the other has just warmed.
    order="off on"
    [ $((round % 2)) = 0 ] && order="on off"
    for mode in $order; do
        args=(serve --port "$PORT" --max-num-seqs 64)
        [ "$mode" = on ] && args+=(--usage-db "$dir/usage-$round.db")
        "$BIN" "${args[@]}" 2>"$dir/server.log" &
        pid=$!
        for _ in $(seq 1 100); do curl -sf "localhost:$PORT/ready" >/dev/null && break; sleep 0.1; done
        out=$("$BIN" bench serve --url "http://127.0.0.1:$PORT" --concurrency 64 --requests "${REQUESTS:-1024}" \
            --prompt-len 32 --max-tokens 32 --json)
        # CPU time of the ledger's writer thread against the whole server's (schedstat: nanoseconds on CPU).
        share=$(python3 - "$pid" <<'PY'
import glob, os, sys
total = writer = 0
for task in glob.glob(f"/proc/{sys.argv[1]}/task/*"):
    ns = int(open(os.path.join(task, "schedstat")).read().split()[0])
    total += ns
    writer += ns if open(os.path.join(task, "comm")).read().strip() == "usage-ledger" else 0
print("%.2f%%" % (100 * writer / max(total, 1)))
PY
)
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        rows=-
        [ "$mode" = on ] && rows=$(python3 -c "import sqlite3; print(sqlite3.connect('$dir/usage-$round.db').execute('select count(*) from usage').fetchone()[0])")
        extra=""
        [ "$mode" = on ] && extra="  writer thread $share of the server's CPU"
        echo "round $round ledger $mode: $(echo "$out" | python3 -c "$summary")  rows $rows$extra" | tee -a "$dir/results"
    done
done
python3 - "$dir/results" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"round (\d+) ledger (\w+): (\d+) output", line)
    runs.setdefault(m.group(1), {})[m.group(2)] = int(m.group(3))
ratios = [r["on"] / r["off"] for r in runs.values()]
print("on/off per round: " + " ".join("%.3f" % x for x in ratios))
print("median %.3f  mean %.3f" % (statistics.median(ratios), statistics.mean(ratios)))
PY
