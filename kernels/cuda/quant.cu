// Weights in llama.cpp's block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K), kept as their blocks on
// the device. Two kernels per format:
//
// - dequant_<fmt>: rows of blocks to bf16 (the prefill path, before cuBLAS; the embedding lookup, through a
//   row-index list) or to f32 (the tests, which compare with the CPU's decoding bit for bit);
// - qgemv_<fmt>: y[m, n] = x[m, k] · w[n, k]ᵀ (+ bias) for m <= QGEMV_MAX_M (decode), decoding each weight
//   where it is read: one warp per output column, each lane eight consecutive values of a block at a time,
//   so the step and offset of their sub-block are decoded once for the eight.
//
// Each format's values are computed with the same f32 operations, in the same order, as `tessera_gguf`'s
// `dequantize` (itself equal to gguf-py's): `__fmul_rn` and friends keep NVRTC from contracting them into
// fused multiply-adds, which round differently.

#define QGEMV_MAX_M 8
#define QGEMV_WARPS 4

typedef unsigned char u8;

__device__ __forceinline__ float h2f(const u8* p) {
    unsigned short h = (unsigned short)(p[0] | (p[1] << 8));
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u32 u32_le(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// Scale and minimum of sub-block j (0..8) of a Q4_K or Q5_K block (`get_scale_min_k4`).
__device__ __forceinline__ void k4_scale_min(int j, const u8* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Values j0..j0+8 (j0 a multiple of 8) of one block into v. A template per format: `Q` is its id.
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

template <int Q>
struct Fmt;

template <>
struct Fmt<Q8_0> {
    static const int BS = 32, TS = 34;
    __device__ static void eight(const u8* b, int j0, float* v) {
        float d = h2f(b);
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = __fmul_rn((float)(signed char)b[2 + j0 + e], d);
    }
};

template <>
struct Fmt<Q4_0> {
    static const int BS = 32, TS = 18;
    __device__ static void eight(const u8* b, int j0, float* v) {
        float d = h2f(b);
        const u8* qs = b + 2 + (j0 & 15);
        int shift = j0 < 16 ? 0 : 4;
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = __fmul_rn((float)((int)((qs[e] >> shift) & 15) - 8), d);
    }
};

template <>
struct Fmt<Q4_1> {
    static const int BS = 32, TS = 20;
    __device__ static void eight(const u8* b, int j0, float* v) {
        float d = h2f(b), m = h2f(b + 2);
        const u8* qs = b + 4 + (j0 & 15);
        int shift = j0 < 16 ? 0 : 4;
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = __fadd_rn(__fmul_rn((float)((qs[e] >> shift) & 15), d), m);
    }
};

template <>
struct Fmt<Q5_0> {
    static const int BS = 32, TS = 22;
    __device__ static void eight(const u8* b, int j0, float* v) {
        float d = h2f(b);
        u32 qh = u32_le(b + 2);
        const u8* qs = b + 6 + (j0 & 15);
        int shift = j0 < 16 ? 0 : 4;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int q = ((qs[e] >> shift) & 15) | (((qh >> (j0 + e)) & 1) << 4);
            v[e] = __fmul_rn((float)(q - 16), d);
        }
    }
};

template <>
struct Fmt<Q5_1> {
    static const int BS = 32, TS = 24;
    __device__ static void eight(const u8* b, int j0, float* v) {
        float d = h2f(b), m = h2f(b + 2);
        u32 qh = u32_le(b + 4);
        const u8* qs = b + 8 + (j0 & 15);
        int shift = j0 < 16 ? 0 : 4;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int q = ((qs[e] >> shift) & 15) | (((qh >> (j0 + e)) & 1) << 4);
            v[e] = __fadd_rn(__fmul_rn((float)q, d), m);
        }
    }
};

// The 256 values of the 2- and 3-bit K formats: half n (128 values) reads 32 bytes of quants four times,
// at shifts 0, 2, 4, 6 (a pass each); each 16 values (sub) have their own scale.
template <>
struct Fmt<Q2_K> {
    static const int BS = 256, TS = 84;
    __device__ static void eight(const u8* b, int j0, float* v) {
        int n = j0 >> 7, pass = (j0 >> 5) & 3, sub = (j0 >> 4) & 1, l0 = j0 & 15;
        int sc = b[n * 8 + pass * 2 + sub];
        float dl = __fmul_rn(h2f(b + 80), (float)(sc & 15));
        float ml = __fmul_rn(h2f(b + 82), (float)(sc >> 4));
        const u8* q = b + 16 + n * 32 + sub * 16 + l0;
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = __fsub_rn(__fmul_rn(dl, (float)((q[e] >> (2 * pass)) & 3)), ml);
    }
};

template <>
struct Fmt<Q3_K> {
    static const int BS = 256, TS = 110;
    __device__ static void eight(const u8* b, int j0, float* v) {
        int n = j0 >> 7, pass = (j0 >> 5) & 3, sub = (j0 >> 4) & 1, l0 = j0 & 15;
        const u8* s = b + 96;
        int j = n * 8 + pass * 2 + sub;
        int low = j < 8 ? (s[j] & 15) : (s[j - 8] >> 4);
        int high = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        float dl = __fmul_rn(h2f(b + 108), (float)((low | (high << 4)) - 32));
        int i0 = sub * 16 + l0;
        const u8* q = b + 32 + n * 32 + i0;
        const u8* hm = b + i0;
        int hbit = 1 << (n * 4 + pass);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int lo = (q[e] >> (2 * pass)) & 3;
            int quant = (hm[e] & hbit) ? lo : lo - 4;
            v[e] = __fmul_rn(dl, (float)quant);
        }
    }
};

