// Projections of a few rows (decode: one row per sequence), y[m, n] = x[m, k] · w[n, k]ᵀ (+ bias), for
// m <= GEMV_MAX_M and k a multiple of 8. Reading the weight is all that matters here: each weight row is
// read exactly once, 16 bytes per load, and used for every row of x (x is small and stays in L1/L2).
// One warp per output column; lane j takes the 16-byte chunks j, j + 32, ... of k, GEMV_UNROLL of them
// per pass with all loads issued before any arithmetic, so enough bytes are in flight to cover the
// memory latency. A warp reduction finishes each dot product. f32 accumulation; y in bf16, or f32 when
// y_f32 (logits). Bias (bf16) is optional (0).

#define GEMV_MAX_M 4
#define GEMV_WARPS 4
#define GEMV_UNROLL 4

struct alignas(16) w8 {
    u32 a, b, c, d;
};

__device__ __forceinline__ float dot8w(w8 x, w8 w) {
    return __uint_as_float(x.a << 16) * __uint_as_float(w.a << 16) +
           __uint_as_float(x.a & 0xffff0000u) * __uint_as_float(w.a & 0xffff0000u) +
           __uint_as_float(x.b << 16) * __uint_as_float(w.b << 16) +
           __uint_as_float(x.b & 0xffff0000u) * __uint_as_float(w.b & 0xffff0000u) +
           __uint_as_float(x.c << 16) * __uint_as_float(w.c << 16) +
           __uint_as_float(x.c & 0xffff0000u) * __uint_as_float(w.c & 0xffff0000u) +
           __uint_as_float(x.d << 16) * __uint_as_float(w.d << 16) +
           __uint_as_float(x.d & 0xffff0000u) * __uint_as_float(w.d & 0xffff0000u);
}

extern "C" __global__ void gemv_bf16(const bf16* x, const bf16* w, u64 bias_ptr, u64 y_ptr, int y_f32, int m, int k,
                                     int n) {
    const int lane = threadIdx.x & 31;
    const int col = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (col >= n) return;  // the whole warp leaves together
    const int chunks = k / 8;
    const w8* wr = (const w8*)(w + (size_t)col * k);
    const w8* xr = (const w8*)x;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) acc[i] = 0.0f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * GEMV_UNROLL) {
        w8 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
            wv[u] = c < chunks ? wr[c] : w8{0u, 0u, 0u, 0u};
        }
#pragma unroll
        for (int i = 0; i < GEMV_MAX_M; i++) {
            if (i < m) {
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL; u++) {
                    const int c = c0 + 32 * u;
                    if (c < chunks) acc[i] += dot8w(xr[(size_t)i * chunks + c], wv[u]);
                }
            }
        }
    }
    const bf16* bias = (const bf16*)bias_ptr;
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) {
        if (i < m) {
            float s = warp_sum(acc[i]);
            if (lane == 0) {
                if (bias) s += bf2f(bias[col]);
                if (y_f32) ((float*)y_ptr)[(size_t)i * n + col] = s;
                else ((bf16*)y_ptr)[(size_t)i * n + col] = f2bf(s);
            }
        }
    }
}
