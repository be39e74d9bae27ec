//! Weights kept in llama.cpp's block formats: decoding equals the reference dequantization bit for bit,
//! the int8 and the prefill paths of `ops::linear` equal a straightforward f64 product on random blocks,
//! and the tensor operations on quantized matrices (slicing, stacking, quantizing, embedding rows) keep
//! the blocks intact.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_kernels::{
    DType, GgmlType, Tensor,
    cpu::quant::{
        self,
        act::{ActFormat, QuantizedRows},
        unpack,
    },
    ops,
};

const TYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Byte offsets of a block's f16 fields (steps and minimums), which random bytes would make inf or NaN.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => unreachable!(),
    }
}

/// `rows` rows of `k` values of random `ty` blocks with finite, non-zero steps.
fn random_blocks(r: &mut ChaCha8Rng, ty: GgmlType, rows: usize, k: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..rows * quant::row_bytes(ty, k)).map(|_| r.random()).collect();
    for block in bytes.chunks_exact_mut(ty.type_size()) {
        for &at in f16_fields(ty) {
            let v = half::f16::from_f32(r.random_range(0.001f32..0.05) * if r.random() { 1.0 } else { -1.0 });
            block[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    bytes
}

fn random_f32(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-2.0f32..2.0)).collect()
}

fn dequantized(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    tessera_gguf::dequantize(ty, bytes, &mut out).unwrap();
    out
}

#[test]
fn decoding_equals_the_reference_dequantization_bit_for_bit() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    for ty in TYPES {
        let k = 512;
        let bytes = random_blocks(&mut r, ty, 1, k);
        let (mut q, mut s) = (vec![0i8; k], vec![[0f32; 4]; k / unpack::GROUP]);
        unpack::unpack_row(ty, &bytes, &mut q, &mut s);
        let want = dequantized(ty, &bytes, k);
        for (i, (&qi, &wi)) in q.iter().zip(&want).enumerate() {
            let sc = s[i / 32];
            let got = sc[(i % 32) / 16] * qi as f32 - sc[2 + (i % 32) / 16];
            assert_eq!(got.to_bits(), wi.to_bits(), "{ty} value {i}: {got} vs {wi}");
        }
        assert!(want.iter().any(|&v| v != 0.0), "{ty}: the blocks decode to zeros");
    }
}

/// `x · wᵀ` in f64 from the dequantized weights and `x` as the int8 path sees it (each group's i8 times
/// its step), and the scale of the terms (for a tolerance).
fn reference(ty: GgmlType, w: &[u8], x: &[f32], m: usize, k: usize, n: usize, int8: bool) -> (Vec<f64>, f64) {
    let wf = dequantized(ty, w, n * k);
    let xf: Vec<f32> = if int8 {
        let a = QuantizedRows::new(x, k, ActFormat::for_weights(ty));
        a.q.iter().enumerate().map(|(i, &q)| q as f32 * a.d[i / 32]).collect()
    } else {
        x.to_vec()
    };
    let mut out = vec![0f64; m * n];
    let mut scale = 0f64;
    for i in 0..m {
        for j in 0..n {
            let (xr, wr) = (&xf[i * k..(i + 1) * k], &wf[j * k..(j + 1) * k]);
            out[i * n + j] = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            scale = scale.max(xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum());
        }
    }
    (out, scale)
}

#[test]
fn linear_on_quantized_weights_equals_the_f64_product_on_both_paths() {
    let mut r = ChaCha8Rng::seed_from_u64(2);
    // 43 rows: five interleaved groups and three rows after them, where the CPU interleaves.
    let (k, n) = (512, 43);
    for ty in TYPES {
        let bytes = random_blocks(&mut r, ty, n, k);
        let w = Tensor::from_quant(ty, bytes.clone(), &[n, k]).unwrap();
        let bias = random_f32(&mut r, n);
        for m in [1, 3, 9, quant::INT8_MAX_ROWS, quant::INT8_MAX_ROWS + 7, 70] {
            let x = random_f32(&mut r, m * k);
            let xt = Tensor::from_f32(x.clone(), &[m, k]).unwrap();
            let got = ops::linear(&xt, &w, Some(&Tensor::from_f32(bias.clone(), &[n]).unwrap())).unwrap();
            let got = got.as_f32().unwrap();
            let int8 = quant::int8_inputs(w.quant_matrix().unwrap(), m);
            let (want, scale) = reference(ty, &bytes, &x, m, k, n, int8);
            for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let w = w + bias[idx % n] as f64;
                assert!((g as f64 - w).abs() <= 2e-6 * scale + 1e-6, "{ty} m={m} [{idx}]: {g} vs {w} (scale {scale})");
            }
        }
    }
}

