// RMSNorm as Hugging Face Llama computes it in bf16: the row is normalised in f32, rounded to bf16, then
// multiplied by the bf16 weight. One block per row.

extern "C" __global__ void rms_norm_bf16(const bf16* x, const bf16* w, bf16* out, int h, float eps) {
    __shared__ float scratch[32];
    const bf16* xr = x + (size_t)blockIdx.x * h;
    bf16* orow = out + (size_t)blockIdx.x * h;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = bf2f(xr[i]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / (float)h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        orow[i] = f2bf(bf2f(w[i]) * bf2f(f2bf(bf2f(xr[i]) * inv)));
    }
}

// The residual connection fused with the next norm: resid += delta (rounded to bf16, as a bf16 add is),
// then out = rms_norm(resid). Each thread rereads only the elements it wrote itself.
extern "C" __global__ void add_rms_norm_bf16(bf16* resid, const bf16* delta, const bf16* w, bf16* out, int h,
                                             float eps) {
    __shared__ float scratch[32];
    bf16* rr = resid + (size_t)blockIdx.x * h;
    const bf16* dr = delta + (size_t)blockIdx.x * h;
    bf16* orow = out + (size_t)blockIdx.x * h;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        bf16 s = f2bf(bf2f(rr[i]) + bf2f(dr[i]));
        rr[i] = s;
        float v = bf2f(s);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / (float)h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        orow[i] = f2bf(bf2f(w[i]) * bf2f(f2bf(bf2f(rr[i]) * inv)));
    }
}
