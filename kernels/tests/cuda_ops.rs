//! Every CUDA op against the CPU op on fresh random inputs (never zeros), on `cuda:0`.
//!
//! These need a GPU, so they are `#[ignore]`d: `scripts/gpu-check.sh` runs them on the device machine with
//! `--ignored`. Inputs are rounded to bf16 before the CPU reference sees them, so both compute the same
//! function; the check is ‖gpu − cpu‖ / ‖cpu‖ < 1e-2 (bf16 outputs). Output memory is poisoned with NaN
//! first (a buffer of the output's size is filled and freed just before the op, so the stream-ordered
//! allocator hands the same memory to the op), and every output element must come back finite.
#![cfg(feature = "cuda")]
#![allow(clippy::needless_range_loop)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_kernels::{
    DType, Device, GgmlType, Tensor,
    cpu::quant::random::random_blocks,
    ops::{self, AttentionSeq, AttentionShape, RowSampling},
    rope::{Rope, RopeScaling},
};

const GPU: Device = Device::Cuda(0);

/// A fresh seed per run, printed so that a failure can be replayed with TESSERA_TEST_SEED.
fn rng(test: &str) -> ChaCha8Rng {
    let seed = std::env::var("TESSERA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("{test}: seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

/// Random values already representable in bf16.
fn randn(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| half::bf16::from_f32(r.random_range(-scale..scale)).to_f32()).collect()
}

fn cpu(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(data.to_vec(), shape).unwrap()
}

fn gpu(data: &[f32], shape: &[usize]) -> Tensor {
    cpu(data, shape).to_dtype(DType::BF16).unwrap().to_device(GPU).unwrap()
}

/// Fills and frees a buffer of `n` elements of `dtype` with NaN, so the next allocation of that size reuses
/// poisoned memory.
fn poison_next(n: usize, dtype: DType) {
    let mut t = Tensor::zeros(&[n], dtype, GPU).unwrap();
    ops::poison(&mut t).unwrap();
    assert_eq!(ops::count_nonfinite(&t).unwrap(), n, "poison did not fill the buffer");
}

fn check(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert_eq!(got.device(), GPU, "{what}: device");
    assert_eq!(ops::count_nonfinite(got).unwrap(), 0, "{what}: elements not written (or not finite)");
    let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    let norm: f64 = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    assert!(norm > 0.0, "{what}: reference is all zeros");
    let diff: f64 = g.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
    let rel = diff / norm;
    println!("{what}: rel err {rel:.2e}");
    assert!(rel < 1e-2, "{what}: ‖gpu − cpu‖/‖cpu‖ = {rel:.3e}");
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn device_reports_itself_and_round_trips_tensors() {
    let mut r = rng("round_trip");
    let x = randn(&mut r, 1000, 3.0);
    let t = gpu(&x, &[10, 100]);
    assert_eq!(t.dtype(), DType::BF16);
    assert_eq!(t.to_vec_f32().unwrap(), x, "bf16 values must survive upload and download exactly");
    let f = t.clone().to_dtype(DType::F32).unwrap();
    assert_eq!(f.to_vec_f32().unwrap(), x);
    assert_eq!(f.to_dtype(DType::BF16).unwrap().to_vec_f32().unwrap(), x);
    assert_eq!(t.narrow_rows(3, 5).unwrap().to_vec_f32().unwrap(), x[300..500]);
    let u_gpu = Tensor::uniform(&[5000], DType::BF16, GPU, 99, 0.25).unwrap().to_vec_f32().unwrap();
    let u_cpu = Tensor::uniform(&[5000], DType::F32, Device::Cpu, 99, 0.25).unwrap().to_vec_f32().unwrap();
    assert_eq!(u_gpu, u_cpu, "random weights must be the same on both devices");
    let mixed = ops::add_inplace(&mut t.clone(), &cpu(&x, &[10, 100]));
    assert!(mixed.is_err(), "mixing devices must be an error");
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn linear_matches_cpu_in_bf16_and_f32_out() {
    let mut r = rng("linear");
    // m <= 4 with k % 8 == 0 goes to the GEMV kernel (ragged k and n included), the rest to cuBLAS.
    for (m, k, n) in [
        (1, 64, 96),
        (3, 200, 130),
        (16, 4096, 6144),
        (4, 136, 77),
        (2, 4104, 33),
        (1, 14336, 4096),
        (2, 100, 50),
        (17, 512, 1000),
        (64, 4096, 512),
        (300, 128, 257),
    ] {
        let (x, w, b) = (randn(&mut r, m * k, 1.0), randn(&mut r, n * k, 0.1), randn(&mut r, n, 1.0));
        let want = ops::linear(&cpu(&x, &[m, k]), &cpu(&w, &[n, k]), Some(&cpu(&b, &[n]))).unwrap();
        for out in [DType::BF16, DType::F32] {
            poison_next(m * n, out);
            let got = ops::linear_to(&gpu(&x, &[m, k]), &gpu(&w, &[n, k]), Some(&gpu(&b, &[n])), out).unwrap();
            assert_eq!(got.dtype(), out);
            check(&format!("linear {m}x{k}x{n} -> {out:?}"), &got, &want);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn norms_match_cpu() {
    let mut r = rng("norms");
    for (rows, h) in [(1, 64), (7, 4096), (33, 1000)] {
        let (x, d, w) = (randn(&mut r, rows * h, 2.0), randn(&mut r, rows * h, 2.0), randn(&mut r, h, 1.5));
        poison_next(rows * h, DType::BF16);
        let got = ops::rms_norm(&gpu(&x, &[rows, h]), &gpu(&w, &[h]), 1e-5).unwrap();
        check(
            &format!("rms_norm {rows}x{h}"),
            &got,
            &ops::rms_norm(&cpu(&x, &[rows, h]), &cpu(&w, &[h]), 1e-5).unwrap(),
        );

        let mut resid_cpu = cpu(&x, &[rows, h]);
        let want = ops::add_rms_norm(&mut resid_cpu, &cpu(&d, &[rows, h]), &cpu(&w, &[h]), 1e-5).unwrap();
        let mut resid_gpu = gpu(&x, &[rows, h]);
        poison_next(rows * h, DType::BF16);
        let got = ops::add_rms_norm(&mut resid_gpu, &gpu(&d, &[rows, h]), &gpu(&w, &[h]), 1e-5).unwrap();
        check(&format!("add_rms_norm {rows}x{h}"), &got, &want);
        check(&format!("add_rms_norm residual {rows}x{h}"), &resid_gpu, &resid_cpu);
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn rope_matches_cpu_shared_and_per_token_and_llama3() {
    let mut r = rng("rope");
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    for (scaling, hd, heads, toks) in
        [(RopeScaling::None, 64, 4, 9), (llama3, 128, 32, 40), (RopeScaling::Linear { factor: 2.0 }, 16, 3, 5)]
    {
        let rope = Rope { dim: hd, theta: 500000.0, scaling };
        let positions: Vec<u32> = (0..toks).map(|_| r.random_range(0..100_000)).collect();
        let x = randn(&mut r, toks * heads * hd, 2.0);
        for per_token in [false, true] {
            let freqs: Vec<f32> = if per_token {
                (0..toks).flat_map(|t| rope.inv_freq(1000 + 37 * t)).collect()
            } else {
                rope.inv_freq(100_000)
            };
            let mut want = cpu(&x, &[toks, heads, hd]);
            ops::rope_inplace(&mut want, &positions, &freqs).unwrap();
            let mut got = gpu(&x, &[toks, heads, hd]);
            ops::rope_inplace(&mut got, &positions, &freqs).unwrap();
            check(&format!("rope hd={hd} per_token={per_token}"), &got, &want);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn elementwise_and_gathers_match_cpu() {
    let mut r = rng("elementwise");
    let n = 3 * 14336 + 5;
    let (a, b) = (randn(&mut r, n, 6.0), randn(&mut r, n, 2.0));
    poison_next(n, DType::BF16);
    let got = ops::silu_mul(&gpu(&a, &[n]), &gpu(&b, &[n])).unwrap();
    check("silu_mul", &got, &ops::silu_mul(&cpu(&a, &[n]), &cpu(&b, &[n])).unwrap());

    let mut want = cpu(&a, &[n]);
    ops::add_inplace(&mut want, &cpu(&b, &[n])).unwrap();
    let mut got = gpu(&a, &[n]);
    ops::add_inplace(&mut got, &gpu(&b, &[n])).unwrap();
    check("add", &got, &want);

    let (vocab, h) = (1000, 96);
    let table = randn(&mut r, vocab * h, 1.0);
    let ids: Vec<u32> = (0..37).map(|_| r.random_range(0..vocab as u32)).collect();
    poison_next(ids.len() * h, DType::BF16);
    let got = ops::embedding(&ids, &gpu(&table, &[vocab, h])).unwrap();
    check("embedding", &got, &ops::embedding(&ids, &cpu(&table, &[vocab, h])).unwrap());
    assert!(ops::embedding(&[vocab as u32], &gpu(&table, &[vocab, h])).is_err());

    // The fused-projection helpers: column split, packed SiLU-and-multiply, row concatenation.
    let (t, a, b) = (9, 4096, 1024);
    let x = randn(&mut r, t * (a + 2 * b), 2.0);
    let want = ops::split_cols(&cpu(&x, &[t, a + 2 * b]), &[a, b, b]).unwrap();
    let got = ops::split_cols(&gpu(&x, &[t, a + 2 * b]), &[a, b, b]).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_vec_f32().unwrap(), w.to_vec_f32().unwrap(), "split_cols part {i}");
    }
    let gu = randn(&mut r, t * 2 * a, 4.0);
    poison_next(t * a, DType::BF16);
    let got = ops::silu_mul_packed(&gpu(&gu, &[t, 2 * a])).unwrap();
    check("silu_mul_packed", &got, &ops::silu_mul_packed(&cpu(&gu, &[t, 2 * a])).unwrap());
    let (p, q) = (randn(&mut r, 3 * a, 1.0), randn(&mut r, 5 * a, 1.0));
    let stacked = Tensor::concat_rows(&[&gpu(&p, &[3, a]), &gpu(&q, &[5, a])]).unwrap();
    assert_eq!(stacked.to_vec_f32().unwrap(), [p, q].concat(), "concat_rows");

    let rows: Vec<u32> = vec![36, 0, 5, 5, 20];
    let x = randn(&mut r, 37 * h, 1.0);
    let got = ops::gather_rows(&gpu(&x, &[37, h]), &rows).unwrap();
    check("gather_rows", &got, &ops::gather_rows(&cpu(&x, &[37, h]), &rows).unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn add_rows_scaled_matches_cpu() {
    let mut r = rng("add_rows_scaled");
    let (n, cols, col0, w) = (40, 96, 17, 48);
    let y = randn(&mut r, n * cols, 1.0);
    let rows: Vec<u32> = (0..n as u32).filter(|i| i % 3 != 1).collect();
    let d = randn(&mut r, rows.len() * w, 1.0);
    let mut got = gpu(&y, &[n, cols]);
    ops::add_rows_scaled(&mut got, &rows, col0, &gpu(&d, &[rows.len(), w]), 0.5).unwrap();
    let mut want = cpu(&y, &[n, cols]);
    ops::add_rows_scaled(&mut want, &rows, col0, &cpu(&d, &[rows.len(), w]), 0.5).unwrap();
    check("add_rows_scaled", &got, &want);
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn add_lora_matches_cpu() {
    let mut r = rng("add_lora");
    let (n, x_cols, y_cols) = (24, 64, 96);
    let x = randn(&mut r, n * x_cols, 1.0);
    let y = randn(&mut r, n * y_cols, 1.0);
    let (a1, b1) = (randn(&mut r, 16 * x_cols, 0.1), randn(&mut r, 48 * 16, 0.1));
    let (a2, b2) = (randn(&mut r, 8 * x_cols, 0.1), randn(&mut r, 40 * 8, 0.1));
    let (rows1, rows2): (Vec<u32>, Vec<u32>) = (0..n as u32).partition(|i| i % 2 == 0);
    let run = |dev: fn(&[f32], &[usize]) -> Tensor| {
        let (ta1, tb1, ta2, tb2) =
            (dev(&a1, &[16, x_cols]), dev(&b1, &[48, 16]), dev(&a2, &[8, x_cols]), dev(&b2, &[40, 8]));
        let jobs = [
            ops::LoraJob { rows: &rows1, col0: 0, a: &ta1, b: &tb1, scale: 2.0 },
            ops::LoraJob { rows: &rows2, col0: 50, a: &ta2, b: &tb2, scale: 0.5 },
        ];
        let mut out = dev(&y, &[n, y_cols]);
        ops::add_lora(&mut out, &dev(&x, &[n, x_cols]), &jobs).unwrap();
        out
    };
    check("add_lora", &run(gpu), &run(cpu));
}

/// A mixed batch: decodes with long contexts (over the decode kernel's 2048-key chunk), prefill chunks
/// that start mid-sequence and fresh prompts, with GQA and shuffled block tables; with and without a
/// sliding window.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn paged_attention_matches_cpu_on_mixed_batches() {
    let mut r = rng("attention");
    for (nh, nkv, hd, window) in [(32, 8, 128, None), (8, 8, 64, Some(100)), (12, 4, 16, None), (4, 1, 256, Some(7))] {
        let bs = 16;
        // (cached positions before this step, new tokens)
        let shapes = [(1500usize, 1usize), (0, 40), (77, 1), (300, 19), (0, 1), (4500, 1), (5, 64)];
        let blocks_per: Vec<usize> = shapes.iter().map(|(p, q)| (p + q).div_ceil(bs)).collect();
        let total_blocks: usize = blocks_per.iter().sum::<usize>() + 3;
        let mut ids: Vec<u32> = (0..total_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, r.random_range(0..=i));
        }
        let mut tables = Vec::new();
        let mut next = 0;
        for &n in &blocks_per {
            tables.push(ids[next..next + n].to_vec());
            next += n;
        }
        let cache_shape = [total_blocks, bs, nkv, hd];
        let kv_n = total_blocks * bs * nkv * hd;
        let (kc, vc) = (randn(&mut r, kv_n, 1.0), randn(&mut r, kv_n, 1.0));
        let rows: usize = shapes.iter().map(|s| s.1).sum();
        let q = randn(&mut r, rows * nh * hd, 1.0);
        let mut seqs = Vec::new();
        let mut row = 0;
        for (i, &(pos0, q_len)) in shapes.iter().enumerate() {
            seqs.push(AttentionSeq { q_start: row, q_len, pos0, block_table: &tables[i] });
            row += q_len;
        }
        let shape = AttentionShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
            scale: 1.0 / (hd as f32).sqrt(),
            sliding_window: window,
        };
        let want = ops::paged_attention(
            &cpu(&q, &[rows, nh, hd]),
            &cpu(&kc, &cache_shape),
            &cpu(&vc, &cache_shape),
            &seqs,
            &shape,
        )
        .unwrap();
        poison_next(rows * nh * hd, DType::BF16);
        let got = ops::paged_attention(
            &gpu(&q, &[rows, nh, hd]),
            &gpu(&kc, &cache_shape),
            &gpu(&vc, &cache_shape),
            &seqs,
            &shape,
        )
        .unwrap();
        check(&format!("paged_attention nh={nh} nkv={nkv} hd={hd} window={window:?}"), &got, &want);

        // Writing new keys and values lands them at the right slots and nowhere else.
        let slots: Vec<usize> = (0..rows)
            .map(|i| (i * 7919) % (total_blocks * bs))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let t = slots.len();
        let (k, v) = (randn(&mut r, t * nkv * hd, 1.0), randn(&mut r, t * nkv * hd, 1.0));
        let (mut kc_cpu, mut vc_cpu) = (cpu(&kc, &cache_shape), cpu(&vc, &cache_shape));
        ops::write_kv_cache(&cpu(&k, &[t, nkv, hd]), &cpu(&v, &[t, nkv, hd]), &mut kc_cpu, &mut vc_cpu, &slots)
            .unwrap();
        let (mut kc_gpu, mut vc_gpu) = (gpu(&kc, &cache_shape), gpu(&vc, &cache_shape));
        ops::write_kv_cache(&gpu(&k, &[t, nkv, hd]), &gpu(&v, &[t, nkv, hd]), &mut kc_gpu, &mut vc_gpu, &slots)
            .unwrap();
        assert_eq!(kc_gpu.to_vec_f32().unwrap(), kc_cpu.to_vec_f32().unwrap(), "k cache after write");
        assert_eq!(vc_gpu.to_vec_f32().unwrap(), vc_cpu.to_vec_f32().unwrap(), "v cache after write");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn argmax_and_sampling_match_the_cpu_definition() {
    let mut r = rng("sampling");
    let (rows, vocab) = (24, 50_000);
    let logits: Vec<f32> = (0..rows * vocab).map(|_| r.random_range(-8.0f32..8.0)).collect();
    let (lc, lg) = (cpu(&logits, &[rows, vocab]), cpu(&logits, &[rows, vocab]).to_device(GPU).unwrap());
    assert_eq!(lg.dtype(), DType::F32);
    assert_eq!(ops::argmax_rows(&lg).unwrap(), ops::argmax_rows(&lc).unwrap());

    let params: Vec<RowSampling> = (0..rows)
        .map(|i| RowSampling {
            temperature: [0.5, 1.0, 1.7][i % 3],
            top_k: [0, 1, 40, 1000][i % 4],
            top_p: [1.0, 0.9, 0.5, 0.05][(i / 4) % 4],
            uniform: r.random_range(0.0..1.0),
        })
        .collect();
    let got = ops::sample_rows(&lg, &params).unwrap();
    for (i, (p, &tok)) in params.iter().zip(&got).enumerate() {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let thr = tessera_kernels::cpu::sampling::keep_threshold(row, p.temperature, p.top_k, p.top_p);
        assert!(row[tok as usize] >= thr, "row {i} {p:?}: token {tok} is outside the kept set");
        // The draw: the kept mass before the token, over the total, brackets the uniform.
        let lmax = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w = |l: f32| (((l - lmax) / p.temperature) as f64).exp();
        let kept = |j: usize| row[j] >= thr;
        let total: f64 = (0..vocab).filter(|&j| kept(j)).map(|j| w(row[j])).sum();
        let before: f64 = (0..tok as usize).filter(|&j| kept(j)).map(|j| w(row[j])).sum();
        let (lo, hi) = (before / total, (before + w(row[tok as usize])) / total);
        let u = p.uniform as f64;
        assert!(lo - 1e-4 <= u && u <= hi + 1e-4, "row {i} {p:?}: token {tok} covers [{lo}, {hi}), uniform {u}");
        if p.top_k == 1 {
            assert_eq!(tok, tessera_kernels::cpu::sampling::argmax(row));
        }
    }
}

/// NCCL loads, makes an id and runs its collectives in a group of one (one GPU cannot host two ranks:
/// NCCL refuses that, which is why the coordinator falls back to TCP there).
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn nccl_group_of_one_reduces_and_gathers() {
    use tessera_kernels::cuda::nccl::{ID_BYTES, NcclComm, nccl_available, new_unique_id};
    assert!(nccl_available(), "libnccl.so cannot be loaded (LD_LIBRARY_PATH)");
    let mut r = rng("nccl");
    let id = new_unique_id(GPU).unwrap();
    assert_eq!(id.len(), ID_BYTES);
    let comm = NcclComm::new(GPU, 0, 1, &id).unwrap();
    let x = randn(&mut r, 4096, 2.0);
    let mut t = gpu(&x, &[64, 64]);
    comm.all_reduce_sum(&mut t).unwrap();
    assert_eq!(t.to_vec_f32().unwrap(), x, "a sum over one rank is the input");
    let mut f = cpu(&x, &[4096]).to_device(GPU).unwrap();
    comm.all_reduce_sum(&mut f).unwrap();
    assert_eq!(f.to_vec_f32().unwrap(), x);
    assert_eq!(comm.all_gather(&x[..100]).unwrap(), x[..100]);
    assert!(NcclComm::new(GPU, 0, 1, &id[..10]).is_err(), "a short id is an error, not a panic");
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn a_tensor_dropped_on_another_thread_leaves_the_device_usable() {
    let mut r = rng("drop_elsewhere");
    let data = randn(&mut r, 4096, 1.0);
    let t = gpu(&data, &[64, 64]);
    // A thread that never touched the device frees the memory (the engine loop dropping the logits a
    // pool thread computed did exactly this, and the next step failed with an invalid context).
    std::thread::spawn(move || drop(t)).join().unwrap();
    let again = gpu(&data, &[64, 64]);
    assert_eq!(ops::count_nonfinite(&again).unwrap(), 0);
    assert_eq!(again.to_vec_f32().unwrap(), data, "the values are bf16-exact, so the round trip is too");
}

/// Every block format the device runs as its blocks (`cuda/quant.cu`).
const BLOCK_FORMATS: [GgmlType; 10] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// `rows` × `k` random blocks of `ty` (values about `scale`), on the host.
fn blocks(r: &mut ChaCha8Rng, ty: GgmlType, rows: usize, k: usize, scale: f32) -> Tensor {
    let bytes = random_blocks(ty, rows, k, r.random(), scale).expect("a block format");
    Tensor::from_quant(ty, bytes, &[rows, k]).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn block_formats_decode_on_the_device_as_on_the_cpu_bit_for_bit() {
    let mut r = rng("block_decode");
    for ty in BLOCK_FORMATS {
        let host = blocks(&mut r, ty, 5, 1024, 0.5);
        let dev = host.to_device(GPU).unwrap();
        assert_eq!(dev.dtype(), DType::Quant(ty), "{ty}: the blocks stay blocks on the device");
        let (want, got) = (host.to_vec_f32().unwrap(), dev.to_vec_f32().unwrap());
        assert!(want.iter().any(|v| *v != 0.0), "{ty}: all zeros");
        let differ = want.iter().zip(&got).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{ty}: {differ} decoded values differ from the CPU's");
        let back = dev.to_device(Device::Cpu).unwrap();
        assert_eq!(back.quant_bytes(), host.quant_bytes(), "{ty}: the blocks come back as they went");
        // The embedding lookup decodes the rows it takes, to bf16.
        let ids = [4u32, 0, 2, 2];
        let rows: Vec<f32> = ops::embedding(&ids, &host).unwrap().to_vec_f32().unwrap();
        let rows: Vec<f32> = rows.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
        assert_eq!(ops::embedding(&ids, &dev).unwrap().to_vec_f32().unwrap(), rows, "{ty}: embedding rows");
        // Fused projections stack their matrices as blocks.
        let stacked = Tensor::concat_rows(&[&dev, &dev]).unwrap().to_device(Device::Cpu).unwrap();
        let want = Tensor::concat_rows(&[&host, &host]).unwrap();
        assert_eq!(stacked.quant_bytes(), want.quant_bytes(), "{ty}: stacked blocks");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn projections_of_block_format_weights_match_the_cpu_on_the_decoded_weights() {
    let mut r = rng("block_linear");
    // Up to 32 rows decode in the GEMV kernel, eight rows a pass; more decode bands of weight rows for cuBLAS.
    let mut cases: Vec<(GgmlType, usize, usize, usize)> = Vec::new();
    for ty in BLOCK_FORMATS {
        cases.extend([(ty, 1, 256, 96), (ty, 3, 1024, 130), (ty, 8, 512, 77), (ty, 9, 512, 64), (ty, 40, 2048, 300)]);
    }
    // More than one band (64 MB of bf16 weights each).
    cases.push((GgmlType::Q4_K, 40, 4096, 9000));
    for (ty, m, k, n) in cases {
        let w = blocks(&mut r, ty, n, k, 0.1);
        let decoded = cpu(&w.to_vec_f32().unwrap(), &[n, k]);
        let (x, b) = (randn(&mut r, m * k, 1.0), randn(&mut r, n, 1.0));
        let want = ops::linear(&cpu(&x, &[m, k]), &decoded, Some(&cpu(&b, &[n]))).unwrap();
        let wd = w.to_device(GPU).unwrap();
        for out in [DType::BF16, DType::F32] {
            poison_next(m * n, out);
            let got = ops::linear_to(&gpu(&x, &[m, k]), &wd, Some(&gpu(&b, &[n])), out).unwrap();
            assert_eq!(got.dtype(), out);
            check(&format!("{ty} linear {m}x{k}x{n} -> {out:?}"), &got, &want);
        }
    }
}
