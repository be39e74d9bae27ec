//! Token selection on logits rows: argmax and a temperature / top-k / top-p draw with a given uniform
//! number. The same definitions as the CUDA kernels in `sampling.cu`, written the obvious way (a sort), so
//! they are both the CPU implementation and the kernels' reference.

/// Index of the largest value, the first one on ties (as `torch.argmax`).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The logit at or above which tokens are kept after top-k (`k == 0`: no limit) and then top-p (the
/// smallest set of most likely tokens holding at least `p` of the top-k mass; ties at the edge are kept).
pub fn keep_threshold(row: &[f32], temperature: f32, k: u32, p: f32) -> f32 {
    let mut sorted: Vec<f32> = row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let lmax = sorted[0];
    let k = if k == 0 || k as usize >= row.len() { row.len() } else { k as usize };
    let mut thr = sorted[k - 1];
    if p < 1.0 {
        let w = |l: f32| ((l - lmax) / temperature).exp();
        let total: f32 = row.iter().filter(|&&l| l >= thr).map(|&l| w(l)).sum();
        let mut cum = 0.0;
        for &l in &sorted[..k] {
            cum += w(l);
            if cum >= p * total {
                thr = l;
                break;
            }
        }
    }
    thr
}

/// Draws from the kept tokens in index order: the first token whose cumulative weight exceeds
/// `uniform * kept_mass`.
pub fn sample(row: &[f32], temperature: f32, k: u32, p: f32, uniform: f32) -> u32 {
    let thr = keep_threshold(row, temperature, k, p);
    let lmax = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w = |l: f32| ((l - lmax) / temperature).exp();
    let mass: f32 = row.iter().filter(|&&l| l >= thr).map(|&l| w(l)).sum();
    let mut target = uniform * mass;
    let mut last = 0;
    for (i, &l) in row.iter().enumerate().filter(|(_, l)| **l >= thr) {
        last = i;
        if target < w(l) {
            return i as u32;
        }
        target -= w(l);
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_keep_what_they_should() {
        let row = [1.0, 3.0, 2.0, 0.0, 3.0];
        assert_eq!(argmax(&row), 1);
        assert_eq!(keep_threshold(&row, 1.0, 2, 1.0), 3.0);
        assert_eq!(keep_threshold(&row, 1.0, 3, 1.0), 2.0);
        assert_eq!(keep_threshold(&row, 1.0, 0, 1.0), 0.0);
        // Two tokens at 3.0 hold ~0.78 of the mass: p = 0.5 keeps both (ties), p = 0.9 adds the 2.0.
        assert_eq!(keep_threshold(&row, 1.0, 0, 0.5), 3.0);
        assert_eq!(keep_threshold(&row, 1.0, 0, 0.9), 2.0);
        // With only the 3.0s kept, a uniform below one half picks the first, above it the second.
        assert_eq!(sample(&row, 1.0, 2, 1.0, 0.2), 1);
        assert_eq!(sample(&row, 1.0, 2, 1.0, 0.7), 4);
        assert_eq!(sample(&row, 1.0, 0, 1.0, 0.0), 0);
    }
}
