//! Every op of the CUDA backend against the CPU backend (the reference), forward and
//! backward, on the same random inputs, within a stated tolerance per op.
//!
//! Needs a GPU: without one (or without libcuda / libnvrtc / libcublas) each test prints
//! `skipping: no CUDA device (…)` and returns, except under `FERRITE_REQUIRE_GPU=1` (set by
//! `scripts/gpu-check.sh`), where a missing device fails the test.
//!
//! Tolerances compare `|gpu - cpu| <= tol * (1 + |cpu|)` per element:
//! - 0 (bit-exact): encoder forward and backward, residual, fill, copies, bias broadcast;
//! - 1e-6: GELU forward, AdamW, cross-entropy backward (same formula; the CPU's own exp and
//!   tanh against CUDA's expf / tanhf);
//! - 1e-5: GELU backward (1 - tanh² cancels near |x| = 5, and its error is scaled by ~x³);
//! - 1e-5: LayerNorm forward, cross-entropy forward, attention forward;
//! - 1e-4: LayerNorm backward, attention backward, matmuls (sums in a different order over
//!   up to a few hundred terms; cuBLAS in f32 mode, TF32 off);
//! - sum_squares: relative 1e-12 (both accumulate in f64), and bitwise equal across calls.
#![cfg(feature = "cuda")]

mod common;

use ferrite_kernels::cuda::CudaBackend;
use ferrite_kernels::{AdamW, Backend, CpuBackend, WeightLayout, IGNORE_INDEX};

use common::Rng;

fn gpu(test: &str) -> Option<CudaBackend> {
    ferrite_kernels::cuda::device_for_test(test)
}

fn cpu() -> CpuBackend {
    CpuBackend::new(2).unwrap()
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() == w.is_finite(), "{name}[{i}]: got {g}, want {w}");
        let err = (g - w).abs() / (1.0 + w.abs());
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let (err, i) = worst;
    eprintln!("{name}: worst relative error {err:.2e} at {i} (tolerance {tol:.0e})");
    assert!(
        err <= tol,
        "{name}[{i}]: got {}, want {} (error {err:.2e} > {tol:.0e})",
        got[i],
        want[i]
    );
}

/// Uploads `host` to a new device buffer.
fn up(g: &CudaBackend, host: &[f32]) -> <CudaBackend as Backend>::Buf {
    let mut b = g.alloc(host.len()).unwrap();
    g.upload(&mut b, host).unwrap();
    b
}

fn down(g: &CudaBackend, buf: &<CudaBackend as Backend>::Buf) -> Vec<f32> {
    let mut out = vec![0.0; g.len(buf)];
    g.download(g.view(buf, 0..out.len()), &mut out).unwrap();
    out
}

fn up_i32(g: &CudaBackend, host: &[i32]) -> <CudaBackend as Backend>::IBuf {
    let mut b = g.alloc_i32(host.len()).unwrap();
    g.upload_i32(&mut b, host).unwrap();
    b
}

/// Full-range views, CPU and GPU.
macro_rules! v {
    ($be:expr, $buf:expr) => {
        $be.view(&$buf, 0..$be.len(&$buf))
    };
}
macro_rules! vm {
    ($be:expr, $buf:expr) => {{
        let n = $be.len(&$buf);
        $be.view_mut(&mut $buf, 0..n)
    }};
}

#[test]
fn copies_views_and_fill_are_exact() {
    let Some(g) = gpu("copies_views_and_fill_are_exact") else { return };
    let mut r = Rng(1);
    let host = r.vec(1000, 3.0);
    let mut buf = up(&g, &host);
    assert_eq!(down(&g, &buf), host);
    g.fill(g.view_mut(&mut buf, 100..200), 0.5);
    let [a, b] = g.split_mut(&mut buf, [0..10, 990..1000]);
    g.fill(a, -1.0);
    g.fill(b, 2.0);
    let mut want = host.clone();
    want[100..200].fill(0.5);
    want[..10].fill(-1.0);
    want[990..].fill(2.0);
    assert_eq!(down(&g, &buf), want);
    let mut part = vec![0.0; 50];
    g.download(g.view(&buf, 400..450), &mut part).unwrap();
    assert_eq!(part, want[400..450]);
    assert!(g.upload(&mut buf, &host[..10]).is_err(), "a short upload is an error");
    assert!(g.name().starts_with("cuda:0"), "{}", g.name());
}

