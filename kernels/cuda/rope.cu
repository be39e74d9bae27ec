// Rotary embedding in place, "rotate half" convention (dimension i pairs with i + head_dim/2). Angles are
// computed in f32 as position * inv_freq, as transformers does. `freq_stride` is 0 when every token shares
// one frequency table, half the head dim when each token has its own (dynamic NTK scaling per sequence).
// One block per token.

extern "C" __global__ void rope_bf16(bf16* x, const u32* pos, const float* inv_freq, int freq_stride, int heads,
                                     int hd) {
    int t = blockIdx.x, half = hd / 2;
    const float* f = inv_freq + (size_t)t * freq_stride;
    float p = (float)pos[t];
    bf16* xt = x + (size_t)t * heads * hd;
    for (int k = threadIdx.x; k < heads * half; k += blockDim.x) {
        int head = k / half, i = k % half;
        float s, c;
        sincosf(p * f[i], &s, &c);
        bf16* xh = xt + (size_t)head * hd;
        float a = bf2f(xh[i]), b = bf2f(xh[i + half]);
        xh[i] = f2bf(a * c - b * s);
        xh[i + half] = f2bf(b * c + a * s);
    }
}
