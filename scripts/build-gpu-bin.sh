#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs, on a machine without a GPU (CUDA is loaded at run time, so no
# CUDA is needed here): the release `tessera` and the CUDA test binaries, stripped, into gpu-bin/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin tessera
msg=$(cargo test --release --no-run --message-format=json -p tessera-kernels --test cuda_ops -p tessera-worker --test cuda_golden 2>/dev/null)
rm -rf gpu-bin && mkdir -p gpu-bin
cp target/release/tessera gpu-bin/
for t in cuda_ops cuda_golden; do
    exe=$(echo "$msg" | python3 -c "import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get('reason') == 'compiler-artifact' and m['target']['name'] == '$t' and m.get('executable'):
        print(m['executable'])")
    cp "$exe" "gpu-bin/$t"
done
strip gpu-bin/*
# etcd for the cluster-mode check (Debian's etcd-server; the device machine has no package manager access).
if command -v etcd >/dev/null; then cp "$(command -v etcd)" gpu-bin/; fi
ls -la gpu-bin
