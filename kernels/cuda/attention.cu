// Causal grouped-query attention over the paged KV cache, bf16 in and out, f32 arithmetic.
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]; position p of a sequence lives in
// slot block_table[p / block_size] * block_size + p % block_size. Query head h reads KV head
// h / (num_heads / num_kv_heads). A query at position p sees positions j <= p, and with a sliding window w
// only those with p - j < w (Mistral's convention).
//
// Per query row r: row_pos[r] is its position and row_seq[r] its sequence; seq_bt[s] is the offset of
// sequence s's block table inside block_tables. Both kernels keep a running max and sum (online softmax),
// so any context length works with a fixed amount of shared memory.

#define DEC_CHUNK 2048

__device__ __forceinline__ u32 first_visible(u32 pos, int window) {
    return (window > 0 && pos + 1 > (u32)window) ? pos + 1 - (u32)window : 0u;
}

// Decode: one block per (query row, head), for rows that are a sequence's only new token. Threads share
// the keys of a chunk to score them (16-byte loads of each key row when head_dim allows), then warp w sums
// the values of keys w, w + warps, ... with lane owning dimensions lane, lane + 32, ... (head_dim <= 256);
// the warps' partial sums are added at the end.
// Shared memory (dynamic): head_dim floats of q, DEC_CHUNK scores (reused for the final sum, so
// warps * head_dim <= DEC_CHUNK), DEC_CHUNK slots.
struct alignas(16) u32x4 {
    u32 x, y, z, w;
};

__device__ __forceinline__ float dot8(const float* q, u32x4 k) {
    return q[0] * __uint_as_float(k.x << 16) + q[1] * __uint_as_float(k.x & 0xffff0000u) +
           q[2] * __uint_as_float(k.y << 16) + q[3] * __uint_as_float(k.y & 0xffff0000u) +
           q[4] * __uint_as_float(k.z << 16) + q[5] * __uint_as_float(k.z & 0xffff0000u) +
           q[6] * __uint_as_float(k.w << 16) + q[7] * __uint_as_float(k.w & 0xffff0000u);
}

extern "C" __global__ void attention_decode_bf16(const bf16* q, const bf16* kc, const bf16* vc, bf16* out,
                                                 const u32* rows, const u32* row_pos, const u32* row_seq,
                                                 const u32* seq_bt, const u32* block_tables, int nh, int nkv,
                                                 int hd, int bs, float scale, int window) {
    extern __shared__ float dsm[];
    __shared__ float scratch[32];
    float* qs = dsm;
    float* sc = dsm + hd;
    u32* slots = (u32*)(sc + DEC_CHUNK);
    const u32 r = rows[blockIdx.x];
    const int h = blockIdx.y, kvh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const u32 pos = row_pos[r];
    const u32* bt = block_tables + seq_bt[row_seq[r]];
    const u32 first = first_visible(pos, window);
    const bf16* qr = q + ((size_t)r * nh + h) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = bf2f(qr[i]);
    __syncthreads();

    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (u32 c0 = first; c0 <= pos; c0 += DEC_CHUNK) {
        const u32 n = min((u32)DEC_CHUNK, pos + 1 - c0);
        float lmax = NEG_INF;
        for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
            const u32 p = c0 + j;
            const u32 slot = bt[p / bs] * (u32)bs + p % (u32)bs;
            slots[j] = slot;
            const bf16* kr = kc + ((size_t)slot * nkv + kvh) * hd;
            float s = 0.0f;
            if ((hd & 7) == 0) {
                const u32x4* k8 = (const u32x4*)kr;
#pragma unroll 8
                for (int x = 0; x < hd / 8; x++) s += dot8(qs + 8 * x, k8[x]);
            } else {
                for (int x = 0; x < hd; x++) s += qs[x] * bf2f(kr[x]);
            }
            s *= scale;
            sc[j] = s;
            lmax = fmaxf(lmax, s);
        }
        const float mnew = fmaxf(m, block_max(lmax, scratch));  // barrier: scores and slots visible
        const float corr = expf(m - mnew);
        float lsum = 0.0f;
        for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
            const float e = expf(sc[j] - mnew);
            sc[j] = e;
            lsum += e;
        }
        l = l * corr + block_sum(lsum, scratch);  // barrier: weights visible
        m = mnew;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] *= corr;
        // Unrolled so that several keys' value loads are in flight at once: one key at a time is a chain of
        // dependent memory round trips (measured: ~85 us per layer at 512 keys on an H200).
#pragma unroll 8
        for (u32 j = warp; j < n; j += nwarps) {
            const float p = sc[j];
            const bf16* vr = vc + ((size_t)slots[j] * nkv + kvh) * hd;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int d = lane + 32 * i;
                if (d < hd) acc[i] += p * bf2f(vr[d]);
            }
        }
        __syncthreads();  // the next chunk (or the final sum) overwrites scores and slots
    }
    // Sum the warps' partial outputs through shared memory (nwarps * head_dim <= DEC_CHUNK floats).
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int d = lane + 32 * i;
        if (d < hd) sc[warp * hd + d] = acc[i];
    }
    __syncthreads();
    bf16* o = out + ((size_t)r * nh + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float t = 0.0f;
        for (int w = 0; w < nwarps; w++) t += sc[w * hd + d];
        o[d] = f2bf(t / l);
    }
}