// Q4_K and Q5_K: eight sub-blocks of 32; sub-blocks 2c and 2c + 1 are the low and high nibbles of 32 bytes.
template <>
struct Fmt<Q4_K> {
    static const int BS = 256, TS = 144;
    __device__ static void eight(const u8* b, int j0, float* v) {
        int c = j0 >> 6, hi = (j0 >> 5) & 1, l0 = j0 & 31;
        int sc, m;
        k4_scale_min(2 * c + hi, b + 4, &sc, &m);
        float dl = __fmul_rn(h2f(b), (float)sc), ml = __fmul_rn(h2f(b + 2), (float)m);
        const u8* q = b + 16 + 32 * c + l0;
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = __fsub_rn(__fmul_rn(dl, (float)((q[e] >> (4 * hi)) & 15)), ml);
    }
};

template <>
struct Fmt<Q5_K> {
    static const int BS = 256, TS = 176;
    __device__ static void eight(const u8* b, int j0, float* v) {
        int c = j0 >> 6, hi = (j0 >> 5) & 1, l0 = j0 & 31;
        int sc, m;
        k4_scale_min(2 * c + hi, b + 4, &sc, &m);
        float dl = __fmul_rn(h2f(b), (float)sc), ml = __fmul_rn(h2f(b + 2), (float)m);
        const u8* qh = b + 16 + l0;
        const u8* q = b + 48 + 32 * c + l0;
        int bit = 1 << (2 * c + hi);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int quant = ((q[e] >> (4 * hi)) & 15) + ((qh[e] & bit) ? 16 : 0);
            v[e] = __fsub_rn(__fmul_rn(dl, (float)quant), ml);
        }
    }
};

// Q6_K: half n (128 values) has 64 bytes of low nibbles and 32 of high bits; its value l + 32·t (t = 0..4)
// takes nibble t / 2 of byte l + 32·(t % 2) and bits 2t.. of qh[l]; every 16 values have an i8 scale.
template <>
struct Fmt<Q6_K> {
    static const int BS = 256, TS = 210;
    __device__ static void eight(const u8* b, int j0, float* v) {
        int n = j0 >> 7, t = (j0 >> 5) & 3, l0 = j0 & 31;
        const u8* ql = b + 64 * n + 32 * (t & 1) + l0;
        const u8* qh = b + 128 + 32 * n + l0;
        float dsc = __fmul_rn(h2f(b + 208), (float)(signed char)b[192 + 8 * n + (l0 >> 4) + 2 * t]);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int q = ((ql[e] >> (4 * (t >> 1))) & 15) | (((qh[e] >> (2 * t)) & 3) << 4);
            v[e] = __fmul_rn(dsc, (float)(q - 32));
        }
    }
};

