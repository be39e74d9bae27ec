#!/usr/bin/env bash
# The serving benchmark (scripts/bench_serve.sh: the load generator at concurrency 1, 8 and 64) on a GPU,
# run on the device machine from gpu-bin/ (scripts/build-gpu-bin.sh): stories260K and the 124.7M benchmark
# shape (generated there: too large to carry), each served with --device cuda:0.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu-env.sh
set +e; source scripts/gpu-env.sh; set -e
export TESSERA=${BIN:-gpu-bin}/tessera
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$TESSERA" bench --models synthetic --save-synthetic /tmp/bench-model --batch 1 --steps 2 --prefill 16 \
  --context 8 >/dev/null
echo "=== stories260K, prompt 64, 64 tokens"
R1=16 R8=64 R64=256 scripts/bench_serve.sh default 64 64 500 --device cuda:0
echo "=== 124.7M, prompt 128, 64 tokens"
R1=16 R8=64 R64=256 scripts/bench_serve.sh /tmp/bench-model 128 64 32000 --device cuda:0 --kv-cache-mib 4096
echo "=== 124.7M, prompt 16, 128 tokens"
R1=8 R8=32 R64=128 scripts/bench_serve.sh /tmp/bench-model 16 128 32000 --device cuda:0 --kv-cache-mib 4096
