//! Every op against a plain, obviously-correct reference, on seeded random shapes and values.

// References index explicitly on purpose: they should read like the formula, not like the kernel.
#![allow(clippy::needless_range_loop)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_kernels::{
    Tensor,
    ops::{self, AttentionSeq, AttentionShape},
    rope::{Rope, RopeScaling},
};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randn(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-2.0f32..2.0)).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(want.iter().any(|&v| v != 0.0), "{what}: reference is all zeros, the test would prove nothing");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

fn t(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_f32(data, shape).unwrap()
}

#[test]
fn linear_matches_naive_for_gemv_and_gemm_sizes() {
    let mut r = rng(1);
    for case in 0..24 {
        // Small m exercises the GEMV path, larger m the gemm crate.
        let m = [1, 2, 3, 5, 8, 9, 17, 40][case % 8];
        let (k, n) = (r.random_range(1..130), r.random_range(1..150));
        let (x, w, b) = (randn(&mut r, m * k), randn(&mut r, n * k), randn(&mut r, n));
        let bias = if case % 2 == 0 { Some(t(b.clone(), &[n])) } else { None };
        let got = ops::linear(&t(x.clone(), &[m, k]), &t(w.clone(), &[n, k]), bias.as_ref()).unwrap();
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                want[i * n + j] = s as f32 + if case % 2 == 0 { b[j] } else { 0.0 };
            }
        }
        assert_eq!(got.shape(), [m, n]);
        assert_close(got.as_f32().unwrap(), &want, 1e-4, &format!("linear m={m} k={k} n={n}"));
    }
}

#[test]
fn linear_rejects_mismatched_shapes() {
    let x = t(vec![1.0; 6], &[2, 3]);
    assert!(ops::linear(&x, &t(vec![1.0; 8], &[2, 4]), None).is_err());
    assert!(ops::linear(&x, &t(vec![1.0; 6], &[2, 3]), Some(&t(vec![1.0; 3], &[3]))).is_err());
    let bf = t(vec![1.0; 6], &[2, 3]).to_dtype(tessera_kernels::DType::BF16).unwrap();
    assert!(ops::linear(&x, &bf, None).unwrap_err().to_string().contains("bf16"));
}

#[test]
fn matmul_matches_naive() {
    let mut r = rng(2);
    for _ in 0..10 {
        let (m, k, n) = (r.random_range(1..70), r.random_range(1..70), r.random_range(1..70));
        let (a, b) = (randn(&mut r, m * k), randn(&mut r, k * n));
        let got = ops::matmul(&t(a.clone(), &[m, k]), &t(b.clone(), &[k, n])).unwrap();
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|kk| a[i * k + kk] as f64 * b[kk * n + j] as f64).sum::<f64>() as f32;
            }
        }
        assert_close(got.as_f32().unwrap(), &want, 1e-4, "matmul");
    }
}

#[test]
fn rms_norm_matches_naive() {
    let mut r = rng(3);
    for _ in 0..10 {
        let (rows, h) = (r.random_range(1..40), r.random_range(1..300));
        let (x, w) = (randn(&mut r, rows * h), randn(&mut r, h));
        let got = ops::rms_norm(&t(x.clone(), &[rows, h]), &t(w.clone(), &[h]), 1e-5).unwrap();
        let mut want = vec![0f32; rows * h];
        for i in 0..rows {
            let row = &x[i * h..(i + 1) * h];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
            for j in 0..h {
                want[i * h + j] = (row[j] as f64 / (ms + 1e-5).sqrt() * w[j] as f64) as f32;
            }
        }
        assert_close(got.as_f32().unwrap(), &want, 1e-5, "rms_norm");
    }
}