// Rows of blocks to values: output row r is weight row rows[r] (or r, without a list), `row_blocks` blocks
// long. One thread per eight values, striding over the grid.
template <int Q>
__device__ void dequant(const u8* w, const u32* rows, u64 row_blocks, u64 out_ptr, int out_f32, u64 n_rows) {
    typedef Fmt<Q> F;
    const u64 row_len = row_blocks * F::BS;
    const u64 chunks = n_rows * row_len / 8;
    for (u64 chunk = (u64)blockIdx.x * blockDim.x + threadIdx.x; chunk < chunks; chunk += (u64)gridDim.x * blockDim.x) {
        const u64 r = chunk * 8 / row_len, e0 = chunk * 8 % row_len;
        const u64 src = rows ? rows[r] : r;
        const u8* blk = w + (src * row_blocks + e0 / F::BS) * F::TS;
        float v[8];
        F::eight(blk, (int)(e0 % F::BS), v);
        const u64 at = r * row_len + e0;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            if (out_f32) ((float*)out_ptr)[at + e] = v[e];
            else ((bf16*)out_ptr)[at + e] = f2bf(v[e]);
        }
    }
}

// One warp per output column: lane j decodes the eight values j, j + 32, ... (in units of eight) of the
// column's weight row and dots them with every row of x. f32 accumulation; y in bf16, or f32 when y_f32.
template <int Q>
__device__ void qgemv(const u8* w, const bf16* x, u64 bias_ptr, u64 y_ptr, int y_f32, int m, int k, int n) {
    typedef Fmt<Q> F;
    const int lane = threadIdx.x & 31;
    const int col = blockIdx.x * QGEMV_WARPS + (threadIdx.x >> 5);
    if (col >= n) return;  // the whole warp leaves together
    const u8* row = w + (size_t)col * (k / F::BS) * F::TS;
    float acc[QGEMV_MAX_M];
#pragma unroll
    for (int i = 0; i < QGEMV_MAX_M; i++) acc[i] = 0.0f;
    for (int e0 = lane * 8; e0 < k; e0 += 32 * 8) {
        float v[8];
        F::eight(row + (e0 / F::BS) * F::TS, e0 % F::BS, v);
#pragma unroll
        for (int i = 0; i < QGEMV_MAX_M; i++) {
            if (i < m) {
                const bf16* xr = x + (size_t)i * k + e0;
                float s = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++) s += v[e] * bf2f(xr[e]);
                acc[i] += s;
            }
        }
    }
    const bf16* bias = (const bf16*)bias_ptr;
#pragma unroll
    for (int i = 0; i < QGEMV_MAX_M; i++) {
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

// The entry points, two per format (written out: the kernel list is read from this text).

extern "C" __global__ void dequant_q8_0(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q8_0>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q8_0(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q8_0>(w, x, bias, y, y_f32, m, k, n);
}
extern "C" __global__ void dequant_q4_0(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q4_0>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q4_0(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q4_0>(w, x, bias, y, y_f32, m, k, n);
}
extern "C" __global__ void dequant_q4_1(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q4_1>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q4_1(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q4_1>(w, x, bias, y, y_f32, m, k, n);
}
extern "C" __global__ void dequant_q5_0(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q5_0>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q5_0(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q5_0>(w, x, bias, y, y_f32, m, k, n);
}
extern "C" __global__ void dequant_q5_1(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q5_1>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q5_1(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q5_1>(w, x, bias, y, y_f32, m, k, n);
}
extern "C" __global__ void dequant_q2_k(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q2_K>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q2_k(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q2_K>(w, x, bias, y, y_f32, m, k, n);
}
extern "C" __global__ void dequant_q3_k(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q3_K>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q3_k(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q3_K>(w, x, bias, y, y_f32, m, k, n);
}
extern "C" __global__ void dequant_q4_k(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q4_K>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q4_k(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q4_K>(w, x, bias, y, y_f32, m, k, n);
}
extern "C" __global__ void dequant_q5_k(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q5_K>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q5_k(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q5_K>(w, x, bias, y, y_f32, m, k, n);
}
extern "C" __global__ void dequant_q6_k(const u8* w, u64 rows, u64 row_blocks, u64 out, int out_f32, u64 n_rows) {
    dequant<Q6_K>(w, (const u32*)rows, row_blocks, out, out_f32, n_rows);
}
extern "C" __global__ void qgemv_q6_k(const u8* w, const bf16* x, u64 bias, u64 y, int y_f32, int m, int k, int n) {
    qgemv<Q6_K>(w, x, bias, y, y_f32, m, k, n);
}
