//! The linear layers with `MatmulPrecision::Bf16` (AMX tiles) against a naive product of the
//! operands rounded to bf16 and summed in f64: forward and backward, both weight layouts,
//! edge sizes, any thread count. Skipped, saying so, on CPUs without AMX-BF16.

mod common;

use ferrite_kernels::{Backend, CpuBackend, MatmulPrecision, WeightLayout};

use common::Rng;

/// A backend whose linear layers run in bf16, or None (after saying why) on this CPU.
fn bf16_backend(threads: usize) -> Option<CpuBackend> {
    let mut be = CpuBackend::new(threads).unwrap();
    if be.set_matmul_precision(MatmulPrecision::Bf16) != MatmulPrecision::Bf16 {
        eprintln!("skipped: this CPU has no AMX-BF16 (the bf16 path is compiled, not run)");
        return None;
    }
    Some(be)
}

fn bf16(x: f32) -> f64 {
    half::bf16::from_f32(x).to_f64()
}

/// out (n, oc) = init + a (n, k) @ b (k, oc), a and b read through index functions, in
/// bf16-rounded operands.
fn naive(
    n: usize,
    k: usize,
    oc: usize,
    init: impl Fn(usize, usize) -> f32,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
) -> Vec<f32> {
    let mut out = vec![0.0; n * oc];
    for i in 0..n {
        for o in 0..oc {
            let s: f64 = (0..k).map(|kk| bf16(a(i, kk)) * bf16(b(kk, o))).sum();
            out[i * oc + o] = (init(i, o) as f64 + s) as f32;
        }
    }
    out
}

/// Element (k, o) of the weight as the right operand of inp @ w.
fn w_at(w: &[f32], layout: WeightLayout, c: usize, oc: usize) -> impl Fn(usize, usize) -> f32 + '_ {
    move |kk, o| match layout {
        WeightLayout::InOut => w[kk * oc + o],
        WeightLayout::OutIn => w[o * c + kk],
    }
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // Only the order of the f32 sums differs from the reference.
        assert!((g - w).abs() <= 2e-5 * (1.0 + w.abs()), "{name}[{i}]: got {g}, want {w}");
    }
}

// Whole 32 x 32 blocks, partial blocks and tiles, k shorter than a tile, k not a multiple of
// 32, and k long enough (1600) to be cut in two for L2.
const SHAPES: [(usize, usize, usize); 7] = [
    (3, 5, 7),
    (96, 70, 130),
    (40, 70, 131),
    (4, 64, 500),
    (256, 33, 17),
    (288, 1600, 300),
    (700, 96, 64),
];

#[test]
fn bf16_forward_matches_rounded_naive_product() {
    let Some(be) = bf16_backend(2) else { return };
    let mut rng = Rng(17);
    for &(n, c, oc) in &SHAPES {
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            for with_bias in [false, true] {
                let (inp, w, b) = (rng.vec(n * c, 1.0), rng.vec(c * oc, 1.0), rng.vec(oc, 1.0));
                let bias = with_bias.then_some(&b[..]);
                let mut out = vec![f32::NAN; n * oc];
                be.run(|| be.matmul_forward(&mut out, &inp, &w, bias, layout, n, c, oc));
                let want = naive(
                    n,
                    c,
                    oc,
                    |_, o| bias.map_or(0.0, |b| b[o]),
                    |i, kk| inp[i * c + kk],
                    w_at(&w, layout, c, oc),
                );
                assert_close(&format!("bf16 forward {n}x{c}x{oc} {layout:?}"), &out, &want);
            }
        }
    }
}

#[test]
fn bf16_backward_matches_rounded_naive_products_and_accumulates() {
    let Some(be) = bf16_backend(2) else { return };
    let mut rng = Rng(19);
    for &(n, c, oc) in &SHAPES {
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let (inp, w, dout) = (rng.vec(n * c, 1.0), rng.vec(c * oc, 1.0), rng.vec(n * oc, 1.0));
            let (dw0, db0) = (rng.vec(c * oc, 1.0), rng.vec(oc, 1.0));
            let mut dinp = vec![f32::NAN; n * c];
            let (mut dw, mut db) = (dw0.clone(), db0.clone());
            be.run(|| {
                be.matmul_backward(
                    &mut dinp,
                    &mut dw,
                    Some(&mut db),
                    &dout,
                    &inp,
                    &w,
                    layout,
                    n,
                    c,
                    oc,
                )
            });
            let name = format!("bf16 backward {n}x{c}x{oc} {layout:?}");
            let wk = w_at(&w, layout, c, oc);
            // dinp (n, c) = dout (n, oc) @ w^T (oc, c)
            let want = naive(n, oc, c, |_, _| 0.0, |i, o| dout[i * oc + o], |o, kk| wk(kk, o));
            assert_close(&format!("{name} dinp"), &dinp, &want);
            // dw (c, oc) += inp^T @ dout, compared in w's layout.
            let grad =
                naive(c, n, oc, |_, _| 0.0, |kk, i| inp[i * c + kk], |i, o| dout[i * oc + o]);
            let want: Vec<f32> = (0..c * oc)
                .map(|x| {
                    let (kk, o) = match layout {
                        WeightLayout::InOut => (x / oc, x % oc),
                        WeightLayout::OutIn => (x % c, x / c),
                    };
                    (dw0[x] as f64 + grad[kk * oc + o] as f64) as f32
                })
                .collect();
            assert_close(&format!("{name} dw"), &dw, &want);
            // The bias gradient is a plain f32 sum of dout's columns.
            let want: Vec<f32> =
                (0..oc).map(|o| db0[o] + (0..n).map(|i| dout[i * oc + o]).sum::<f32>()).collect();
            assert_close(&format!("{name} db"), &db, &want);
        }
    }
}

#[test]
fn bf16_products_are_rounded_and_identical_across_thread_counts() {
    let Some(two) = bf16_backend(2) else { return };
    let one = bf16_backend(1).unwrap();
    let f32_be = CpuBackend::new(2).unwrap();
    let mut rng = Rng(23);
    let (n, c, oc) = (256, 768, 320);
    let (inp, w) = (rng.vec(n * c, 1.0), rng.vec(c * oc, 1.0));
    let run = |be: &CpuBackend| {
        let mut out = vec![0.0; n * oc];
        be.run(|| be.matmul_forward(&mut out, &inp, &w, None, WeightLayout::OutIn, n, c, oc));
        out
    };
    let (a, b, exact) = (run(&two), run(&one), run(&f32_be));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "1 vs 2 threads");
    // Rounding the operands moves the products off the f32 ones: the bf16 path ran.
    let differ = a.iter().zip(&exact).filter(|(x, y)| x != y).count();
    assert!(differ > a.len() / 2, "only {differ} of {} outputs differ from f32", a.len());
}
