//! Rotary position embedding applied in place, in the "rotate half" convention of Hugging Face Llama:
//! dimension `i` of a head is rotated together with dimension `i + head_dim/2`.

/// Rotates every head of every token: `x` is `[tokens, heads, head_dim]`, `positions[t]` the position of
/// token `t`, `inv_freq` has `head_dim / 2` entries shared by all tokens, or that many per token.
pub fn rope_inplace(x: &mut [f32], positions: &[u32], heads: usize, head_dim: usize, inv_freq: &[f32]) {
    let half = head_dim / 2;
    let per_token = inv_freq.len() != half;
    debug_assert!(!per_token || inv_freq.len() == half * positions.len());
    debug_assert_eq!(x.len(), positions.len() * heads * head_dim);
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    for (t, (tok, &pos)) in x.chunks_exact_mut(heads * head_dim).zip(positions).enumerate() {
        let inv_freq = if per_token { &inv_freq[t * half..(t + 1) * half] } else { inv_freq };
        for i in 0..half {
            // Same f32 arithmetic as transformers: angle = position * inv_freq, both f32.
            let angle = pos as f32 * inv_freq[i];
            cos[i] = angle.cos();
            sin[i] = angle.sin();
        }
        for head in tok.chunks_exact_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * cos[i] - b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}
