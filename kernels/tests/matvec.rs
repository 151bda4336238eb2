//! The decode linear layers (`cpu::matvec`) against a naive f64 reference at GPT-2 shapes,
//! and their promise: a row's result has the same bits whatever rows it is computed with.

mod common;

use ferrite_kernels::cpu::matvec;

use common::Rng;

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap()
}

fn assert_close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{name}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn packed_in_out_matches_naive_and_a_row_alone_has_the_same_bits() {
    let mut rng = Rng(7);
    // qkv, fc and fc-proj shapes of GPT-2 small, and one with a narrow last panel.
    for (c, oc) in [(768, 2304), (768, 3072), (3072, 768), (100, 150)] {
        let rows = 13;
        let inp = rng.vec(rows * c, 1.0);
        let w = rng.vec(c * oc, 0.05);
        let b = rng.vec(oc, 0.1);
        let mut packed = vec![0.0; c * oc];
        matvec::pack_in_out(&mut packed, &w, c, oc);
        let mut all = vec![0.0; rows * oc];
        pool().install(|| matvec::forward_packed(&mut all, &inp, &packed, Some(&b), rows, c, oc));
        let want: Vec<f64> = (0..rows * oc)
            .map(|e| {
                let (r, j) = (e / oc, e % oc);
                b[j] as f64
                    + (0..c).map(|i| inp[r * c + i] as f64 * w[i * oc + j] as f64).sum::<f64>()
            })
            .collect();
        assert_close(&format!("in_out {c}x{oc}"), &all, &want, 1e-5);
        for r in [0, 5, 12] {
            let mut one = vec![0.0; oc];
            let x = &inp[r * c..(r + 1) * c];
            pool().install(|| matvec::forward_packed(&mut one, x, &packed, Some(&b), 1, c, oc));
            assert_eq!(one, all[r * oc..(r + 1) * oc], "row {r} alone ({c}x{oc})");
        }
    }
}

#[test]
fn an_out_in_matrix_packed_as_its_transpose_is_the_lm_head() {
    // The tied embedding (vocabulary, c) as the LM head: logits = x @ w^T.
    let mut rng = Rng(11);
    for (c, oc) in [(768, 1000), (40, 70)] {
        let rows = 9;
        let inp = rng.vec(rows * c, 1.0);
        let w = rng.vec(oc * c, 0.05);
        let mut packed = vec![0.0; c * oc];
        matvec::pack_out_in(&mut packed, &w, c, oc);
        let mut all = vec![0.0; rows * oc];
        pool().install(|| matvec::forward_packed(&mut all, &inp, &packed, None, rows, c, oc));
        let want: Vec<f64> = (0..rows * oc)
            .map(|e| {
                let (r, j) = (e / oc, e % oc);
                (0..c).map(|i| inp[r * c + i] as f64 * w[j * c + i] as f64).sum::<f64>()
            })
            .collect();
        assert_close(&format!("out_in {c}x{oc}"), &all, &want, 1e-5);
        for r in [0, 4, 8] {
            let mut one = vec![0.0; oc];
            let x = &inp[r * c..(r + 1) * c];
            pool().install(|| matvec::forward_packed(&mut one, x, &packed, None, 1, c, oc));
            assert_eq!(one, all[r * oc..(r + 1) * oc], "row {r} alone ({c}x{oc})");
        }
    }
}
