# Tessera: one image for the coordinator and the workers (`tessera coordinator`, `tessera worker`).
#
# The binary loads CUDA at run time (driver from the host through the NVIDIA container toolkit; NVRTC,
# cuBLAS and NCCL from this image), so the same image runs CPU-only workers too.
#   docker build -t tessera .
#   docker run --rm -p 8000:8000 tessera serve --host 0.0.0.0

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Every workspace member, and what the sources compile in (`models/`, `.cargo/`); scripts/check-chart.sh
# checks that none is missing, since no machine that runs CI has a Docker engine to find out.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY scripts/protoc scripts/protoc
COPY proto proto
COPY gguf gguf
COPY telemetry telemetry
COPY kernels kernels
COPY worker worker
COPY coordinator coordinator
COPY bench bench
COPY tessera tessera
COPY models models
RUN cargo build --profile dist --locked --bin tessera \
    && install -D -m 0755 target/dist/tessera /out/tessera

# CUDA 12 runtime libraries (cuBLAS, NVRTC, NCCL); no compiler, no headers.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS runtime
# The NCCL runtime package ships only the versioned name; the loader asks for libnccl.so.
RUN ln -s libnccl.so.2 /usr/lib/x86_64-linux-gnu/libnccl.so && ldconfig \
    && groupadd --gid 10001 tessera \
    && useradd --uid 10001 --gid tessera --no-create-home --shell /usr/sbin/nologin tessera \
    && mkdir -p /cache \
    && chown tessera:tessera /cache
COPY --from=build /out/tessera /usr/local/bin/tessera
# The built-in model and compiled kernels are cached here: a writable volume when the root is read-only.
ENV XDG_CACHE_HOME=/cache
USER 10001:10001
EXPOSE 8000 50051 50052
ENTRYPOINT ["/usr/local/bin/tessera"]
CMD ["serve", "--host", "0.0.0.0"]
