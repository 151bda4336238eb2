//! Every CPU op against a naive reference, and every backward against finite differences.
//!
//! Finite differences: the loss is L = sum(out * r) for a fixed random r, so dout = r; a
//! sample of input coordinates is nudged by ±eps and the central difference compared with
//! the analytic gradient within `abs + rel * |g|`.

mod common;

use ferrite_kernels::{AdamW, Backend, CpuBackend, WeightLayout, IGNORE_INDEX};

use common::Rng;

fn cpu() -> CpuBackend {
    CpuBackend::new(2).unwrap()
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{name}[{i}]: got {g}, want {w}");
    }
}

fn weighted(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Compares `grad` with central differences of `loss` at up to 40 coordinates of `x`.
fn check_fd(
    name: &str,
    x: &mut [f32],
    grad: &[f32],
    eps: f32,
    tol: f32,
    loss: impl Fn(&[f32]) -> f64,
) {
    let step = (x.len() / 40).max(1);
    for i in (0..x.len()).step_by(step) {
        let orig = x[i];
        x[i] = orig + eps;
        let up = loss(x);
        x[i] = orig - eps;
        let down = loss(x);
        x[i] = orig;
        let num = ((up - down) / (2.0 * eps as f64)) as f32;
        let g = grad[i];
        assert!(
            (g - num).abs() <= tol * (1.0 + num.abs()),
            "{name}[{i}]: analytic {g}, numeric {num}"
        );
    }
}

fn naive_matmul(
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    l: WeightLayout,
    n: usize,
    c: usize,
    oc: usize,
) -> Vec<f32> {
    let mut out = vec![0.0; n * oc];
    for i in 0..n {
        for o in 0..oc {
            let mut s = bias.map_or(0.0, |b| b[o] as f64);
            for k in 0..c {
                let wv = match l {
                    WeightLayout::InOut => w[k * oc + o],
                    WeightLayout::OutIn => w[o * c + k],
                };
                s += inp[i * c + k] as f64 * wv as f64;
            }
            out[i * oc + o] = s as f32;
        }
    }
    out
}

#[test]
fn matmul_forward_matches_naive_in_both_layouts_and_sizes() {
    let be = cpu();
    let mut rng = Rng(7);
    // Shapes that take each path on 2 threads: single call (small), row blocks (96 rows),
    // column blocks (40 rows); each task writes the bias into its own block first.
    let shapes = [(3, 5, 7), (96, 70, 130), (40, 70, 131), (4, 64, 500), (256, 33, 17)];
    for &(n, c, oc) in &shapes {
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            for with_bias in [false, true] {
                let (inp, w, b) = (rng.vec(n * c, 1.0), rng.vec(c * oc, 1.0), rng.vec(oc, 1.0));
                let bias = with_bias.then_some(&b[..]);
                let mut out = vec![f32::NAN; n * oc];
                be.run(|| be.matmul_forward(&mut out, &inp, &w, bias, layout, n, c, oc));
                let want = naive_matmul(&inp, &w, bias, layout, n, c, oc);
                assert_close(&format!("matmul {n}x{c}x{oc} {layout:?}"), &out, &want, 1e-4);
            }
        }
    }
}

