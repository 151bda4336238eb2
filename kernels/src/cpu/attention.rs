//! Causal multi-head self-attention with the softmax fused in: forward keeps one row of
//! scores at a time (O(t) memory per row) and saves only each row's log-sum-exp; backward
//! recomputes the probabilities from it (as flash attention does).

use super::SendPtr;
use crate::math::{self, axpy, dot};

/// Longest sequence the CPU kernels accept (the score row lives on the stack).
pub const MAX_SEQ_LEN: usize = 8192;

/// Position of head `h`'s slice of the q (part 0), k (1) or v (2) of row (b, t) in qkv.
#[inline]
fn qkv_at(b: usize, t: usize, part: usize, h: usize, tt: usize, c: usize, hs: usize) -> usize {
    (b * tt + t) * 3 * c + part * c + h * hs
}

/// out (b,t,c), lse (b,nh,t) from qkv (b,t,3c).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    assert!(t <= MAX_SEQ_LEN, "sequence length {t} above {MAX_SEQ_LEN}");
    assert!(out.len() >= b * t * c && lse.len() >= b * nh * t && qkv.len() >= b * t * 3 * c);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let (out_p, lse_p) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    use rayon::prelude::*;
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (out_p, lse_p) = (out_p, lse_p);
        let (bi, h) = (bh / nh, bh % nh);
        let mut scores = [0.0f32; MAX_SEQ_LEN];
        for ti in 0..t {
            let q = &qkv[qkv_at(bi, ti, 0, h, t, c, hs)..][..hs];
            let mut max = f32::NEG_INFINITY;
            for (t2, s) in scores[..=ti].iter_mut().enumerate() {
                *s = dot(q, &qkv[qkv_at(bi, t2, 1, h, t, c, hs)..][..hs]) * scale;
                max = max.max(*s);
            }
            let mut sum = 0.0f32;
            for s in scores[..=ti].iter_mut() {
                *s = math::exp(*s - max);
                sum += *s;
            }
            // SAFETY: row (bi, ti), columns of head h: written by this task only.
            let o = unsafe { std::slice::from_raw_parts_mut(out_p.0.add((bi * t + ti) * c + h * hs), hs) };
            o.fill(0.0);
            let inv = 1.0 / sum;
            for (t2, &p) in scores[..=ti].iter().enumerate() {
                axpy(o, p * inv, &qkv[qkv_at(bi, t2, 2, h, t, c, hs)..][..hs]);
            }
            // SAFETY: index (bi, h, ti) belongs to this task.
            unsafe { *lse_p.0.add(bh * t + ti) = max + sum.ln() };
        }
    });
}

/// dqkv (b,t,3c) is written from dout (b,t,c) and what forward saved.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    assert!(dqkv.len() >= b * t * 3 * c && dout.len() >= b * t * c && out.len() >= b * t * c);
    assert!(lse.len() >= b * nh * t && qkv.len() >= b * t * 3 * c);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let dp = SendPtr(dqkv.as_mut_ptr());
    use rayon::prelude::*;
    (0..b * nh).into_par_iter().for_each(|bh| {
        let dp = dp;
        let (bi, h) = (bh / nh, bh % nh);
        // SAFETY: every slice below is head h's part of a row of batch bi: this task's alone,
        // and the three parts (q, k, v) never overlap.
        let grad = |ti: usize, part: usize| unsafe {
            std::slice::from_raw_parts_mut(dp.0.add(qkv_at(bi, ti, part, h, t, c, hs)), hs)
        };
        for ti in 0..t {
            for part in 0..3 {
                grad(ti, part).fill(0.0);
            }
        }
        for ti in 0..t {
            let q = &qkv[qkv_at(bi, ti, 0, h, t, c, hs)..][..hs];
            let dq = grad(ti, 0);
            let row = (bi * t + ti) * c + h * hs;
            let (g, o) = (&dout[row..row + hs], &out[row..row + hs]);
            let d = dot(g, o);
            let l = lse[bh * t + ti];
            for t2 in 0..=ti {
                let k = &qkv[qkv_at(bi, t2, 1, h, t, c, hs)..][..hs];
                let v = &qkv[qkv_at(bi, t2, 2, h, t, c, hs)..][..hs];
                let p = math::exp(dot(q, k) * scale - l);
                let ds = p * (dot(g, v) - d) * scale;
                axpy(dq, ds, k);
                axpy(grad(t2, 1), ds, q);
                axpy(grad(t2, 2), p, g);
            }
        }
    });
}