#[test]
fn rope_matches_complex_rotation_for_every_scaling() {
    let mut r = rng(4);
    let scalings = [
        RopeScaling::None,
        RopeScaling::Linear { factor: 2.0 },
        RopeScaling::Dynamic { factor: 4.0, max_position_embeddings: 16 },
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        },
    ];
    for scaling in scalings {
        let hd = 2 * r.random_range(1..20);
        let (toks, heads) = (r.random_range(1..12), r.random_range(1..5));
        let rope = Rope { dim: hd, theta: 10000.0, scaling: scaling.clone() };
        let positions: Vec<u32> = (0..toks).map(|_| r.random_range(0..200)).collect();
        let inv = rope.inv_freq(201);
        let x = randn(&mut r, toks * heads * hd);
        let mut got = t(x.clone(), &[toks, heads, hd]);
        ops::rope_inplace(&mut got, &positions, &inv).unwrap();
        // Reference: pair (i, i + hd/2) as a complex number, multiplied by e^{i·pos·freq}, in f64.
        let mut want = x.clone();
        for tk in 0..toks {
            for h in 0..heads {
                let base = (tk * heads + h) * hd;
                for i in 0..hd / 2 {
                    let ang = positions[tk] as f64 * inv[i] as f64;
                    let (re, im) = (x[base + i] as f64, x[base + i + hd / 2] as f64);
                    want[base + i] = (re * ang.cos() - im * ang.sin()) as f32;
                    want[base + i + hd / 2] = (re * ang.sin() + im * ang.cos()) as f32;
                }
            }
        }
        assert_close(got.as_f32().unwrap(), &want, 2e-4, &format!("rope {scaling:?}"));
    }
}

#[test]
fn silu_mul_softmax_add_embedding_match_naive() {
    let mut r = rng(5);
    let n = r.random_range(100..9000);
    let (g, u) = (randn(&mut r, n), randn(&mut r, n));
    let got = ops::silu_mul(&t(g.clone(), &[n]), &t(u.clone(), &[n])).unwrap();
    let want: Vec<f32> =
        g.iter().zip(&u).map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32).collect();
    assert_close(got.as_f32().unwrap(), &want, 1e-5, "silu_mul");

    let (rows, cols) = (r.random_range(1..20), r.random_range(1..100));
    let x: Vec<f32> = randn(&mut r, rows * cols).iter().map(|v| v * 20.0).collect();
    let mut got = t(x.clone(), &[rows, cols]);
    ops::softmax_inplace(&mut got).unwrap();
    let mut want = vec![0f32; rows * cols];
    for i in 0..rows {
        let row = &x[i * cols..(i + 1) * cols];
        let z: f64 = row.iter().map(|v| (*v as f64).exp()).sum();
        for j in 0..cols {
            want[i * cols + j] = ((row[j] as f64).exp() / z) as f32;
        }
    }
    assert_close(got.as_f32().unwrap(), &want, 1e-5, "softmax");

    let (a, b) = (randn(&mut r, 77), randn(&mut r, 77));
    let mut sum = t(a.clone(), &[7, 11]);
    ops::add_inplace(&mut sum, &t(b.clone(), &[7, 11])).unwrap();
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_close(sum.as_f32().unwrap(), &want, 0.0, "add");
    assert!(ops::add_inplace(&mut sum, &t(b, &[11, 7])).is_err());

    let (vocab, h) = (50, 13);
    let table = randn(&mut r, vocab * h);
    let ids: Vec<u32> = (0..9).map(|_| r.random_range(0..vocab as u32)).collect();
    let got = ops::embedding(&ids, &t(table.clone(), &[vocab, h])).unwrap();
    let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * h..(i as usize + 1) * h].to_vec()).collect();
    assert_close(got.as_f32().unwrap(), &want, 0.0, "embedding");
    let err = ops::embedding(&[3, 50], &t(table, &[vocab, h])).unwrap_err();
    assert!(err.to_string().contains("token id 50"), "{err}");
}

/// Dense causal attention on each sequence's full K/V, the textbook formula, in f64.
fn reference_attention(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    seqs: &[(usize, usize, usize)],
    s: &AttentionShape,
) -> Vec<f32> {
    let (nh, nkv, hd) = (s.num_heads, s.num_kv_heads, s.head_dim);
    let mut out = vec![0f32; q.len()];
    for (si, &(q_start, q_len, pos0)) in seqs.iter().enumerate() {
        for i in 0..q_len {
            let pos = pos0 + i;
            for h in 0..nh {
                let kvh = h * nkv / nh;
                let qv = &q[((q_start + i) * nh + h) * hd..][..hd];
                let visible: Vec<usize> = (0..=pos).filter(|&j| s.sliding_window.is_none_or(|w| pos - j < w)).collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        let kv = &keys[si][(j * nkv + kvh) * hd..][..hd];
                        qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * s.scale as f64
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                for d in 0..hd {
                    let mut acc = 0f64;
                    for (&j, sc) in visible.iter().zip(&scores) {
                        acc += (sc - m).exp() / z * values[si][(j * nkv + kvh) * hd + d] as f64;
                    }
                    out[((q_start + i) * nh + h) * hd + d] = acc as f32;
                }
            }
        }
    }
    out
}