#[test]
fn encoder_forward_and_backward_match_cpu_exactly() {
    let Some(g) = gpu("encoder_forward_and_backward_match_cpu_exactly") else { return };
    let c_be = cpu();
    let (b, t, c, v) = (3, 37, 72, 50);
    let mut r = Rng(2);
    // Repeated tokens, so several positions add into one row of dwte.
    let tokens: Vec<i32> = (0..b * t).map(|_| r.below(v / 5) as i32 * 5).collect();
    let (wte, wpe, dout) = (r.vec(v * c, 1.0), r.vec(t * c, 1.0), r.vec(b * t * c, 1.0));
    let (dwte0, dwpe0) = (r.vec(v * c, 0.1), r.vec(t * c, 0.1)); // gradients accumulate

    let mut out = vec![0.0; b * t * c];
    c_be.encoder_forward(&mut out, &tokens, &wte, &wpe, b, t, c);
    let (mut dwte, mut dwpe) = (dwte0.clone(), dwpe0.clone());
    c_be.encoder_backward(&mut dwte, &mut dwpe, &dout, &tokens, b, t, c);

    let toks = up_i32(&g, &tokens);
    let (gwte, gwpe, gdout) = (up(&g, &wte), up(&g, &wpe), up(&g, &dout));
    let mut gout = g.alloc(b * t * c).unwrap();
    g.encoder_forward(vm!(g, gout), &toks, v!(g, gwte), v!(g, gwpe), b, t, c);
    let (mut gdwte, mut gdwpe) = (up(&g, &dwte0), up(&g, &dwpe0));
    g.encoder_backward(vm!(g, gdwte), vm!(g, gdwpe), v!(g, gdout), &toks, b, t, c);
    assert_close("encoder out", &down(&g, &gout), &out, 0.0);
    assert_close("encoder dwte", &down(&g, &gdwte), &dwte, 0.0);
    assert_close("encoder dwpe", &down(&g, &gdwpe), &dwpe, 0.0);
}

#[test]
fn layernorm_forward_and_backward_match_cpu() {
    let Some(g) = gpu("layernorm_forward_and_backward_match_cpu") else { return };
    let c_be = cpu();
    for (n, c) in [(67, 768), (5, 100), (130, 32)] {
        let mut r = Rng(3 + n as u64);
        let inp: Vec<f32> = r.vec(n * c, 2.0).iter().map(|x| x + 0.5).collect();
        let (w, bias, dout) = (r.vec(c, 1.0), r.vec(c, 0.5), r.vec(n * c, 1.0));
        let (dinp0, dw0, db0) = (r.vec(n * c, 0.1), r.vec(c, 0.1), r.vec(c, 0.1));
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        c_be.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &bias, n, c);
        let (mut dinp, mut dw, mut db) = (dinp0.clone(), dw0.clone(), db0.clone());
        c_be.layernorm_backward(&mut dinp, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, n, c);

        let (gi, gw, gb, gd) = (up(&g, &inp), up(&g, &w), up(&g, &bias), up(&g, &dout));
        let (mut go, mut gm, mut gr) =
            (g.alloc(n * c).unwrap(), g.alloc(n).unwrap(), g.alloc(n).unwrap());
        g.layernorm_forward(
            vm!(g, go),
            vm!(g, gm),
            vm!(g, gr),
            v!(g, gi),
            v!(g, gw),
            v!(g, gb),
            n,
            c,
        );
        let (mut gdi, mut gdw, mut gdb) = (up(&g, &dinp0), up(&g, &dw0), up(&g, &db0));
        g.layernorm_backward(
            vm!(g, gdi),
            vm!(g, gdw),
            vm!(g, gdb),
            v!(g, gd),
            v!(g, gi),
            v!(g, gw),
            v!(g, gm),
            v!(g, gr),
            n,
            c,
        );
        assert_close(&format!("layernorm out ({n},{c})"), &down(&g, &go), &out, 1e-5);
        assert_close(&format!("layernorm mean ({n},{c})"), &down(&g, &gm), &mean, 1e-5);
        assert_close(&format!("layernorm rstd ({n},{c})"), &down(&g, &gr), &rstd, 1e-5);
        assert_close(&format!("layernorm dinp ({n},{c})"), &down(&g, &gdi), &dinp, 1e-4);
        assert_close(&format!("layernorm dweight ({n},{c})"), &down(&g, &gdw), &dw, 1e-4);
        assert_close(&format!("layernorm dbias ({n},{c})"), &down(&g, &gdb), &db, 1e-4);
    }
}

