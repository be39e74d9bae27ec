#!/usr/bin/env bash
# What the usage ledger costs: `tessera serve` on the default model without and with --usage-db, the same
# load at concurrency 64 (tessera bench serve), three interleaved rounds (this machine is noisy: compare
# within a round). Prints output tokens/s and request/s of each run, and the ledger's row count.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/tessera}
PORT=${PORT:-18777}
summary='import json,sys; r=json.load(sys.stdin); print("%.0f output tok/s  %.1f req/s  failed %d" % (r["output_tokens_per_s"], r["requests_per_s"], r["failed"]))'
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for round in 1 2 3; do
    for mode in off on; do
        args=(serve --port "$PORT" --max-num-seqs 64)
        [ "$mode" = on ] && args+=(--usage-db "$dir/usage-$round.db")
        "$BIN" "${args[@]}" 2>"$dir/server.log" &
        pid=$!
        for _ in $(seq 1 100); do curl -sf "localhost:$PORT/ready" >/dev/null && break; sleep 0.1; done
        out=$("$BIN" bench serve --url "http://127.0.0.1:$PORT" --concurrency 64 --requests 1024 \
            --prompt-len 32 --max-tokens 32 --json)
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        rows=-
        [ "$mode" = on ] && rows=$(python3 -c "import sqlite3; print(sqlite3.connect('$dir/usage-$round.db').execute('select count(*) from usage').fetchone()[0])")
        echo "round $round ledger $mode: $(echo "$out" | python3 -c "$summary")  rows $rows"
    done
done
