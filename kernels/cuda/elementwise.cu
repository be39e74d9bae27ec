// Element-wise kernels: activations, residual adds, bias, casts, the embedding gather, row gathers and
// buffer fills. Grid-stride loops, so any launch size covers any length.

#define GRID_STRIDE(i, n) for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                              i += (size_t)gridDim.x * blockDim.x)

// out = silu(gate) * up, with silu rounded to bf16 first as PyTorch's bf16 act_fn(gate) * up does.
extern "C" __global__ void silu_mul_bf16(const bf16* gate, const bf16* up, bf16* out, size_t n) {
    GRID_STRIDE(i, n) {
        float g = bf2f(gate[i]);
        float s = bf2f(f2bf(g / (1.0f + expf(-g))));
        out[i] = f2bf(s * bf2f(up[i]));
    }
}

extern "C" __global__ void add_bf16(bf16* x, const bf16* y, size_t n) {
    GRID_STRIDE(i, n) { x[i] = f2bf(bf2f(x[i]) + bf2f(y[i])); }
}

// x[r, c] += b[c] for a row-major [rows, cols] x.
extern "C" __global__ void bias_add_bf16(bf16* x, const bf16* b, size_t rows, size_t cols) {
    GRID_STRIDE(i, rows * cols) { x[i] = f2bf(bf2f(x[i]) + bf2f(b[i % cols])); }
}

extern "C" __global__ void bias_add_f32(float* x, const bf16* b, size_t rows, size_t cols) {
    GRID_STRIDE(i, rows * cols) { x[i] += bf2f(b[i % cols]); }
}

extern "C" __global__ void cast_bf16_f32(const bf16* x, float* out, size_t n) {
    GRID_STRIDE(i, n) { out[i] = bf2f(x[i]); }
}

extern "C" __global__ void cast_f32_bf16(const float* x, bf16* out, size_t n) {
    GRID_STRIDE(i, n) { out[i] = f2bf(x[i]); }
}

// out[t, :] = table[ids[t], :]; ids were bounds-checked on the host.
extern "C" __global__ void embedding_bf16(const u32* ids, const bf16* table, bf16* out, size_t n_ids, size_t h) {
    GRID_STRIDE(i, n_ids * h) { out[i] = table[(size_t)ids[i / h] * h + i % h]; }
}

// out[r, :] = x[rows[r], :].
extern "C" __global__ void gather_rows_bf16(const bf16* x, const u32* rows, bf16* out, size_t n, size_t w) {
    GRID_STRIDE(i, n * w) { out[i] = x[(size_t)rows[i / w] * w + i % w]; }
}

extern "C" __global__ void gather_rows_f32(const float* x, const u32* rows, float* out, size_t n, size_t w) {
    GRID_STRIDE(i, n * w) { out[i] = x[(size_t)rows[i / w] * w + i % w]; }
}

// Stores each token's keys and values ([tokens, row]) at its cache slot ([slots, row]).
extern "C" __global__ void write_kv_bf16(const bf16* k, const bf16* v, bf16* kc, bf16* vc, const u32* slots,
                                         size_t tokens, size_t row) {
    GRID_STRIDE(i, tokens * row) {
        size_t dst = (size_t)slots[i / row] * row + i % row;
        kc[dst] = k[i];
        vc[dst] = v[i];
    }
}

extern "C" __global__ void fill_u16(unsigned short* x, unsigned short value, size_t n) {
    GRID_STRIDE(i, n) { x[i] = value; }
}

extern "C" __global__ void fill_u32(u32* x, u32 value, size_t n) {
    GRID_STRIDE(i, n) { x[i] = value; }
}

// Uniform values in [-scale, scale) from a counter-based hash (splitmix64 of seed and index): the same
// seed gives the same tensor on any launch shape. Used to build random benchmark models on the device.
extern "C" __global__ void fill_uniform_bf16(bf16* x, size_t n, u64 seed, float scale) {
    GRID_STRIDE(i, n) {
        u64 z = seed + 0x9e3779b97f4a7c15ull * (i + 1);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        x[i] = f2bf((2.0f * u - 1.0f) * scale);
    }
}

// Counts elements that are not finite (NaN or infinite): tests use it to see that every output element
// of a kernel was written over a poisoned buffer.
extern "C" __global__ void count_nonfinite_bf16(const bf16* x, size_t n, u32* count) {
    GRID_STRIDE(i, n) {
        if ((x[i] & 0x7f80u) == 0x7f80u) atomicAdd(count, 1u);
    }
}

extern "C" __global__ void count_nonfinite_f32(const float* x, size_t n, u32* count) {
    GRID_STRIDE(i, n) {
        if ((__float_as_uint(x[i]) & 0x7f800000u) == 0x7f800000u) atomicAdd(count, 1u);
    }
}

// dst[r, c] = src[r, col0 + c] for c < width: one column block of a row-major [rows, src_cols] matrix (the
// q, k and v parts of a fused projection).
extern "C" __global__ void copy_cols_bf16(const bf16* src, bf16* dst, size_t rows, size_t src_cols, size_t col0,
                                          size_t width) {
    GRID_STRIDE(i, rows * width) { dst[i] = src[(i / width) * src_cols + col0 + i % width]; }
}

// out[r, c] = silu(gu[r, c]) * gu[r, inter + c]: the gate and up halves of a fused projection.
extern "C" __global__ void silu_mul_packed_bf16(const bf16* gu, bf16* out, size_t rows, size_t inter) {
    GRID_STRIDE(i, rows * inter) {
        const size_t r = i / inter, c = i % inter;
        float g = bf2f(gu[r * 2 * inter + c]);
        float s = bf2f(f2bf(g / (1.0f + expf(-g))));
        out[i] = f2bf(s * bf2f(gu[r * 2 * inter + inter + c]));
    }
}

// y[rows[r], col0 + c] += scale * d[r, c] for d of [n, w] and y of [?, y_cols]: a LoRA delta added to the rows
// of one adapter. The rows are distinct (checked on the host), so no two threads write the same element.
extern "C" __global__ void add_rows_scaled_bf16(bf16* y, const bf16* d, const u32* rows, size_t n, size_t y_cols,
                                                size_t col0, size_t w, float scale) {
    GRID_STRIDE(i, n * w) {
        size_t dst = (size_t)rows[i / w] * y_cols + col0 + i % w;
        y[dst] = f2bf(bf2f(y[dst]) + scale * bf2f(d[i]));
    }
}