#[test]
fn matmul_forward_and_backward_match_cpu_in_both_layouts() {
    let Some(g) = gpu("matmul_forward_and_backward_match_cpu_in_both_layouts") else { return };
    let c_be = cpu();
    for (layout, bias, n, c, oc) in [
        (WeightLayout::InOut, true, 70, 96, 288),
        (WeightLayout::InOut, false, 33, 200, 40),
        (WeightLayout::OutIn, false, 50, 64, 192),
        (WeightLayout::OutIn, true, 17, 48, 130),
    ] {
        let name = format!("matmul {layout:?} bias={bias} ({n},{c},{oc})");
        let mut r = Rng(5 + n as u64);
        let (inp, w, bv, dout) =
            (r.vec(n * c, 1.0), r.vec(c * oc, 0.2), r.vec(oc, 1.0), r.vec(n * oc, 1.0));
        let (dw0, db0) = (r.vec(c * oc, 0.1), r.vec(oc, 0.1));
        let mut out = vec![0.0; n * oc];
        c_be.matmul_forward(&mut out, &inp, &w, bias.then_some(&bv[..]), layout, n, c, oc);
        let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], dw0.clone(), db0.clone());
        c_be.matmul_backward(
            &mut dinp,
            &mut dw,
            bias.then_some(&mut db[..]),
            &dout,
            &inp,
            &w,
            layout,
            n,
            c,
            oc,
        );

        let (gi, gw, gbv, gd) = (up(&g, &inp), up(&g, &w), up(&g, &bv), up(&g, &dout));
        let mut go = g.alloc(n * oc).unwrap();
        g.matmul_forward(
            vm!(g, go),
            v!(g, gi),
            v!(g, gw),
            bias.then(|| v!(g, gbv)),
            layout,
            n,
            c,
            oc,
        );
        let (mut gdi, mut gdw, mut gdb) = (up(&g, &r.vec(n * c, 9.0)), up(&g, &dw0), up(&g, &db0));
        g.matmul_backward(
            vm!(g, gdi),
            vm!(g, gdw),
            if bias { Some(vm!(g, gdb)) } else { None },
            v!(g, gd),
            v!(g, gi),
            v!(g, gw),
            layout,
            n,
            c,
            oc,
        );
        assert_close(&format!("{name} out"), &down(&g, &go), &out, 1e-4);
        assert_close(&format!("{name} dinp (written)"), &down(&g, &gdi), &dinp, 1e-4);
        assert_close(&format!("{name} dweight"), &down(&g, &gdw), &dw, 1e-4);
        assert_close(&format!("{name} dbias"), &down(&g, &gdb), &db, 1e-4);
    }
}

#[test]
fn attention_forward_and_backward_match_cpu() {
    let Some(g) = gpu("attention_forward_and_backward_match_cpu") else { return };
    let c_be = cpu();
    // Head sizes 64 (GPT-2), 128 (the kernel's maximum), 48 (not a multiple of 32); sequence
    // lengths that are not multiples of any tile.
    for (b, t, c, nh) in [(2, 77, 256, 4), (1, 130, 256, 2), (3, 33, 96, 2), (1, 1, 64, 1)] {
        let name = format!("attention (b{b} t{t} c{c} nh{nh})");
        let mut r = Rng(7 + t as u64);
        let qkv = r.vec(b * t * 3 * c, 1.0);
        let dout = r.vec(b * t * c, 1.0);
        let (mut out, mut lse) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
        c_be.attention_forward(&mut out, &mut lse, &qkv, b, t, c, nh);
        let mut dqkv = vec![0.0; b * t * 3 * c];
        c_be.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, b, t, c, nh);

        let (gq, gd) = (up(&g, &qkv), up(&g, &dout));
        let (mut go, mut gl) = (g.alloc(b * t * c).unwrap(), g.alloc(b * nh * t).unwrap());
        g.attention_forward(vm!(g, go), vm!(g, gl), v!(g, gq), b, t, c, nh);
        // Stale values in dqkv must not leak: backward writes every element.
        let mut gdq = up(&g, &r.vec(b * t * 3 * c, 5.0));
        g.attention_backward(vm!(g, gdq), v!(g, gd), v!(g, gq), v!(g, go), v!(g, gl), b, t, c, nh);
        assert_close(&format!("{name} out"), &down(&g, &go), &out, 1e-5);
        assert_close(&format!("{name} lse"), &down(&g, &gl), &lse, 1e-5);
        assert_close(&format!("{name} dqkv"), &down(&g, &gdq), &dqkv, 1e-4);
    }
}

