//! LayerNorm over the last dimension, eps 1e-5 (as GPT-2).

use super::{for_rows, par_ranges, SendPtr};

const EPS: f32 = 1e-5;

/// out (n,c) = (inp - mean) * rstd * weight + bias; saves mean (n) and rstd (n).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    c: usize,
) {
    let (mean_p, rstd_p) = (SendPtr(mean.as_mut_ptr()), SendPtr(rstd.as_mut_ptr()));
    assert!(mean.len() >= n && rstd.len() >= n && inp.len() >= n * c);
    for_rows(&mut out[..n * c], c, |i, o| {
        let x = &inp[i * c..(i + 1) * c];
        let m = x.iter().sum::<f32>() / c as f32;
        let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / c as f32;
        let s = 1.0 / (var + EPS).sqrt();
        for j in 0..c {
            o[j] = (x[j] - m) * s * weight[j] + bias[j];
        }
        // SAFETY: i < n (asserted above), and each row index is visited by one task.
        unsafe {
            *mean_p.get().add(i) = m;
            *rstd_p.get().add(i) = s;
        }
    });
}

/// dinp += ..., dweight += ..., dbias += ...
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    // Rows for dinp: each needs two reductions over its own channels.
    for_rows(&mut dinp[..n * c], c, |i, di| {
        let (x, g) = (&inp[i * c..(i + 1) * c], &dout[i * c..(i + 1) * c]);
        let (m, s) = (mean[i], rstd[i]);
        let mut dnorm_mean = 0.0f32;
        let mut dnorm_norm_mean = 0.0f32;
        for j in 0..c {
            let norm = (x[j] - m) * s;
            let dnorm = weight[j] * g[j];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= c as f32;
        dnorm_norm_mean /= c as f32;
        for j in 0..c {
            let norm = (x[j] - m) * s;
            let dnorm = weight[j] * g[j];
            di[j] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    });
    // Columns for dweight and dbias: sums over rows, each column owned by one task.
    let (dw, db) = (SendPtr(dweight.as_mut_ptr()), SendPtr(dbias.as_mut_ptr()));
    assert!(dweight.len() >= c && dbias.len() >= c);
    par_ranges(c, rayon::current_num_threads(), 16, |cols| {
        for i in 0..n {
            let (x, g) = (&inp[i * c..(i + 1) * c], &dout[i * c..(i + 1) * c]);
            let (m, s) = (mean[i], rstd[i]);
            for j in cols.clone() {
                // SAFETY: j < c (asserted above); column ranges are disjoint between tasks.
                unsafe {
                    *dw.get().add(j) += (x[j] - m) * s * g[j];
                    *db.get().add(j) += g[j];
                }
            }
        }
    });
}