#[test]
fn matmul_backward_matches_finite_differences() {
    let be = cpu();
    let mut rng = Rng(11);
    for &(n, c, oc) in &[(6, 9, 5), (96, 70, 130)] {
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let (mut inp, mut w, mut b) =
                (rng.vec(n * c, 1.0), rng.vec(c * oc, 1.0), rng.vec(oc, 1.0));
            let r = rng.vec(n * oc, 1.0);
            let fwd = |inp: &[f32], w: &[f32], b: &[f32]| {
                let mut out = vec![0.0; n * oc];
                be.run(|| be.matmul_forward(&mut out, inp, w, Some(b), layout, n, c, oc));
                weighted(&out, &r)
            };
            let mut dinp = vec![f32::NAN; n * c];
            let (mut dw, mut db) = (vec![0.5; c * oc], vec![0.25; oc]);
            be.run(|| {
                be.matmul_backward(
                    &mut dinp,
                    &mut dw,
                    Some(&mut db),
                    &r,
                    &inp,
                    &w,
                    layout,
                    n,
                    c,
                    oc,
                )
            });
            // dweight and dbias accumulate onto what was there.
            dw.iter_mut().for_each(|x| *x -= 0.5);
            db.iter_mut().for_each(|x| *x -= 0.25);
            let name = format!("matmul {n}x{c}x{oc} {layout:?}");
            let (w0, b0, i0) = (w.clone(), b.clone(), inp.clone());
            check_fd(&format!("{name} dinp"), &mut inp, &dinp, 1e-2, 2e-3, |x| fwd(x, &w0, &b0));
            check_fd(&format!("{name} dw"), &mut w, &dw, 1e-2, 2e-3, |x| fwd(&i0, x, &b0));
            check_fd(&format!("{name} db"), &mut b, &db, 1e-2, 2e-3, |x| fwd(&i0, &w0, x));
        }
    }
}

#[test]
fn layernorm_matches_naive_and_finite_differences() {
    let be = cpu();
    let mut rng = Rng(3);
    let (n, c) = (37, 48);
    let (mut inp, mut w, mut b) = (rng.vec(n * c, 2.0), rng.vec(c, 1.0), rng.vec(c, 1.0));
    let fwd = |inp: &[f32], w: &[f32], b: &[f32]| {
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        be.run(|| be.layernorm_forward(&mut out, &mut mean, &mut rstd, inp, w, b, n, c));
        (out, mean, rstd)
    };
    let (out, mean, rstd) = fwd(&inp, &w, &b);
    let mut want = vec![0.0; n * c];
    for i in 0..n {
        let x = &inp[i * c..(i + 1) * c];
        let m = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
        for j in 0..c {
            want[i * c + j] =
                ((x[j] as f64 - m) / (var + 1e-5).sqrt() * w[j] as f64 + b[j] as f64) as f32;
        }
    }
    assert_close("layernorm out", &out, &want, 1e-5);

    let r = rng.vec(n * c, 1.0);
    let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    be.run(|| be.layernorm_backward(&mut dinp, &mut dw, &mut db, &r, &inp, &w, &mean, &rstd, n, c));
    let (w0, b0, i0) = (w.clone(), b.clone(), inp.clone());
    let loss = |i: &[f32], w: &[f32], b: &[f32]| weighted(&fwd(i, w, b).0, &r);
    check_fd("layernorm dinp", &mut inp, &dinp, 1e-2, 5e-3, |x| loss(x, &w0, &b0));
    check_fd("layernorm dw", &mut w, &dw, 1e-2, 5e-3, |x| loss(&i0, x, &b0));
    check_fd("layernorm db", &mut b, &db, 1e-2, 5e-3, |x| loss(&i0, &w0, x));
}