#[test]
fn attention_with_too_large_heads_is_an_error_not_a_crash() {
    let Some(g) = gpu("attention_with_too_large_heads_is_an_error_not_a_crash") else { return };
    let (b, t, c, nh) = (1, 4, 512, 2); // head size 256 > ATT_HS_MAX
    let gq = up(&g, &vec![0.0; b * t * 3 * c]);
    let (mut go, mut gl) = (g.alloc(b * t * c).unwrap(), g.alloc(b * nh * t).unwrap());
    g.attention_forward(vm!(g, go), vm!(g, gl), v!(g, gq), b, t, c, nh);
    let err = g.check().expect_err("head size 256 must be refused");
    assert!(err.to_string().contains("head size"), "{err}");
    let mut host = vec![0.0; 4];
    assert!(g.download(g.view(&go, 0..4), &mut host).is_err(), "the error is sticky");
}

#[test]
fn gelu_and_residual_match_cpu() {
    let Some(g) = gpu("gelu_and_residual_match_cpu") else { return };
    let c_be = cpu();
    let n = 100_003;
    let mut r = Rng(11);
    let (x, dout, y) = (r.vec(n, 6.0), r.vec(n, 1.0), r.vec(n, 1.0));
    let (mut out, mut dinp, mut sum) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    c_be.gelu_forward(&mut out, &x, n);
    c_be.gelu_backward(&mut dinp, &x, &dout, n);
    c_be.residual_forward(&mut sum, &x, &y);
    let (gx, gd, gy) = (up(&g, &x), up(&g, &dout), up(&g, &y));
    let (mut go, mut gdi, mut gs) = (g.alloc(n).unwrap(), g.alloc(n).unwrap(), g.alloc(n).unwrap());
    g.gelu_forward(vm!(g, go), v!(g, gx), n);
    g.gelu_backward(vm!(g, gdi), v!(g, gx), v!(g, gd), n);
    g.residual_forward(vm!(g, gs), v!(g, gx), v!(g, gy));
    assert_close("gelu out", &down(&g, &go), &out, 1e-6);
    assert_close("gelu dinp", &down(&g, &gdi), &dinp, 1e-5);
    assert_close("residual out", &down(&g, &gs), &sum, 0.0);
}

#[test]
fn crossentropy_forward_and_backward_match_cpu() {
    let Some(g) = gpu("crossentropy_forward_and_backward_match_cpu") else { return };
    let c_be = cpu();
    let (n, v, vp) = (45, 1000, 1024);
    let mut r = Rng(13);
    let logits = r.vec(n * vp, 8.0);
    let mut targets: Vec<i32> = (0..n).map(|_| r.below(v) as i32).collect();
    targets[3] = IGNORE_INDEX;
    targets[20] = IGNORE_INDEX;
    let dloss = 1.0 / 43.0;
    let (mut losses, mut probs) = (vec![0.0; n], logits.clone());
    c_be.crossentropy_forward(&mut losses, &mut probs, &targets, n, v, vp);
    let probs_fwd = probs.clone();
    c_be.crossentropy_backward(&mut probs, &targets, dloss, n, v, vp);

    let gt = up_i32(&g, &targets);
    let (mut gl, mut gp) = (g.alloc(n).unwrap(), up(&g, &logits));
    g.crossentropy_forward(vm!(g, gl), vm!(g, gp), &gt, n, v, vp);
    assert_close("crossentropy losses", &down(&g, &gl), &losses, 1e-5);
    assert_close("crossentropy probs", &down(&g, &gp), &probs_fwd, 1e-5);
    g.crossentropy_backward(vm!(g, gp), &gt, dloss, n, v, vp);
    assert_close("crossentropy dlogits", &down(&g, &gp), &probs, 1e-6);
}

