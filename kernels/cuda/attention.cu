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

#define DEC_CHUNK 1024

__device__ __forceinline__ u32 first_visible(u32 pos, int window) {
    return (window > 0 && pos + 1 > (u32)window) ? pos + 1 - (u32)window : 0u;
}

// Decode: one block per (query row, head), for rows that are a sequence's only new token. Threads share
// the keys to score a chunk, then each thread owns output dimensions and sums the values of the chunk.
// Shared memory (dynamic): head_dim floats of q, DEC_CHUNK scores, DEC_CHUNK slots.
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
    const u32 pos = row_pos[r];
    const u32* bt = block_tables + seq_bt[row_seq[r]];
    const u32 first = first_visible(pos, window);
    const bf16* qr = q + ((size_t)r * nh + h) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = bf2f(qr[i]);
    __syncthreads();

    float acc[2] = {0.0f, 0.0f};  // dims threadIdx.x and threadIdx.x + blockDim.x (head_dim <= 2 * blockDim)
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
            for (int x = 0; x < hd; x++) s += qs[x] * bf2f(kr[x]);
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
        for (int k = 0; k < 2; k++) {
            const int d = threadIdx.x + k * blockDim.x;
            if (d < hd) {
                float a = acc[k] * corr;
#pragma unroll 8
                for (u32 j = 0; j < n; j++) a += sc[j] * bf2f(vc[((size_t)slots[j] * nkv + kvh) * hd + d]);
                acc[k] = a;
            }
        }
        __syncthreads();  // the next chunk overwrites scores and slots
    }
    bf16* o = out + ((size_t)r * nh + h) * hd;
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const int d = threadIdx.x + k * blockDim.x;
        if (d < hd) o[d] = f2bf(acc[k] / l);
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