/// Rows long enough that a group of eight is more than the weights kept in cache at once, so each task
/// passes its groups one at a time, with more input rows than one pass takes.
#[test]
fn linear_on_long_rows_equals_the_f64_product() {
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let (k, n, m) = (32768, 27, 19);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K] {
        let bytes = random_blocks(&mut r, ty, n, k);
        let w = Tensor::from_quant(ty, bytes.clone(), &[n, k]).unwrap();
        let x = random_f32(&mut r, m * k);
        let got = ops::linear(&Tensor::from_f32(x.clone(), &[m, k]).unwrap(), &w, None).unwrap();
        let (want, scale) = reference(ty, &bytes, &x, m, k, n, quant::int8_inputs(w.quant_matrix().unwrap(), m));
        for (idx, (&g, &w)) in got.as_f32().unwrap().iter().zip(&want).enumerate() {
            assert!((g as f64 - w).abs() <= 2e-6 * scale + 1e-6, "{ty} [{idx}]: {g} vs {w} (scale {scale})");
        }
    }
}

/// A row's result does not depend on its batch: not on how many rows come with it (the interleaved
/// formats at every batch, the others up to the int8 path's limit), nor on where it sits among them.
#[test]
fn a_row_is_the_same_whatever_it_is_batched_with() {
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let (k, n) = (256, 27);
    for (ty, m) in
        [(GgmlType::Q5_K, 8), (GgmlType::Q8_0, 40), (GgmlType::Q4_0, 40), (GgmlType::Q4_K, 40), (GgmlType::Q6_K, 40)]
    {
        let w = Tensor::from_quant(ty, random_blocks(&mut r, ty, n, k), &[n, k]).unwrap();
        let x = random_f32(&mut r, m * k);
        let batch = ops::linear(&Tensor::from_f32(x.clone(), &[m, k]).unwrap(), &w, None).unwrap();
        for i in 0..m {
            let one = Tensor::from_f32(x[i * k..(i + 1) * k].to_vec(), &[1, k]).unwrap();
            let one = ops::linear(&one, &w, None).unwrap();
            assert_eq!(one.as_f32().unwrap(), &batch.as_f32().unwrap()[i * n..(i + 1) * n], "{ty} row {i}");
        }
    }
}

#[test]
fn quantized_tensors_slice_stack_and_embed_by_whole_blocks() {
    let mut r = ChaCha8Rng::seed_from_u64(4);
    let (ty, k) = (GgmlType::Q6_K, 256);
    let a = random_blocks(&mut r, ty, 3, k);
    let b = random_blocks(&mut r, ty, 2, k);
    let (ta, tb) =
        (Tensor::from_quant(ty, a.clone(), &[3, k]).unwrap(), Tensor::from_quant(ty, b.clone(), &[2, k]).unwrap());
    assert_eq!(ta.dtype(), DType::Quant(ty));
    assert_eq!(ta.size_in_bytes(), a.len());
    let both = Tensor::concat_rows(&[&ta, &tb]).unwrap();
    assert_eq!(both.shape(), &[5, k]);
    assert_eq!(both.quant_bytes().unwrap().1, [a.clone(), b.clone()].concat());
    assert_eq!(both.narrow_rows(3, 5).unwrap().quant_bytes().unwrap().1, b);
    let all = dequantized(ty, &[a, b].concat(), 5 * k);
    assert_eq!(both.to_vec_f32().unwrap(), all);
    let rows = ops::embedding(&[4, 0, 4], &both).unwrap();
    let want: Vec<f32> = [4usize, 0, 4].iter().flat_map(|&i| all[i * k..(i + 1) * k].to_vec()).collect();
    assert_eq!(rows.as_f32().unwrap(), want.as_slice());
    assert!(ops::embedding(&[5], &both).is_err());
}

#[test]
fn quantizing_a_tensor_equals_the_reference_quantizer_and_bad_shapes_are_errors() {
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let x = random_f32(&mut r, 4 * 64);
    let t = Tensor::from_f32(x.clone(), &[4, 64]).unwrap();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_1] {
        let q = t.clone().to_dtype(DType::Quant(ty)).unwrap();
        let mut want = Vec::new();
        tessera_gguf::quantize(ty, &x, &mut want).unwrap();
        assert_eq!(q.quant_bytes().unwrap(), (ty, want.as_slice().into()));
    }
    let err = |r: Result<Tensor, tessera_kernels::KernelError>| r.unwrap_err().to_string();
    let row = Tensor::from_f32(random_f32(&mut r, 256), &[1, 256]).unwrap();
    assert!(err(row.to_dtype(DType::Quant(GgmlType::Q3_K))).contains("quantizing to Q3_K is not supported"));
    assert!(
        err(Tensor::from_f32(vec![0.5; 48], &[2, 24]).unwrap().to_dtype(DType::Quant(GgmlType::Q8_0)))
            .contains("whole")
    );
    assert!(err(Tensor::from_quant(GgmlType::Q8_0, vec![0; 33], &[1, 32])).contains("33 bytes"));
    assert!(err(Tensor::from_quant(GgmlType::Q8_0, vec![0; 34], &[34])).contains("matrix"));
    assert!(err(Tensor::from_quant(GgmlType::IQ2_XS, vec![0; 74], &[1, 256])).contains("IQ2_XS"));
    assert!(Tensor::zeros(&[1, 32], DType::Quant(GgmlType::Q8_0), tessera_kernels::Device::Cpu).is_err());
}
