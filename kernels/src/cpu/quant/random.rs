//! Random weight matrices in a block format, for benchmarks of a model's speed (`tessera bench gpu
//! --quantize`): random levels under steps chosen so the decoded weights are about `scale` in magnitude,
//! never inf or NaN. Made directly as blocks: quantizing random f32 weights of an 8B model would take
//! minutes, and its speed does not depend on the values.

use tessera_gguf::GgmlType;

/// Byte offsets of a block's f16 fields (its steps, then its minimums, if any).
fn f16_fields(ty: GgmlType) -> Option<(&'static [usize], &'static [usize])> {
    use GgmlType::*;
    Some(match ty {
        Q4_0 | Q5_0 | Q8_0 => (&[0], &[]),
        Q4_1 | Q5_1 | Q4_K | Q5_K => (&[0], &[2]),
        Q2_K => (&[80], &[82]),
        Q3_K => (&[108], &[]),
        Q6_K => (&[208], &[]),
        _ => return None,
    })
}

/// The largest |level × sub-block scale| of a format's blocks: a step of `scale / levels` keeps its values
/// within about `scale`.
fn levels(ty: GgmlType) -> f32 {
    use GgmlType::*;
    match ty {
        Q8_0 => 127.0,
        Q4_0 => 8.0,
        Q4_1 => 15.0,
        Q5_0 => 16.0,
        Q5_1 => 31.0,
        Q2_K => 3.0 * 15.0,
        Q3_K => 4.0 * 32.0,
        Q4_K => 15.0 * 63.0,
        Q5_K => 31.0 * 63.0,
        _ => 32.0 * 128.0,
    }
}

/// `rows` rows of `k` values (a multiple of the block size) of random `ty` blocks from `seed`, whose values
/// are at most about `scale` in magnitude; `None` for a format without blocks here.
pub fn random_blocks(ty: GgmlType, rows: usize, k: usize, seed: u64, scale: f32) -> Option<Vec<u8>> {
    let (steps, mins) = f16_fields(ty)?;
    if !k.is_multiple_of(ty.block_size()) {
        return None;
    }
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut bytes = vec![0u8; rows * super::row_bytes(ty, k)];
    for chunk in bytes.chunks_mut(8) {
        let r = next().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    let step = scale / levels(ty);
    for block in bytes.chunks_exact_mut(ty.type_size()) {
        let r = next();
        let magnitude = step * (0.5 + (r & 0xffff) as f32 / 131_072.0);
        let sign = if r & (1 << 20) != 0 { -1.0 } else { 1.0 };
        for &at in steps {
            block[at..at + 2].copy_from_slice(&half::f16::from_f32(sign * magnitude).to_bits().to_le_bytes());
        }
        for &at in mins {
            block[at..at + 2].copy_from_slice(&half::f16::from_f32(magnitude).to_bits().to_le_bytes());
        }
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_blocks_decode_to_finite_values_of_about_the_scale() {
        for ty in GgmlType::ALL.into_iter().filter(|&t| super::super::supported(t)) {
            let (rows, k) = (3, 512);
            let bytes = random_blocks(ty, rows, k, 7, 0.1).unwrap();
            assert_eq!(bytes.len(), rows * super::super::row_bytes(ty, k));
            let mut v = vec![0f32; rows * k];
            tessera_gguf::dequantize(ty, &bytes, &mut v).unwrap();
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(v.iter().all(|x| x.is_finite()), "{ty}");
            assert!(max > 0.01 && max <= 0.25, "{ty}: largest value {max}");
            assert_ne!(random_blocks(ty, rows, k, 8, 0.1), Some(bytes), "{ty}: the seed changes the blocks");
        }
        assert_eq!(random_blocks(GgmlType::F16, 1, 32, 1, 0.1), None);
        assert_eq!(random_blocks(GgmlType::Q4_K, 1, 32, 1, 0.1), None, "not whole blocks");
    }
}
