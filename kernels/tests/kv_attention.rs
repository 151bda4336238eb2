//! Attention against a KV cache (`cpu::attention_cached`) against a naive f64 reference, and
//! its promise: a row's bits do not depend on how the new positions are cut into calls.

use ferrite_kernels::cpu::attention_cached;

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn cached_attention_matches_naive_and_chunking_keeps_the_bits() {
    let (c, nh, past, rows) = (48, 3, 5, 37);
    let hs = c / nh;
    let keys = past + rows;
    let (q, k, v) = (data(rows * c, 1), data(keys * c, 2), data(keys * c, 3));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut all = vec![0.0; rows * c];
    pool.install(|| attention_cached(&mut all, &q, &k, &v, past, rows, c, nh));
    for r in 0..rows {
        for h in 0..nh {
            let vis = past + r + 1;
            let dot = |j: usize| -> f64 {
                (0..hs).map(|d| q[r * c + h * hs + d] as f64 * k[j * c + h * hs + d] as f64).sum()
            };
            let scores: Vec<f64> = (0..vis).map(|j| dot(j) / (hs as f64).sqrt()).collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hs {
                let want: f64 = (0..vis).map(|j| e[j] / sum * v[j * c + h * hs + d] as f64).sum();
                let got = all[r * c + h * hs + d] as f64;
                assert!((got - want).abs() < 1e-5, "row {r} head {h} dim {d}: {got} vs {want}");
            }
        }
    }
    // The same positions fed in three calls (as chunked prefill, then decoding) agree bitwise.
    let mut chunked = vec![0.0; rows * c];
    let mut at = 0;
    for n in [20, 16, 1] {
        let out = &mut chunked[at * c..(at + n) * c];
        let qs = &q[at * c..(at + n) * c];
        pool.install(|| attention_cached(out, qs, &k, &v, past + at, n, c, nh));
        at += n;
    }
    assert_eq!(chunked, all);
}