#[test]
fn paged_attention_matches_dense_reference_on_mixed_batches() {
    let mut r = rng(6);
    for case in 0..18 {
        let mut nkv = r.random_range(1..4);
        let mut nh = nkv * r.random_range(1..4);
        // Odd short heads, and the 64 and 128 of real models (eight-lane chunks plus none or some tail); 64
        // with blocks of 16, so its rows go eight at a time, 72 and 128 with blocks of 1 and 4, one at a time.
        let hd = match case {
            9 => 72,
            10 => 128,
            11 => 64,
            12.. => 8,
            _ => r.random_range(1..20),
        };
        // Heads of 8 run eight heads at a time: one group (stories260K's 8/4), a partial group, several
        // groups, and a group size that does not divide 8.
        if case >= 12 {
            (nh, nkv) = [(8, 4), (6, 2), (8, 8), (16, 4), (12, 4), (9, 3)][case - 12];
        }
        let bs: usize = [1, 4, 16][case % 3];
        // No window for the heads of 64, whose runs must be long enough to go eight rows at a time.
        let window = if case % 2 == 0 || case == 11 { None } else { Some(r.random_range(1..10)) };
        let shape = AttentionShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
            scale: 1.0 / (hd as f32).sqrt(),
            sliding_window: window,
        };
        // A batch mixing decodes (q_len 1 at the end of a long context) and prefill chunks.
        let nseq = r.random_range(1..5);
        let mut specs: Vec<(usize, usize, usize)> = Vec::new();
        let mut row = 0;
        for _ in 0..nseq {
            let (q_len, pos0) = if r.random_bool(0.5) {
                (1, r.random_range(0..40))
            } else {
                (r.random_range(1..20), r.random_range(0..10))
            };
            specs.push((row, q_len, pos0));
            row += q_len;
        }
        // Scatter each sequence's K/V over shuffled blocks of a shared pool.
        let total_blocks: usize = specs.iter().map(|&(_, l, p)| (p + l).div_ceil(bs)).sum::<usize>() + 3;
        let mut free: Vec<u32> = (0..total_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, r.random_range(0..=i));
        }
        let row_len = nkv * hd;
        let mut k_cache = randn(&mut r, total_blocks * bs * row_len); // garbage where unused: must be ignored
        let mut v_cache = randn(&mut r, total_blocks * bs * row_len);
        let (mut keys, mut values, mut tables) = (Vec::new(), Vec::new(), Vec::new());
        for &(_, l, p) in &specs {
            let len = p + l;
            let table: Vec<u32> = (0..len.div_ceil(bs)).map(|_| free.pop().unwrap()).collect();
            let (k, v) = (randn(&mut r, len * row_len), randn(&mut r, len * row_len));
            for j in 0..len {
                let slot = table[j / bs] as usize * bs + j % bs;
                k_cache[slot * row_len..][..row_len].copy_from_slice(&k[j * row_len..][..row_len]);
                v_cache[slot * row_len..][..row_len].copy_from_slice(&v[j * row_len..][..row_len]);
            }
            keys.push(k);
            values.push(v);
            tables.push(table);
        }
        let q = randn(&mut r, row * nh * hd);
        let seqs: Vec<AttentionSeq> = specs
            .iter()
            .zip(&tables)
            .map(|(&(q_start, q_len, pos0), table)| AttentionSeq { q_start, q_len, pos0, block_table: table })
            .collect();
        let kc = t(k_cache, &[total_blocks, bs, nkv, hd]);
        let vc = t(v_cache, &[total_blocks, bs, nkv, hd]);
        let got = ops::paged_attention(&t(q.clone(), &[row, nh, hd]), &kc, &vc, &seqs, &shape).unwrap();
        let want = reference_attention(&q, &keys, &values, &specs, &shape);
        assert_close(got.as_f32().unwrap(), &want, 1e-4, &format!("attention case {case}"));
    }
}

