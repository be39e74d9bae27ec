//! Rotary-embedding frequency tables, with the scaling variants Hugging Face configs name:
//! `default`, `linear`, `dynamic` (NTK-aware) and `llama3`, and per-frequency factors as GGUF files carry
//! them (llama.cpp's `rope_freqs` tensor).
//!
//! The formulas follow `transformers.modeling_rope_utils` so that positions rotate exactly as in the
//! reference implementation; the rotation itself is [`crate::ops::rope_inplace`].

/// How the base frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear { factor: f32 },
    /// NTK-aware: the base grows once a sequence exceeds `max_position_embeddings`.
    Dynamic { factor: f32, max_position_embeddings: usize },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
    /// Each frequency divided by its own factor (`dim / 2` of them), as llama.cpp applies a GGUF file's
    /// `rope_freqs.weight` (where its converter writes llama3 scaling).
    Factors(Vec<f32>),
}

/// Everything needed to produce the inverse frequencies of a model's rotary embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// Rotated dimensions per head (the head dimension for the Llama family).
    pub dim: usize,
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl Rope {
    /// Whether the table depends on the sequence length (only dynamic scaling does).
    pub fn depends_on_length(&self) -> bool {
        matches!(self.scaling, RopeScaling::Dynamic { .. })
    }

    /// Inverse frequencies (`dim / 2` of them) for a sequence whose largest position is `seq_len - 1`.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let base = match self.scaling {
            RopeScaling::Dynamic { factor, max_position_embeddings } if seq_len > max_position_embeddings => {
                let (f, d) = (factor as f64, self.dim as f64);
                self.theta * ((f * seq_len as f64 / max_position_embeddings as f64) - (f - 1.0)).powf(d / (d - 2.0))
            }
            _ => self.theta,
        };
        let plain: Vec<f32> = (0..self.dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / self.dim as f32;
                1.0 / (base as f32).powf(exponent)
            })
            .collect();
        match self.scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => plain,
            RopeScaling::Linear { factor } => plain.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(ref factors) => plain.into_iter().zip(factors).map(|(f, k)| f / k).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                plain
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(scaling: RopeScaling) -> Rope {
        Rope { dim: 16, theta: 10000.0, scaling }
    }

    #[test]
    fn default_matches_formula() {
        let f = rope(RopeScaling::None).inv_freq(1);
        assert_eq!(f.len(), 8);
        for (i, v) in f.iter().enumerate() {
            let want = 1.0 / 10000f64.powf(2.0 * i as f64 / 16.0);
            assert!((*v as f64 - want).abs() < 1e-6 * want.max(1e-3), "{i}: {v} vs {want}");
        }
    }

    #[test]
    fn linear_divides_every_frequency() {
        let plain = rope(RopeScaling::None).inv_freq(1);
        let lin = rope(RopeScaling::Linear { factor: 4.0 }).inv_freq(1);
        for (a, b) in plain.iter().zip(&lin) {
            assert!((a / 4.0 - b).abs() < 1e-9);
        }
    }

    #[test]
    fn factors_divide_each_frequency_by_its_own() {
        let plain = rope(RopeScaling::None).inv_freq(1);
        let factors: Vec<f32> = (0..8).map(|i| 1.0 + i as f32).collect();
        let scaled = rope(RopeScaling::Factors(factors.clone())).inv_freq(1);
        for ((p, s), k) in plain.iter().zip(&scaled).zip(&factors) {
            assert_eq!(*s, p / k);
        }
    }

    #[test]
    fn dynamic_only_changes_past_the_trained_length() {
        let r = rope(RopeScaling::Dynamic { factor: 2.0, max_position_embeddings: 64 });
        assert!(r.depends_on_length());
        assert_eq!(r.inv_freq(64), rope(RopeScaling::None).inv_freq(64));
        let long = r.inv_freq(256);
        // base' = 1e4 * (2*256/64 - 1)^(16/14); the first frequency is always 1, later ones shrink.
        let base = 10000f64 * 7f64.powf(16.0 / 14.0);
        assert_eq!(long[0], 1.0);
        let want = 1.0 / base.powf(2.0 / 16.0);
        assert!((long[1] as f64 - want).abs() < 1e-6, "{} vs {want}", long[1]);
    }

    #[test]
    fn llama3_keeps_high_scales_low_blends_middle() {
        let r = Rope {
            dim: 64,
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            },
        };
        let plain = Rope { scaling: RopeScaling::None, ..r.clone() }.inv_freq(1);
        let scaled = r.inv_freq(1);
        let (mut kept, mut divided, mut blended) = (0, 0, 0);
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f32::consts::PI / p;
            if wavelen < 16.0 {
                assert_eq!(p, s);
                kept += 1;
            } else if wavelen > 64.0 {
                assert!((p / 8.0 - s).abs() <= 1e-7 * p);
                divided += 1;
            } else {
                assert!(*s < *p && *s > p / 8.0, "blend must lie between");
                blended += 1;
            }
        }
        assert!(kept > 0 && divided > 0 && blended > 0, "{kept} {divided} {blended}");
    }
}