fn naive_attention(qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) -> Vec<f32> {
    let hs = c / nh;
    let mut out = vec![0.0; b * t * c];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let q = |k: usize| qkv[(bi * t + i) * 3 * c + h * hs + k] as f64;
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kk = |k: usize| qkv[(bi * t + j) * 3 * c + c + h * hs + k] as f64;
                        (0..hs).map(|k| q(k) * kk(k)).sum::<f64>() / (hs as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for k in 0..hs {
                    let mut acc = 0.0;
                    for (j, s) in scores.iter().enumerate() {
                        acc += (s - max).exp() / z
                            * qkv[(bi * t + j) * 3 * c + 2 * c + h * hs + k] as f64;
                    }
                    out[(bi * t + i) * c + h * hs + k] = acc as f32;
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive_softmax_and_finite_differences() {
    let be = cpu();
    let mut rng = Rng(5);
    // One tile, and several tiles of query rows (64 per tile) with a ragged last one.
    for (b, t, c, nh) in [(2, 9, 16, 4), (1, 150, 8, 2)] {
        let mut qkv = rng.vec(b * t * 3 * c, 1.5);
        let fwd = |qkv: &[f32]| {
            let (mut out, mut lse) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
            be.run(|| be.attention_forward(&mut out, &mut lse, qkv, b, t, c, nh));
            (out, lse)
        };
        let (out, lse) = fwd(&qkv);
        assert_close("attention out", &out, &naive_attention(&qkv, b, t, c, nh), 1e-5);
        let r = rng.vec(b * t * c, 1.0);
        let mut dqkv = vec![f32::NAN; qkv.len()];
        be.run(|| be.attention_backward(&mut dqkv, &r, &qkv, &out, &lse, b, t, c, nh));
        check_fd("attention dqkv", &mut qkv, &dqkv, 1e-2, 5e-3, |x| weighted(&fwd(x).0, &r));
    }
}

#[test]
fn attention_is_causal() {
    // Changing a later position's k and v must not change earlier outputs.
    let be = cpu();
    let mut rng = Rng(9);
    let (b, t, c, nh) = (1, 8, 8, 2);
    let qkv = rng.vec(b * t * 3 * c, 1.0);
    let mut later = qkv.clone();
    for x in &mut later[5 * 3 * c..] {
        *x += 1.0;
    }
    let run = |x: &[f32]| {
        let (mut out, mut lse) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
        be.run(|| be.attention_forward(&mut out, &mut lse, x, b, t, c, nh));
        out
    };
    assert_eq!(run(&qkv)[..5 * c], run(&later)[..5 * c]);
}

#[test]
fn gelu_matches_tanh_formula_and_finite_differences() {
    let be = cpu();
    let mut rng = Rng(13);
    let n = 40_000; // above the parallel threshold
    let mut x = rng.vec(n, 4.0);
    let mut out = vec![0.0; n];
    be.run(|| be.gelu_forward(&mut out, &x, n));
    let want: Vec<f32> = x
        .iter()
        .map(|&v| {
            let v = v as f64;
            (0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh()))
                as f32
        })
        .collect();
    assert_close("gelu", &out, &want, 1e-6);
    let r = rng.vec(n, 1.0);
    let mut dx = vec![0.0; n];
    be.run(|| be.gelu_backward(&mut dx, &x, &r, n));
    check_fd("gelu dinp", &mut x, &dx, 1e-2, 2e-3, |x| {
        let mut o = vec![0.0; n];
        be.run(|| be.gelu_forward(&mut o, x, n));
        weighted(&o, &r)
    });
}

#[test]
fn crossentropy_matches_log_softmax_ignores_index_and_finite_differences() {
    let be = cpu();
    let mut rng = Rng(17);
    let (n, v, vp) = (6, 11, 16);
    let mut logits = rng.vec(n * vp, 3.0);
    let targets: Vec<i32> = vec![0, 10, IGNORE_INDEX, 3, 7, IGNORE_INDEX];
    let fwd = |logits: &[f32]| {
        let mut probs = logits.to_vec();
        let mut losses = vec![f32::NAN; n];
        be.run(|| be.crossentropy_forward(&mut losses, &mut probs, &targets, n, v, vp));
        (losses, probs)
    };
    let (losses, probs) = fwd(&logits);
    for i in 0..n {
        let z = &logits[i * vp..i * vp + v];
        let max = z.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = max + z.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        let want =
            if targets[i] == IGNORE_INDEX { 0.0 } else { lse - z[targets[i] as usize] as f64 };
        assert!((losses[i] as f64 - want).abs() < 1e-5, "loss[{i}] {} vs {want}", losses[i]);
        assert!(probs[i * vp + v..(i + 1) * vp].iter().all(|&p| p == 0.0), "padding");
    }
    // Mean loss over counted rows, as the model uses it.
    let counted = targets.iter().filter(|&&t| t != IGNORE_INDEX).count() as f32;
    let mut dlogits = probs.clone();
    be.run(|| be.crossentropy_backward(&mut dlogits, &targets, 1.0 / counted, n, v, vp));
    for (i, &t) in targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            assert!(dlogits[i * vp..(i + 1) * vp].iter().all(|&g| g == 0.0));
        }
    }
    check_fd("crossentropy dlogits", &mut logits, &dlogits, 1e-2, 2e-3, |x| {
        fwd(x).0.iter().map(|&l| l as f64).sum::<f64>() / counted as f64
    });
}

