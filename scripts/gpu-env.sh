# Sourced by the device-machine scripts: puts the CUDA libraries cudarc loads on the library path.
# cudarc dlopens libcuda.so.1 (the driver's own, found by the loader), libnvrtc.so.{13,12} and
# libcublas.so.{13,12} by name: put the directories holding the last two on the search path. Never the
# toolkit's compat/ or stubs/ libcuda: loading either instead of the driver's fails with error 803.
dirs=$(find /usr/local/cuda* /opt /usr/local/lib/python3* \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' \) \
    2>/dev/null | grep -v -e /compat/ -e /stubs/ | xargs -r -n1 dirname | sort -u | tr '\n' ':')
# cudarc looks NCCL up as libnccl.so; the pip wheel ships only libnccl.so.2: link it under that name.
mkdir -p /tmp/tessera-nccl
nccl=$(find /opt /usr/local /usr/lib -name 'libnccl.so.2*' 2>/dev/null | head -n 1)
[ -n "$nccl" ] && ln -sf "$nccl" /tmp/tessera-nccl/libnccl.so
export LD_LIBRARY_PATH="${dirs}/tmp/tessera-nccl:${LD_LIBRARY_PATH:-}"
