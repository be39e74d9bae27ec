#!/usr/bin/env bash
# The GPU checks, run on the device machine from binaries built elsewhere (nothing heavy is built here):
#   scripts/build-gpu-bin.sh   (on the build machine: release `tessera` and the CUDA test binaries -> gpu-bin/)
#   scripts/gpu-check.sh       (on the GPU machine, from the repository root)
# Runs the CUDA op tests, the golden models on cuda:0, `tessera bench gpu` and transformers on the same
# shapes, then prints a short table. Logs and JSON go to $OUT (default /tmp/tessera-gpu).
set -uo pipefail
OUT=${OUT:-/tmp/tessera-gpu}
BIN=${BIN:-gpu-bin}
mkdir -p "$OUT"
export TESSERA_REPO=$PWD TESSERA_CACHE_DIR=/tmp/tessera-cache RUST_BACKTRACE=1

# shellcheck source=scripts/gpu-env.sh
source "$(dirname "$0")/gpu-env.sh"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >"$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

declare -a results
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    results+=("$(printf '%-13s %-6s %4ss' "$name" "$([ $rc = 0 ] && echo ok || echo "rc=$rc")" $((SECONDS - t0)))")
    echo "== $name (rc=$rc)"
    tail -n 25 "$OUT/$name.log"
}

step kernels 240 "$BIN/cuda_ops" --ignored --test-threads 1 --nocapture
step golden 240 "$BIN/cuda_golden" --ignored --test-threads 1 --nocapture
step cli 180 bash -c '
    g() { "$0" generate --prompt "Once upon a time" --max-tokens 27 --temperature 0 "$@"; }
    cpu=$(g) && gpu=$(g --device cuda:0) && tp2=$(g --device cuda:0 --tp 2 2>"$1/tp2.err") || exit 1
    printf "cpu: %s\ngpu: %s\ntp2: %s\n" "$cpu" "$gpu" "$tp2"
    grep "NCCL refuses" "$1/tp2.err" || { echo "no fallback warning"; exit 1; }
    [ "$cpu" = "$gpu" ] && [ "$gpu" = "$tp2" ]' "$BIN/tessera" "$OUT"
# `tessera serve --device cuda:0`: steps run on the engine thread's pool, not the thread that loaded the
# model; the API must give the CPU's greedy text, twice.
step serve 120 bash -c '
    B=$0 O=$1
    "$B/tessera" serve --device cuda:0 --port 18001 >"$O/serve.log" 2>&1 &
    trap "kill \$(jobs -p) 2>/dev/null" EXIT
    for _ in $(seq 200); do curl -sf localhost:18001/ready >/dev/null && break; sleep 0.2; done
    for i in 1 2; do
        out=$(curl -s localhost:18001/v1/completions -H "Content-Type: application/json" \
            -d "{\"model\": \"stories260K\", \"prompt\": \"Once upon a time\", \"max_tokens\": 27, \"temperature\": 0}")
        echo "$out"
        echo "$out" | grep -q "little girl named Lily. She loved to play outside in the park." || exit 1
    done' "$BIN" "$OUT"
# Cluster mode with a GPU worker: etcd (carried in gpu-bin/), a worker on cuda:0 registered in it, a
# coordinator that forms the replica; the API must give the CPU's greedy text.
step cluster 120 bash -c '
    B=$0 O=$1
    [ -x "$B/etcd" ] || { echo "no etcd in $B (scripts/build-gpu-bin.sh copies it)"; exit 1; }
    d=$(mktemp -d) ep=http://127.0.0.1:23790
    "$B/etcd" --data-dir "$d/etcd" --listen-client-urls $ep --advertise-client-urls $ep \
        --listen-peer-urls http://127.0.0.1:23800 >"$O/etcd.log" 2>&1 &
    "$B/tessera" worker --etcd $ep --listen 127.0.0.1:0 --device cuda:0 >"$O/worker.log" 2>&1 &
    "$B/tessera" coordinator --etcd $ep --port 18000 >"$O/coordinator.log" 2>&1 &
    trap "kill \$(jobs -p) 2>/dev/null" EXIT
    for _ in $(seq 200); do curl -sf localhost:18000/ready >/dev/null && break; sleep 0.2; done
    out=$(curl -s localhost:18000/v1/completions -H "Content-Type: application/json" \
        -d "{\"model\": \"stories260K\", \"prompt\": \"Once upon a time\", \"max_tokens\": 27, \"temperature\": 0}")
    echo "$out"
    curl -s localhost:18000/v1/cluster | tee "$O/cluster.json" | grep -o "\"device\":\"cuda:0\"" || exit 1
    echo "$out" | grep -q "little girl named Lily. She loved to play outside in the park."' "$BIN" "$OUT"
step tessera 300 "$BIN/tessera" bench gpu --json "$OUT/tessera.json"
# The same 8B shape with its matrices as Q4_K_M-like blocks (Q4_K, the output projection Q6_K), decoded on the
# device: beside bf16 above, what a quantized GGUF file costs and saves there.
step tessera-q4k 300 "$BIN/tessera" bench gpu --quantize q4_k --json "$OUT/tessera-q4k.json"
step transformers 300 python3 scripts/bench_transformers_gpu.py --json "$OUT/transformers.json"

echo
echo "== summary"
printf '%s\n' "${results[@]}"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    try:
        return json.load(open(os.path.join(out, n)))
    except Exception:
        return None
t, h, q = load("tessera.json"), load("transformers.json"), load("tessera-q4k.json")
if t:
    print(f"{t['device']}: copy {t['copy_gb_per_s']:.0f} GB/s, bf16 GEMM {t['gemm_tflop_per_s']:.0f} TFLOP/s")
    hd = {d["batch"]: d for d in (h or {}).get("decode", [])}
    print(f"{'batch':>6} {'tessera tok/s':>14} {'roofline':>9} {'transformers':>13} {'ratio':>6}")
    for d in t["decode"]:
        o = hd.get(d["batch"])
        ratio = f"{d['tokens_per_s'] / o['tokens_per_s']:.2f}x" if o else "-"
        hf = f"{o['tokens_per_s']:.1f}" if o else "-"
        print(f"{d['batch']:>6} {d['tokens_per_s']:>14.1f} {d['roofline_fraction'] * 100:>8.1f}% {hf:>13} {ratio:>6}")
    hp = h.get("prefill_tokens_per_s") if h else None
    print(f"prefill {t['prefill_tokens']}: {t['prefill_tokens_per_s']:.0f} tok/s = "
          f"{t['prefill_fraction_of_gemm'] * 100:.1f}% of GEMM rate; transformers "
          + (f"{hp:.0f} tok/s ({t['prefill_tokens_per_s'] / hp:.2f}x)" if hp else "-"))
if t and q:
    qd = {d["batch"]: d for d in q["decode"]}
    print(f"{q['shape']}: {q['weight_bytes_per_token'] / 1e9:.2f} GB of weights per token against "
          f"{t['weight_bytes_per_token'] / 1e9:.2f} (bf16)")
    for d in t["decode"]:
        o = qd.get(d["batch"])
        if o:
            print(f"  batch {d['batch']:>3}: {o['tokens_per_s']:.1f} tok/s against bf16 {d['tokens_per_s']:.1f} "
                  f"({o['tokens_per_s'] / d['tokens_per_s']:.2f}x)")
    print(f"  prefill {q['prefill_tokens']}: {q['prefill_tokens_per_s']:.0f} tok/s against bf16 "
          f"{t['prefill_tokens_per_s']:.0f}")
PY