#define PF_WARPS 8
#define PF_KEYS 32

// Prefill, flash-style: one block per (tile of up to PF_WARPS consecutive query rows of one sequence, head).
// Each tile of PF_KEYS keys and values is read from the paged cache into shared memory once and used by
// every row of the block; warp w owns query row row0 + w. Lane j scores key j of the tile; each lane owns
// output dimensions lane, lane + 32, ... (head_dim <= 256).
// tiles[2 * b] is the first row of block b, tiles[2 * b + 1] its row count.
// Shared memory (dynamic): keys and values as bf16 rows padded by 2 (so lanes reading different rows use
// different banks), PF_WARPS rows of q as f32, PF_KEYS slots.
extern "C" __global__ void attention_prefill_bf16(const bf16* q, const bf16* kc, const bf16* vc, bf16* out,
                                                  const u32* tiles, const u32* row_pos, const u32* row_seq,
                                                  const u32* seq_bt, const u32* block_tables, int nh, int nkv,
                                                  int hd, int bs, float scale, int window) {
    extern __shared__ float psm[];
    const int ld = hd + 2;
    float* qs = psm;
    u32* slots = (u32*)(qs + PF_WARPS * hd);
    bf16* ks = (bf16*)(slots + PF_KEYS);
    bf16* vs = ks + PF_KEYS * ld;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 row0 = tiles[2 * blockIdx.x], nrows = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, kvh = h / (nh / nkv);
    const u32* bt = block_tables + seq_bt[row_seq[row0]];
    const bool active = (u32)warp < nrows;
    const u32 r = row0 + warp;
    const u32 pos = active ? row_pos[r] : 0u;
    const u32 my_first = first_visible(pos, window);
    const u32 k_begin = first_visible(row_pos[row0], window);
    const u32 k_last = row_pos[row0 + nrows - 1];
    float* qw = qs + warp * hd;
    if (active) {
        for (int x = lane; x < hd; x += 32) qw[x] = bf2f(q[((size_t)r * nh + h) * hd + x]);
    }
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (u32 k0 = k_begin; k0 <= k_last; k0 += PF_KEYS) {
        const u32 nk = min((u32)PF_KEYS, k_last + 1 - k0);
        __syncthreads();  // the previous tile is consumed (and q is visible on the first pass)
        if (threadIdx.x < nk) {
            const u32 p = k0 + threadIdx.x;
            slots[threadIdx.x] = bt[p / bs] * (u32)bs + p % (u32)bs;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < (int)nk * hd; i += blockDim.x) {
            const int j = i / hd, x = i % hd;
            const size_t src = ((size_t)slots[j] * nkv + kvh) * hd + x;
            ks[j * ld + x] = kc[src];
            vs[j * ld + x] = vc[src];
        }
        __syncthreads();
        if (active) {  // uniform across the warp: every lane takes part in the shuffles below
            const u32 p = k0 + lane;
            float s = NEG_INF;
            if ((u32)lane < nk && p <= pos && p >= my_first) {
                float d = 0.0f;
                for (int x = 0; x < hd; x++) d += qw[x] * bf2f(ks[lane * ld + x]);
                s = d * scale;
            }
            const float mnew = fmaxf(m, warp_max(s));
            if (mnew != NEG_INF) {
                const float e = s == NEG_INF ? 0.0f : expf(s - mnew);
                const float corr = expf(m - mnew);
                l = l * corr + warp_sum(e);
#pragma unroll
                for (int i = 0; i < 8; i++) acc[i] *= corr;
                for (u32 j = 0; j < nk; j++) {
                    const float pj = __shfl_sync(0xffffffffu, e, j);
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        const int x = lane + 32 * i;
                        if (x < hd) acc[i] += pj * bf2f(vs[j * ld + x]);
                    }
                }
                m = mnew;
            }
        }
    }
    if (active) {
        bf16* o = out + ((size_t)r * nh + h) * hd;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int x = lane + 32 * i;
            if (x < hd) o[x] = f2bf(acc[i] / l);
        }
    }
}

// The softmax of the dense prefill path (scores from cuBLAS): row r of `scores` ([heads * q_len, keys], f32,
// unscaled q·k) is query r % q_len of head r / q_len at position pos0 + r % q_len. Keys it may not see get
// probability 0. Probabilities are written in bf16 for the second GEMM, as PyTorch's bf16 attention does.
extern "C" __global__ void causal_softmax_bf16(const float* scores, bf16* probs, int q_len, int keys, u32 pos0,
                                               float scale, int window) {
    __shared__ float scratch[32];
    const size_t r = blockIdx.x;
    const u32 qpos = pos0 + (u32)(r % q_len);
    const u32 first = first_visible(qpos, window);
    const float* s = scores + r * keys;
    bf16* p = probs + r * keys;
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        if ((u32)j >= first && (u32)j <= qpos) mx = fmaxf(mx, s[j] * scale);
    }
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        if ((u32)j >= first && (u32)j <= qpos) sum += expf(s[j] * scale - mx);
    }
    const float inv = 1.0f / block_sum(sum, scratch);
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        const bool seen = (u32)j >= first && (u32)j <= qpos;
        p[j] = f2bf(seen ? expf(s[j] * scale - mx) * inv : 0.0f);
    }
}
