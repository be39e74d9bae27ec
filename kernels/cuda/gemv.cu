// Projections of a few rows (decode: one row per sequence), y[m, n] = x[m, k] · w[n, k]ᵀ (+ bias), for
// m <= GEMV_MAX_M and k a multiple of 8. Reading the weight is all that matters here, so each weight row
// is read exactly once, 16 bytes per load, and used for every row of x. Each warp owns GEMV_RPW
// consecutive output columns (so every x load serves that many weight rows); lane j takes the 16-byte
// chunks j, j + 32, ... of k; a warp reduction finishes each dot product. f32 accumulation; y in bf16, or
// f32 when y_f32 (logits). Bias (bf16) is optional (0).

#define GEMV_MAX_M 16
#define GEMV_RPW 4
#define GEMV_WARPS 8

struct alignas(16) w8 {
    u32 a, b, c, d;
};

__device__ __forceinline__ void unpack8(w8 v, float* f) {
    f[0] = __uint_as_float(v.a << 16);
    f[1] = __uint_as_float(v.a & 0xffff0000u);
    f[2] = __uint_as_float(v.b << 16);
    f[3] = __uint_as_float(v.b & 0xffff0000u);
    f[4] = __uint_as_float(v.c << 16);
    f[5] = __uint_as_float(v.c & 0xffff0000u);
    f[6] = __uint_as_float(v.d << 16);
    f[7] = __uint_as_float(v.d & 0xffff0000u);
}

extern "C" __global__ void gemv_bf16(const bf16* x, const bf16* w, u64 bias_ptr, u64 y_ptr, int y_f32, int m, int k,
                                     int n) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int col0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_RPW;
    if (col0 >= n) return;  // whole warp leaves together
    const int chunks = k / 8;
    float acc[GEMV_RPW][GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_RPW; r++)
#pragma unroll
        for (int i = 0; i < GEMV_MAX_M; i++) acc[r][i] = 0.0f;
    const w8* wrows[GEMV_RPW];
#pragma unroll
    for (int r = 0; r < GEMV_RPW; r++) {
        // Columns past n reread the last valid row; their sums are never written.
        wrows[r] = (const w8*)(w + (size_t)min(col0 + r, n - 1) * k);
    }
    for (int c = lane; c < chunks; c += 32) {
        float wf[GEMV_RPW][8];
#pragma unroll
        for (int r = 0; r < GEMV_RPW; r++) unpack8(wrows[r][c], wf[r]);
#pragma unroll
        for (int i = 0; i < GEMV_MAX_M; i++) {
            if (i < m) {
                float xf[8];
                unpack8(((const w8*)(x + (size_t)i * k))[c], xf);
#pragma unroll
                for (int r = 0; r < GEMV_RPW; r++) {
                    float s = acc[r][i];
#pragma unroll
                    for (int e = 0; e < 8; e++) s += xf[e] * wf[r][e];
                    acc[r][i] = s;
                }
            }
        }
    }
    const bf16* bias = (const bf16*)bias_ptr;
#pragma unroll
    for (int r = 0; r < GEMV_RPW; r++) {
#pragma unroll
        for (int i = 0; i < GEMV_MAX_M; i++) {
            if (i < m) {
                float s = warp_sum(acc[r][i]);
                const int col = col0 + r;
                if (lane == 0 && col < n) {
                    if (bias) s += bf2f(bias[col]);
                    if (y_f32) ((float*)y_ptr)[(size_t)i * n + col] = s;
                    else ((bf16*)y_ptr)[(size_t)i * n + col] = f2bf(s);
                }
            }
        }
    }
}