#[test]
fn sum_squares_matches_cpu_and_is_deterministic() {
    let Some(g) = gpu("sum_squares_matches_cpu_and_is_deterministic") else { return };
    let c_be = cpu();
    let mut r = Rng(17);
    for n in [1, 1000, 3_000_001] {
        let x = r.vec(n, 1.0);
        let want = c_be.sum_squares(&x);
        let gx = up(&g, &x);
        let got = g.sum_squares(v!(g, gx));
        let again = g.sum_squares(v!(g, gx));
        eprintln!("sum_squares n={n}: gpu {got}, cpu {want}");
        assert!(((got - want) / want).abs() < 1e-12, "n={n}: gpu {got}, cpu {want}");
        assert_eq!(got.to_bits(), again.to_bits(), "n={n}: two calls differ");
        let part = g.sum_squares(g.view(&gx, 0..n / 2 + 1));
        let want_part = c_be.sum_squares(&x[..n / 2 + 1]);
        assert!(((part - want_part) / want_part).abs() < 1e-12, "n={n}: a sub-view");
    }
}

#[test]
fn adamw_matches_cpu() {
    let Some(g) = gpu("adamw_matches_cpu") else { return };
    let c_be = cpu();
    let n = 50_001;
    let mut r = Rng(19);
    let (p0, grad) = (r.vec(n, 1.0), r.vec(n, 0.1));
    let m0 = r.vec(n, 0.01);
    let v0: Vec<f32> = r.vec(n, 0.001).iter().map(|x| x.abs()).collect();
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_scale: 0.7,
        step: 7,
    };
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    c_be.adamw(&mut p, &grad, &mut m, &mut v, &hp);
    let (mut gp, gg, mut gm, mut gv) = (up(&g, &p0), up(&g, &grad), up(&g, &m0), up(&g, &v0));
    g.adamw(vm!(g, gp), v!(g, gg), vm!(g, gm), vm!(g, gv), &hp);
    assert_close("adamw params", &down(&g, &gp), &p, 1e-6);
    assert_close("adamw m", &down(&g, &gm), &m, 1e-6);
    assert_close("adamw v", &down(&g, &gv), &v, 1e-6);
}

/// Run twice on the same inputs, the backward kernels that reduce over rows (no atomics)
/// give the same bits.
#[test]
fn reductions_are_deterministic_on_the_gpu() {
    let Some(g) = gpu("reductions_are_deterministic_on_the_gpu") else { return };
    let (n, c) = (4096, 768);
    let mut r = Rng(23);
    let (inp, dout, w) = (r.vec(n * c, 1.0), r.vec(n * c, 1.0), r.vec(c, 1.0));
    let (gi, gd, gw) = (up(&g, &inp), up(&g, &dout), up(&g, &w));
    let (mut gm, mut gr, mut go) =
        (g.alloc(n).unwrap(), g.alloc(n).unwrap(), g.alloc(n * c).unwrap());
    g.layernorm_forward(vm!(g, go), vm!(g, gm), vm!(g, gr), v!(g, gi), v!(g, gw), v!(g, gw), n, c);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (mut di, mut dw, mut db) =
            (g.alloc(n * c).unwrap(), g.alloc(c).unwrap(), g.alloc(c).unwrap());
        g.layernorm_backward(
            vm!(g, di),
            vm!(g, dw),
            vm!(g, db),
            v!(g, gd),
            v!(g, gi),
            v!(g, gw),
            v!(g, gm),
            v!(g, gr),
            n,
            c,
        );
        // dbias: column sums over 4096 rows (bias.cu), dweight through cuBLAS.
        let k = 8;
        let (mut mdi, mut mdw, mut mdb) =
            (g.alloc(n * k).unwrap(), g.alloc(k * c).unwrap(), g.alloc(c).unwrap());
        g.matmul_backward(
            vm!(g, mdi),
            vm!(g, mdw),
            Some(vm!(g, mdb)),
            v!(g, gd),
            g.view(&gi, 0..n * k),
            g.view(&gi, 0..k * c),
            WeightLayout::InOut,
            n,
            k,
            c,
        );
        runs.push((down(&g, &dw), down(&g, &db), down(&g, &mdb), down(&g, &mdw)));
    }
    assert!(runs[0] == runs[1], "two identical backward passes differ");
}