#[test]
fn encoder_matches_lookup_and_finite_differences() {
    let be = cpu();
    let mut rng = Rng(19);
    let (b, t, c, vocab) = (3, 5, 8, 7);
    let tokens: Vec<i32> = vec![1, 2, 1, 0, 6, 6, 6, 3, 2, 1, 0, 0, 5, 4, 1];
    let (mut wte, mut wpe) = (rng.vec(vocab * c, 1.0), rng.vec(t * c, 1.0));
    let fwd = |wte: &[f32], wpe: &[f32]| {
        let mut out = vec![0.0; b * t * c];
        be.run(|| be.encoder_forward(&mut out, &tokens, wte, wpe, b, t, c));
        out
    };
    let out = fwd(&wte, &wpe);
    for bt in 0..b * t {
        for j in 0..c {
            let want = wte[tokens[bt] as usize * c + j] + wpe[(bt % t) * c + j];
            assert_eq!(out[bt * c + j], want);
        }
    }
    let r = rng.vec(b * t * c, 1.0);
    let (mut dwte, mut dwpe) = (vec![0.0; vocab * c], vec![0.0; t * c]);
    be.run(|| be.encoder_backward(&mut dwte, &mut dwpe, &r, &tokens, b, t, c));
    let (e0, p0) = (wte.clone(), wpe.clone());
    check_fd("encoder dwte", &mut wte, &dwte, 1e-2, 1e-3, |x| weighted(&fwd(x, &p0), &r));
    check_fd("encoder dwpe", &mut wpe, &dwpe, 1e-2, 1e-3, |x| weighted(&fwd(&e0, x), &r));
}

#[test]
fn adamw_matches_reference_formula() {
    let be = cpu();
    let mut rng = Rng(23);
    let n = 50_000;
    let mut p = rng.vec(n, 1.0);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let (mut rp, mut rm, mut rv): (Vec<f64>, Vec<f64>, Vec<f64>) =
        (p.iter().map(|&x| x as f64).collect(), vec![0.0; n], vec![0.0; n]);
    for step in 1..=3u64 {
        let g = rng.vec(n, 1.0);
        let hp = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_scale: 0.5,
            step,
        };
        be.run(|| be.adamw(&mut p, &g, &mut m, &mut v, &hp));
        for i in 0..n {
            let gi = g[i] as f64 * 0.5;
            rm[i] = 0.9 * rm[i] + 0.1 * gi;
            rv[i] = 0.99 * rv[i] + 0.01 * gi * gi;
            let mhat = rm[i] / (1.0 - 0.9f64.powi(step as i32));
            let vhat = rv[i] / (1.0 - 0.99f64.powi(step as i32));
            rp[i] -= 1e-2 * (mhat / (vhat.sqrt() + 1e-8) + 0.1 * rp[i]);
        }
    }
    let rp: Vec<f32> = rp.iter().map(|&x| x as f32).collect();
    assert_close("adamw params", &p, &rp, 1e-5);
}

#[test]
fn sum_squares_matches_naive_and_is_identical_across_thread_counts() {
    let mut rng = Rng(29);
    let x = rng.vec(100_003, 1.0);
    let naive: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    let results: Vec<f64> = [1, 2, 3]
        .iter()
        .map(|&th| {
            let be = CpuBackend::new(th).unwrap();
            be.run(|| be.sum_squares(&x))
        })
        .collect();
    assert!((results[0] - naive).abs() < 1e-6 * naive);
    assert!(results.iter().all(|&r| r.to_bits() == results[0].to_bits()));
}

#[test]
fn residual_adds_elementwise() {
    let be = cpu();
    let mut rng = Rng(31);
    let (a, b) = (rng.vec(20_000, 1.0), rng.vec(20_000, 1.0));
    let mut out = vec![0.0; 20_000];
    be.run(|| be.residual_forward(&mut out, &a, &b));
    assert!(out.iter().zip(a.iter().zip(&b)).all(|(o, (x, y))| *o == x + y));
}
