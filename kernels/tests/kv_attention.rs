//! Attention against a KV cache (`cpu::attention_cached`) against a naive f64 reference, and
//! its promise: a row's bits do not depend on how the new positions are cut into calls.

use ferrite_kernels::cpu::{attention_cached, key_cache_len, store_keys, CachedSeq};

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

/// (keys, c) position-major rows as a head-major cache of `cap` positions: values
/// (nh, cap, hs).
fn head_major(x: &[f32], keys: usize, cap: usize, c: usize, nh: usize) -> Vec<f32> {
    let hs = c / nh;
    let mut out = vec![0.0; nh * cap * hs];
    for j in 0..keys {
        for h in 0..nh {
            out[(h * cap + j) * hs..][..hs].copy_from_slice(&x[j * c + h * hs..][..hs]);
        }
    }
    out
}

/// The same keys as the cache stores them (`store_keys`).
fn key_cache(x: &[f32], keys: usize, cap: usize, c: usize, nh: usize) -> Vec<f32> {
    let mut out = vec![0.0; key_cache_len(cap, c)];
    for j in 0..keys {
        store_keys(&mut out, cap, nh, j, &x[j * c..(j + 1) * c]);
    }
    out
}

#[test]
fn cached_attention_matches_naive_and_chunking_keeps_the_bits() {
    // 150 keys: two full blocks of 64 keys and a partial one; heads of 64 (the value sums
    // in registers).
    let (c, nh, past, rows, cap) = (128, 2, 5, 145, 160);
    let hs = c / nh;
    let keys = past + rows;
    let (q, k, v) = (data(rows * c, 1), data(keys * c, 2), data(keys * c, 3));
    let (kc, vc) = (key_cache(&k, keys, cap, c, nh), head_major(&v, keys, cap, c, nh));
    let seq = |past: usize, rows: usize| CachedSeq { k: &kc, v: &vc, cap, past, row0: 0, rows };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut all = vec![0.0; rows * c];
    pool.install(|| attention_cached(&mut all, &q, &[seq(past, rows)], c, nh));
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
    for n in [60, 70, 14, 1] {
        let out = &mut chunked[at * c..(at + n) * c];
        let qs = &q[at * c..(at + n) * c];
        pool.install(|| attention_cached(out, qs, &[seq(past + at, n)], c, nh));
        at += n;
    }
    assert_eq!(chunked, all);
}

#[test]
fn sequences_batched_in_one_call_get_the_bits_they_get_alone() {
    let (c, nh, cap) = (32, 4, 120);
    // (past, new rows) of three sequences with caches of their own.
    let shapes = [(7, 1), (0, 19), (30, 3), (100, 17)];
    let caches: Vec<(Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(p, n))| {
            let keys = p + n;
            let (k, v) = (data(keys * c, 10 + i as u64), data(keys * c, 20 + i as u64));
            (key_cache(&k, keys, cap, c, nh), head_major(&v, keys, cap, c, nh))
        })
        .collect();
    let total: usize = shapes.iter().map(|s| s.1).sum();
    let q = data(total * c, 5);
    let mut row0 = 0;
    let seqs: Vec<CachedSeq<'_>> = shapes
        .iter()
        .zip(&caches)
        .map(|(&(past, rows), (k, v))| {
            let s = CachedSeq { k, v, cap, past, row0, rows };
            row0 += rows;
            s
        })
        .collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut together = vec![0.0; total * c];
    pool.install(|| attention_cached(&mut together, &q, &seqs, c, nh));
    for s in &seqs {
        let rows = s.row0 * c..(s.row0 + s.rows) * c;
        let mut alone = vec![0.0; s.rows * c];
        let one = CachedSeq { row0: 0, ..*s };
        pool.install(|| attention_cached(&mut alone, &q[rows.clone()], &[one], c, nh));
        assert_eq!(alone, together[rows], "sequence at row {}", s.row0);
    }
}
