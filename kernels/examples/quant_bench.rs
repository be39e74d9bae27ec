//! The projection on quantized weights alone (`ops::linear` on a block-format matrix), at the 124.7M
//! benchmark shape's two matrix shapes, for every format with CPU kernels of its own and a range of input
//! rows: milliseconds, multiply-adds per second and weight bytes read per second, so a kernel change shows
//! without the rest of a model's step around it.
//!
//! `cargo run --release -p tessera-kernels --example quant_bench [-- FORMAT,... ROWS,... [NxK,...]]`
//! (shapes: weight rows x row length; e.g. `14336x4096` for Llama 3 8B's up projection).

#[path = "common/timing.rs"]
mod timing;

use tessera_kernels::{GgmlType, Tensor, cpu::quant::random::random_blocks, ops};
use timing::time;

fn main() {
    let mut args = std::env::args().skip(1);
    let formats: Vec<GgmlType> = args
        .next()
        .unwrap_or_else(|| "q8_0,q4_0,q4_k,q6_k".into())
        .split(',')
        .map(|f| {
            use GgmlType::*;
            let known = [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K];
            *known.iter().find(|t| t.to_string().eq_ignore_ascii_case(f)).unwrap_or_else(|| panic!("format {f}"))
        })
        .collect();
    let batches: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,8,16,64,512".into())
        .split(',')
        .map(|b| b.parse().unwrap_or_else(|e| panic!("rows {b}: {e}")))
        .collect();
    let shapes: Vec<(usize, usize)> = args
        .next()
        .unwrap_or_else(|| "2048x768,768x2048".into())
        .split(',')
        .map(|s| {
            let (n, k) = s.split_once('x').unwrap_or_else(|| panic!("shape {s}: NxK"));
            (n.parse().unwrap_or_else(|e| panic!("{s}: {e}")), k.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
        })
        .collect();
    println!("{} threads", rayon::current_num_threads());
    println!("{:<8} {:>12} {:>6} {:>10} {:>10} {:>10}", "format", "n x k", "rows", "ms", "GMAC/s", "GB/s");
    for ty in formats {
        // By default the 124.7M shape's MLP up projection and its down projection.
        for &(n, k) in &shapes {
            let bytes = random_blocks(ty, n, k, 7, 0.05).unwrap_or_else(|| panic!("no random blocks of {ty}"));
            let size = bytes.len();
            let w = Tensor::from_quant(ty, bytes, &[n, k]).unwrap();
            for &m in &batches {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 2001) as f32 / 1000.0 - 1.0) * 0.5).collect();
                let x = Tensor::from_f32(x, &[m, k]).unwrap();
                let reps = (200_000_000 / (m * n * k)).clamp(3, 2000);
                let s = time(reps, || {
                    std::hint::black_box(ops::linear(&x, &w, None).unwrap());
                });
                println!(
                    "{:<8} {:>12} {:>6} {:>10.3} {:>10.1} {:>10.1}",
                    ty.to_string(),
                    format!("{n}x{k}"),
                    m,
                    s * 1e3,
                    (m * n * k) as f64 / s / 1e9,
                    size as f64 / s / 1e9
                );
            }
        }
    }
}