#[test]
fn kv_write_then_attention_round_trips_and_rejects_bad_tables() {
    let mut r = rng(7);
    let (nb, bs, nkv, hd): (usize, usize, usize, usize) = (4, 4, 2, 8);
    let mut kc = Tensor::zeros(&[nb, bs, nkv, hd], tessera_kernels::DType::F32, tessera_kernels::Device::Cpu).unwrap();
    let mut vc = kc.clone();
    let (k, v) = (randn(&mut r, 6 * nkv * hd), randn(&mut r, 6 * nkv * hd));
    let table = [2u32, 0];
    let slots: Vec<usize> = (0..6).map(|p| table[p / bs] as usize * bs + p % bs).collect();
    ops::write_kv_cache(&t(k.clone(), &[6, nkv, hd]), &t(v.clone(), &[6, nkv, hd]), &mut kc, &mut vc, &slots).unwrap();
    let row = nkv * hd;
    assert_eq!(&kc.as_f32().unwrap()[(2 * bs) * row..][..row], &k[..row]);
    // Position 5 is in table[5 / 4] = block 0, at offset 1.
    let slot_of_pos5 = 1;
    assert_eq!(&vc.as_f32().unwrap()[slot_of_pos5 * row..][..row], &v[5 * row..][..row]);
    assert!(
        ops::write_kv_cache(&t(k.clone(), &[6, nkv, hd]), &t(v, &[6, nkv, hd]), &mut kc, &mut vc, &[99; 6]).is_err()
    );

    let shape = AttentionShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: hd,
        block_size: bs,
        scale: 0.3,
        sliding_window: None,
    };
    let q = t(randn(&mut r, 4 * hd), &[1, 4, hd]);
    let short = [AttentionSeq { q_start: 0, q_len: 1, pos0: 5, block_table: &[2] }];
    assert!(ops::paged_attention(&q, &kc, &vc, &short, &shape).unwrap_err().to_string().contains("needs 2 blocks"));
    let oob = [AttentionSeq { q_start: 0, q_len: 1, pos0: 5, block_table: &[2, 9] }];
    assert!(ops::paged_attention(&q, &kc, &vc, &oob, &shape).unwrap_err().to_string().contains("block 9"));
    let ok = [AttentionSeq { q_start: 0, q_len: 1, pos0: 5, block_table: &table }];
    assert!(ops::paged_attention(&q, &kc, &vc, &ok, &shape).is_ok());
}

#[test]
fn fused_projection_helpers_match_their_unfused_forms() {
    let mut r = rng(11);
    let (t, a, b, c) = (5, 6, 3, 4);
    let x = randn(&mut r, t * (a + b + c));
    let parts = ops::split_cols(&t_(x.clone(), &[t, a + b + c]), &[a, b, c]).unwrap();
    for (p, (c0, w)) in parts.iter().zip([(0, a), (a, b), (a + b, c)]) {
        let want: Vec<f32> =
            (0..t).flat_map(|row| x[row * (a + b + c) + c0..row * (a + b + c) + c0 + w].to_vec()).collect();
        assert_eq!(p.shape(), [t, w]);
        assert_eq!(p.as_f32().unwrap(), &want[..]);
    }
    assert!(ops::split_cols(&t_(x.clone(), &[t, a + b + c]), &[a, b]).is_err());

    let (g, u) = (randn(&mut r, t * a), randn(&mut r, t * a));
    let packed: Vec<f32> =
        (0..t).flat_map(|row| [&g[row * a..(row + 1) * a], &u[row * a..(row + 1) * a]].concat()).collect();
    let got = ops::silu_mul_packed(&t_(packed, &[t, 2 * a])).unwrap();
    let want = ops::silu_mul(&t_(g, &[t, a]), &t_(u, &[t, a])).unwrap();
    assert_eq!(got.as_f32().unwrap(), want.as_f32().unwrap());
    assert!(ops::silu_mul_packed(&t_(vec![1.0; 3], &[1, 3])).is_err());

    let (p, q) = (t_(randn(&mut r, 2 * a), &[2, a]), t_(randn(&mut r, 3 * a), &[3, a]));
    let s = Tensor::concat_rows(&[&p, &q]).unwrap();
    assert_eq!(s.shape(), [5, a]);
    assert_eq!(s.as_f32().unwrap(), [p.as_f32().unwrap(), q.as_f32().unwrap()].concat());
    assert!(Tensor::concat_rows(&[&p, &t_(vec![0.5; 4], &[2, 2])]).is_err());
}

fn t_(data: Vec<f32>, shape: &[usize]) -> Tensor {
    t(data, shape)
}

