//! Prefill-sized linear layer: the decode kernel (`matvec::forward_packed`, fixed summation
//! order) against the training backend's `gemm` matmul, GFLOP/s, back to back.
//!
//!     cargo run --release -p ferrite-inference --example bench_linear -- [rows] [c] [oc]

use std::time::Instant;

use ferrite_kernels::cpu::matvec;
use ferrite_kernels::{Backend, CpuBackend, WeightLayout};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    let (rows, c, oc) = (
        args.first().copied().unwrap_or(512),
        args.get(1).copied().unwrap_or(768),
        args.get(2).copied().unwrap_or(3072),
    );
    let be = CpuBackend::new(2).unwrap();
    let inp: Vec<f32> = (0..rows * c).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    let w: Vec<f32> = (0..c * oc).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let mut packed = vec![0.0; c * oc];
    matvec::pack_in_out(&mut packed, &w, c, oc);
    let mut out = vec![0.0f32; rows * oc];
    let flop = 2.0 * (rows * c * oc) as f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        for _ in 0..5 {
            be.run(|| matvec::forward_packed(&mut out, &inp, &packed, None, rows, c, oc));
        }
        let p = flop * 5.0 / t0.elapsed().as_secs_f64() / 1e9;
        let t0 = Instant::now();
        for _ in 0..5 {
            be.run(|| {
                be.matmul_forward(&mut out, &inp, &w, None, WeightLayout::InOut, rows, c, oc)
            });
        }
        let g = flop * 5.0 / t0.elapsed().as_secs_f64() / 1e9;
        println!("rows {rows} c {c} oc {oc}: packed {p:.0} GFLOP/s, gemm {g:.0} GFLOP/s");
    }
}
