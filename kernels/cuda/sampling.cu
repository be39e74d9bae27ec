// Token selection on the device, one block per logits row (f32).
//
// argmax_f32: the largest logit, the first on ties (as torch.argmax).
// sample_f32: temperature, then top-k, then top-p (the smallest set of most likely tokens holding at least
// top_p of the mass), then a draw with the row's uniform number in [0, 1), scanning kept tokens in index
// order. Thresholds are found exactly by bisection over the logits' order-preserving integer keys, so no
// sort is needed: 32 counting passes for top-k, 32 mass passes for top-p.

#define SAMPLE_THREADS 256

__device__ __forceinline__ u32 okey(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void argmax_f32(const float* logits, int vocab, u32* out) {
    __shared__ float bv[SAMPLE_THREADS];
    __shared__ u32 bi[SAMPLE_THREADS];
    const float* l = logits + (size_t)blockIdx.x * vocab;
    float best = NEG_INF;
    u32 idx = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = l[i];
        if (v > best || (idx == 0xffffffffu)) {
            best = v;
            idx = i;
        }
    }
    bv[threadIdx.x] = best;
    bi[threadIdx.x] = idx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ov = bv[threadIdx.x + s];
            u32 oi = bi[threadIdx.x + s];
            if (oi != 0xffffffffu && (ov > bv[threadIdx.x] || (ov == bv[threadIdx.x] && oi < bi[threadIdx.x]) ||
                                      bi[threadIdx.x] == 0xffffffffu)) {
                bv[threadIdx.x] = ov;
                bi[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = bi[0];
}

// Sum over the row of exp((l - lmax) / t) for logits whose key is at least `key`.
__device__ float kept_mass(const float* l, int vocab, float lmax, float t, u32 key, float* scratch) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (okey(l[i]) >= key) s += expf((l[i] - lmax) / t);
    }
    return block_sum(s, scratch);
}

extern "C" __global__ void sample_f32(const float* logits, int vocab, const float* temperature, const u32* top_k,
                                      const float* top_p, const float* uniform, u32* out) {
    __shared__ float scratch[32];
    __shared__ float part[SAMPLE_THREADS];
    const int row = blockIdx.x;
    const float* l = logits + (size_t)row * vocab;
    const float t = temperature[row];
    float lmax = NEG_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) lmax = fmaxf(lmax, l[i]);
    lmax = block_max(lmax, scratch);

    // top-k: the largest key K with at least k logits at or above it.
    u32 kkey = 0;
    const u32 k = top_k[row];
    if (k > 0 && k < (u32)vocab) {
        u32 lo = 0, hi = 0xffffffffu;
        while (lo < hi) {
            const u32 mid = lo + (u32)(((u64)hi - lo + 1) / 2);
            float c = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += okey(l[i]) >= mid ? 1.0f : 0.0f;
            if (block_sum(c, scratch) >= (float)k) lo = mid; else hi = mid - 1;
        }
        kkey = lo;
    }
    // top-p within the top-k set: the largest key whose kept mass is still at least top_p of the total.
    u32 key = kkey;
    const float p = top_p[row];
    if (p < 1.0f) {
        const float want = p * kept_mass(l, vocab, lmax, t, kkey, scratch);
        u32 lo = kkey, hi = 0xffffffffu;
        while (lo < hi) {
            const u32 mid = lo + (u32)(((u64)hi - lo + 1) / 2);
            if (kept_mass(l, vocab, lmax, t, mid, scratch) >= want) lo = mid; else hi = mid - 1;
        }
        key = lo;
    }
    // The draw: each thread sums a contiguous stretch; thread 0 finds the stretch, then the token.
    const int per = (vocab + blockDim.x - 1) / blockDim.x;
    const int b = threadIdx.x * per, e = min(vocab, b + per);
    float s = 0.0f;
    for (int i = b; i < e; i++) {
        if (okey(l[i]) >= key) s += expf((l[i] - lmax) / t);
    }
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int i = 0; i < blockDim.x; i++) total += part[i];
        float target = uniform[row] * total;
        u32 chosen = 0xffffffffu, last = 0xffffffffu;
        for (int c = 0; c < blockDim.x && chosen == 0xffffffffu; c++) {
            const int cb = c * per, ce = min(vocab, cb + per);
            if (part[c] > 0.0f && target >= part[c] && c + 1 < blockDim.x) {
                target -= part[c];
                for (int i = ce - 1; i >= cb; i--) {
                    if (okey(l[i]) >= key) { last = i; break; }
                }
                continue;
            }
            for (int i = cb; i < ce; i++) {
                if (okey(l[i]) < key) continue;
                last = i;
                const float w = expf((l[i] - lmax) / t);
                if (target < w) { chosen = i; break; }
                target -= w;
            }
        }
        out[row] = chosen != 0xffffffffu ? chosen : last;
    }
}