#[test]
fn add_rows_scaled_adds_a_scaled_delta_to_some_rows_and_a_band_of_columns() {
    let mut r = rng(41);
    let (n, cols, col0, w) = (9, 23, 5, 11);
    let y0 = randn(&mut r, n * cols);
    let rows = [0u32, 3, 4, 8];
    let d = randn(&mut r, rows.len() * w);
    let mut y = t(y0.clone(), &[n, cols]);
    ops::add_rows_scaled(&mut y, &rows, col0, &t(d.clone(), &[rows.len(), w]), 0.75).unwrap();
    let mut want = y0.clone();
    for (i, &row) in rows.iter().enumerate() {
        for j in 0..w {
            want[row as usize * cols + col0 + j] += 0.75 * d[i * w + j];
        }
    }
    let got = y.as_f32().unwrap();
    assert_close(got, &want, 0.0, "add_rows_scaled");
    // Rows not named and columns outside the band are untouched.
    assert_eq!(got[cols..2 * cols], y0[cols..2 * cols]);
    assert_eq!(got[..col0], y0[..col0]);

    let dt = t(d, &[rows.len(), w]);
    for (bad_rows, col0) in [(&[0u32, 0, 1, 2][..], 0), (&[3, 1, 4, 5][..], 0), (&[0, 1, 2, 9][..], 0), (&rows[..], 13)]
    {
        assert!(ops::add_rows_scaled(&mut y, bad_rows, col0, &dt, 1.0).is_err(), "{bad_rows:?} at {col0}");
    }
}

#[test]
fn add_lora_adds_each_adapters_low_rank_delta_to_its_rows_and_band() {
    let mut r = rng(43);
    let (n, x_cols, y_cols) = (40, 24, 37);
    let x = randn(&mut r, n * x_cols);
    let y0 = randn(&mut r, n * y_cols);
    // (rows, col0, rank, out, scale): two adapters over the same band (different rows), one over a band
    // further right, one with rows enough to be split into tasks, one with a rank not a multiple of 8.
    let specs: Vec<(Vec<u32>, usize, usize, usize, f32)> = vec![
        (vec![0, 3, 4], 0, 8, 20, 2.0),
        (vec![1, 2, 9], 0, 4, 20, 0.5),
        (vec![0, 9, 39], 20, 16, 17, 1.25),
        ((10..39).collect(), 5, 3, 11, 0.75),
    ];
    let weights: Vec<(Vec<f32>, Vec<f32>)> =
        specs.iter().map(|(_, _, rank, out, _)| (randn(&mut r, rank * x_cols), randn(&mut r, out * rank))).collect();
    let tensors: Vec<(Tensor, Tensor)> = specs
        .iter()
        .zip(&weights)
        .map(|((_, _, rank, out, _), (a, b))| (t(a.clone(), &[*rank, x_cols]), t(b.clone(), &[*out, *rank])))
        .collect();
    let jobs: Vec<ops::LoraJob<'_>> = specs
        .iter()
        .zip(&tensors)
        .map(|((rows, col0, _, _, scale), (a, b))| ops::LoraJob { rows, col0: *col0, a, b, scale: *scale })
        .collect();
    let mut y = t(y0.clone(), &[n, y_cols]);
    ops::add_lora(&mut y, &t(x.clone(), &[n, x_cols]), &jobs).unwrap();

    let mut want = y0.clone();
    for ((rows, col0, rank, out, scale), (a, b)) in specs.iter().zip(&weights) {
        for &row in rows {
            let row = row as usize;
            let u: Vec<f32> =
                (0..*rank).map(|k| (0..x_cols).map(|i| a[k * x_cols + i] * x[row * x_cols + i]).sum()).collect();
            for c in 0..*out {
                let d: f32 = (0..*rank).map(|k| b[c * rank + k] * u[k]).sum();
                want[row * y_cols + col0 + c] += scale * d;
            }
        }
    }
    assert_close(y.as_f32().unwrap(), &want, 1e-5, "add_lora");
    // A row no adapter names is untouched.
    assert_eq!(y.as_f32().unwrap()[5 * y_cols..6 * y_cols], y0[5 * y_cols..6 * y_cols]);

    let xt = t(x, &[n, x_cols]);
    let (a, b) = &tensors[0];
    let bad = [
        ops::LoraJob { rows: &[3, 1], col0: 0, a, b, scale: 1.0 },
        ops::LoraJob { rows: &[40], col0: 0, a, b, scale: 1.0 },
        ops::LoraJob { rows: &[1], col0: 30, a, b, scale: 1.0 },
        ops::LoraJob { rows: &[1], col0: 0, a: b, b: a, scale: 1.0 },
    ];
    for job in bad {
        assert!(ops::add_lora(&mut y, &xt, std::slice::from_ref(&job)).is_err(), "rows {:?} at {}", job.rows, job.col0);
    }
}
