//! LayerNorm over the last dimension, eps 1e-5 (as GPT-2). The per-row and per-column
//! loops are `multiversion!` functions, so their reductions run in vector lanes.

use super::{for_rows, par_ranges, SendPtr};
use crate::math;

const EPS: f32 = 1e-5;

math::multiversion! {
    /// o = (x - mean) * rstd * weight + bias for one row; returns (mean, rstd).
    fn forward_row(o: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32]) -> (f32, f32) {
        let c = x.len() as f32;
        let m = math::sum(x) / c;
        let var = math::fold_lanes(x, 0.0, |a, v| a + (v - m) * (v - m), |a, b| a + b) / c;
        let s = 1.0 / (var + EPS).sqrt();
        for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
            *o = (x - m) * s * w + b;
        }
        (m, s)
    }
}

math::multiversion! {
    /// di += the input gradient of one row, from its dout `g`, input `x`, mean and rstd.
    fn backward_row(di: &mut [f32], g: &[f32], x: &[f32], weight: &[f32], m: f32, s: f32) {
        let c = x.len();
        // dnorm = weight * g; two sums over the row, in lanes: Σ dnorm and Σ dnorm * norm.
        let (mut sum_d, mut sum_dn) = ([0.0f32; math::LANES], [0.0f32; math::LANES]);
        let mut add = |w: &[f32], g: &[f32], x: &[f32]| {
            let sums = sum_d.iter_mut().zip(sum_dn.iter_mut());
            for ((sd, sdn), ((&w, &g), &x)) in sums.zip(w.iter().zip(g).zip(x)) {
                let dnorm = w * g;
                *sd += dnorm;
                *sdn += dnorm * (x - m) * s;
            }
        };
        let (wc, gc, xc) = (
            weight.chunks_exact(math::LANES),
            g.chunks_exact(math::LANES),
            x.chunks_exact(math::LANES),
        );
        add(wc.remainder(), gc.remainder(), xc.remainder());
        for ((w, g), x) in wc.zip(gc).zip(xc) {
            add(w, g, x);
        }
        let dnorm_mean = sum_d.iter().sum::<f32>() / c as f32;
        let dnorm_norm_mean = sum_dn.iter().sum::<f32>() / c as f32;
        for (((d, &w), &g), &x) in di.iter_mut().zip(weight).zip(g).zip(x) {
            let norm = (x - m) * s;
            *d += (w * g - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
}

math::multiversion! {
    /// dw += norm * g and db += g over the columns of one row (a slice of them).
    fn param_grads_row(dw: &mut [f32], db: &mut [f32], g: &[f32], x: &[f32], m: f32, s: f32) {
        for (((dw, db), &g), &x) in dw.iter_mut().zip(db.iter_mut()).zip(g).zip(x) {
            *dw += (x - m) * s * g;
            *db += g;
        }
    }
}

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
    assert!(weight.len() >= c && bias.len() >= c);
    for_rows(&mut out[..n * c], c, |i, o| {
        let (m, s) = forward_row(o, &inp[i * c..(i + 1) * c], &weight[..c], &bias[..c]);
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
    assert!(weight.len() >= c && inp.len() >= n * c && dout.len() >= n * c);
    // Rows for dinp: each needs two reductions over its own channels.
    for_rows(&mut dinp[..n * c], c, |i, di| {
        let (x, g) = (&inp[i * c..(i + 1) * c], &dout[i * c..(i + 1) * c]);
        backward_row(di, g, x, &weight[..c], mean[i], rstd[i]);
    });
    // Columns for dweight and dbias: sums over rows, each column owned by one task.
    let (dw, db) = (SendPtr(dweight.as_mut_ptr()), SendPtr(dbias.as_mut_ptr()));
    assert!(dweight.len() >= c && dbias.len() >= c);
    par_ranges(c, rayon::current_num_threads(), 16, |cols| {
        // SAFETY: cols < c (asserted above); column ranges are disjoint between tasks.
        let (dw, db) = unsafe {
            (
                std::slice::from_raw_parts_mut(dw.get().add(cols.start), cols.len()),
                std::slice::from_raw_parts_mut(db.get().add(cols.start), cols.len()),
            )
        };
        for i in 0..n {
            let row = i * c + cols.start..i * c + cols.end;
            param_grads_row(dw, db, &dout[row.clone()], &inp[row], mean[i], rstd[i]);
        }
    });
}
