#!/usr/bin/env bash
# Fetches NVRTC (the CUDA runtime compiler, a shared library) from PyPI's nvidia-cuda-nvrtc-cu12 wheel into
# target/cuda-tools, so the kernels' compile-check test runs on a machine with no CUDA and no GPU.
# Prints the directory to put on LD_LIBRARY_PATH. The kernels include no CUDA headers (see
# kernels/cuda/common.cuh), so NVRTC alone is enough.
set -euo pipefail
cd "$(dirname "$0")/.."
version=12.9.86
dest=target/cuda-tools
lib="$PWD/$dest/nvidia/cuda_nvrtc/lib"
if [ ! -e "$lib/libnvrtc.so.12" ]; then
    mkdir -p "$dest/wheels"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --dest "$dest/wheels" "nvidia-cuda-nvrtc-cu12==$version" >&2
    python3 -m zipfile -e "$dest/wheels/nvidia_cuda_nvrtc_cu12-$version"-*.whl "$dest" >&2
fi
echo "$lib"
