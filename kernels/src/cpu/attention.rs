//! Causal multi-head self-attention with the softmax fused in, tiled as flash attention:
//! query rows go in blocks of [`BLOCK`]; a block's scores against the keys it may see live
//! in a per-thread scratch of BLOCK × t floats (O(t) per row), and only each row's
//! log-sum-exp is saved for backward, which recomputes the probabilities from it. The
//! products inside a block are single-threaded `gemm` calls on strided views of qkv.

use std::cell::RefCell;

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::softmax::{exp_shifted, softmax};
use super::SendPtr;
use crate::math;

/// Longest sequence the CPU kernels accept.
pub const MAX_SEQ_LEN: usize = 8192;
/// Query rows per tile.
const BLOCK: usize = 64;

thread_local! {
    /// Scores / probabilities and their gradient for one tile; grows to BLOCK × t once.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// dst (m,n) [+]= lhs (m,k) @ rhs (k,n) with explicit strides (row, column).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
) {
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Geometry of one (batch, head) pair inside qkv (b,t,3c).
#[derive(Clone, Copy)]
struct Head {
    q: usize, // offset of q[0] of this head; k and v follow at +c, +2c
    c: usize,
    hs: usize,
    row: usize, // 3c: stride between positions
}

impl Head {
    fn new(bi: usize, h: usize, t: usize, c: usize, nh: usize) -> Head {
        let hs = c / nh;
        Head { q: bi * t * 3 * c + h * hs, c, hs, row: 3 * c }
    }
}

/// Scores s (rows × keys) = scale · q[i0..i0+rows] · k[0..keys]^T, masked causally and turned
/// into probabilities with the given (or computed and returned) log-sum-exp per row.
#[allow(clippy::too_many_arguments)]
unsafe fn probs(
    s: &mut [f32],
    qkv: &[f32],
    hd: Head,
    i0: usize,
    rows: usize,
    keys: usize,
    scale: f32,
    lse: &mut [f32],
    compute_lse: bool,
) {
    let base = qkv.as_ptr();
    mm(
        rows,
        keys,
        hd.hs,
        s.as_mut_ptr(),
        keys,
        false,
        base.add(hd.q + i0 * hd.row),
        hd.row,
        1,
        base.add(hd.q + hd.c),
        1,
        hd.row,
        scale,
    );
    for r in 0..rows {
        let visible = i0 + r + 1; // keys 0..=i0+r
        let row = &mut s[r * keys..(r + 1) * keys];
        if compute_lse {
            lse[r] = softmax(&mut row[..visible]);
        } else {
            exp_shifted(&mut row[..visible], lse[r]);
        }
        row[visible..].fill(0.0);
    }
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut v = cell.borrow_mut();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
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
    let scale = 1.0 / ((c / nh) as f32).sqrt();
    let (out_p, lse_p) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    (0..b * nh * t.div_ceil(BLOCK)).into_par_iter().for_each(|job| {
        let (bh, blk) = (job / t.div_ceil(BLOCK), job % t.div_ceil(BLOCK));
        let (bi, h) = (bh / nh, bh % nh);
        let hd = Head::new(bi, h, t, c, nh);
        let i0 = blk * BLOCK;
        let rows = BLOCK.min(t - i0);
        let keys = i0 + rows;
        with_scratch(rows * keys, |s| unsafe {
            // SAFETY: this job owns lse[(bh, i0..i0+rows)] and head h's columns of out rows
            // i0..i0+rows of batch bi; all offsets are inside the asserted lengths.
            let l = std::slice::from_raw_parts_mut(lse_p.get().add(bh * t + i0), rows);
            probs(s, qkv, hd, i0, rows, keys, scale, l, true);
            // out[i0..] (rows × hs) = p (rows × keys) @ v (keys × hs)
            mm(
                rows,
                hd.hs,
                keys,
                out_p.get().add((bi * t + i0) * c + h * hd.hs),
                c,
                false,
                s.as_ptr(),
                keys,
                1,
                qkv.as_ptr().add(hd.q + 2 * c),
                hd.row,
                1,
                1.0,
            );
        });
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
    let scale = 1.0 / ((c / nh) as f32).sqrt();
    let dp = SendPtr(dqkv.as_mut_ptr());
    // dk and dv accumulate over query blocks, so one job owns a whole (batch, head).
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        let hd = Head::new(bi, h, t, c, nh);
        let mut lse_row = [0.0f32; BLOCK];
        // SAFETY: this job owns head h's q, k and v columns of every row of batch bi in
        // dqkv; offsets stay inside the asserted lengths.
        unsafe {
            for ti in 0..t {
                let at = dp.get().add(hd.q + ti * hd.row);
                for part in 0..3 {
                    std::slice::from_raw_parts_mut(at.add(part * c), hd.hs).fill(0.0);
                }
            }
        }
        for i0 in (0..t).step_by(BLOCK) {
            let rows = BLOCK.min(t - i0);
            let keys = i0 + rows;
            lse_row[..rows].copy_from_slice(&lse[bh * t + i0..bh * t + i0 + rows]);
            with_scratch(2 * rows * keys, |scratch| unsafe {
                let (p, dpr) = scratch.split_at_mut(rows * keys);
                probs(p, qkv, hd, i0, rows, keys, scale, &mut lse_row[..rows], false);
                let o_row = (bi * t + i0) * c + h * hd.hs; // dout/out offset of row i0
                let g = dout.as_ptr().add(o_row);
                // dP (rows × keys) = dout (rows × hs) @ v^T (hs × keys)
                mm(
                    rows,
                    keys,
                    hd.hs,
                    dpr.as_mut_ptr(),
                    keys,
                    false,
                    g,
                    c,
                    1,
                    qkv.as_ptr().add(hd.q + 2 * c),
                    1,
                    hd.row,
                    1.0,
                );
                // dS = P ∘ (dP − rowsum(dout ∘ out)) · scale, in place of dP
                for r in 0..rows {
                    let off = o_row + r * c;
                    let d = math::dot(&dout[off..off + hd.hs], &out[off..off + hd.hs]);
                    let (pr, dr) =
                        (&p[r * keys..(r + 1) * keys], &mut dpr[r * keys..(r + 1) * keys]);
                    for (x, &pp) in dr.iter_mut().zip(pr) {
                        *x = pp * (*x - d) * scale;
                    }
                }
                let k = qkv.as_ptr().add(hd.q + hd.c);
                let q = qkv.as_ptr().add(hd.q + i0 * hd.row);
                // dq[i0..] (rows × hs) = dS (rows × keys) @ k (keys × hs)
                mm(
                    rows,
                    hd.hs,
                    keys,
                    dp.get().add(hd.q + i0 * hd.row),
                    hd.row,
                    false,
                    dpr.as_ptr(),
                    keys,
                    1,
                    k,
                    hd.row,
                    1,
                    1.0,
                );
                // dk[..keys] (keys × hs) += dS^T (keys × rows) @ q (rows × hs)
                mm(
                    keys,
                    hd.hs,
                    rows,
                    dp.get().add(hd.q + hd.c),
                    hd.row,
                    true,
                    dpr.as_ptr(),
                    1,
                    keys,
                    q,
                    hd.row,
                    1,
                    1.0,
                );
                // dv[..keys] (keys × hs) += P^T (keys × rows) @ dout (rows × hs)
                mm(
                    keys,
                    hd.hs,
                    rows,
                    dp.get().add(hd.q + 2 * hd.c),
                    hd.row,
                    true,
                    p.as_ptr(),
                    1,
                    keys,
                    g,
                    c,
                    1,
                    1.0,
                );
            });
        }
    });
}
