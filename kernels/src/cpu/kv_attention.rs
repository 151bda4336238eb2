//! Attention of new positions against a KV cache, for decoding and chunked prefill.
//!
//! A task takes one head and a block of up to [`ROWS`] query rows, and walks the keys (then
//! the values) once for the whole block, so a long prompt's cache is read from memory once
//! per block rather than once per row. Each row is still computed on its own, in a fixed
//! order (scores by key, softmax summed by key, values accumulated by key), so its bits do
//! not depend on the block it falls in, nor on how a prompt is cut into chunks.

use std::cell::RefCell;

use rayon::prelude::*;

use super::SendPtr;
use crate::math;

/// Query rows per task.
const ROWS: usize = 16;

thread_local! {
    /// Scores, then probabilities, of one task: (ROWS, keys).
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Attention of `rows` new positions against a KV cache, for decoding: row r of `q` (rows,
/// c) sits at position `past + r` and sees keys 0..=past + r. `k` and `v` are (≥ past + rows,
/// c) with the new positions already written. Writes out (rows, c).
#[allow(clippy::too_many_arguments)]
pub fn attention_cached(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    past: usize,
    rows: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let keys = past + rows;
    assert!(
        out.len() >= rows * c && q.len() >= rows * c && k.len() >= keys * c && v.len() >= keys * c
    );
    let geo = Geometry { past, c, hs, scale: 1.0 / (hs as f32).sqrt() };
    let op = SendPtr(out.as_mut_ptr());
    let blocks = rows.div_ceil(ROWS);
    (0..nh * blocks).into_par_iter().for_each(|job| {
        let (h, b) = (job % nh, job / nh);
        let r0 = b * ROWS;
        let rn = ROWS.min(rows - r0);
        SCORES.with(|cell| {
            let mut s = cell.borrow_mut();
            let need = rn * (past + r0 + rn);
            if s.len() < need {
                s.resize(need, 0.0);
            }
            // Head h of rows r0..r0+rn of `out` belongs to this job alone.
            head_block(op, &mut s[..need], q, k, v, geo, h * hs, r0, rn);
        })
    });
}

/// Shapes shared by every task.
#[derive(Clone, Copy)]
struct Geometry {
    past: usize,
    c: usize,
    hs: usize,
    scale: f32,
}

math::multiversion! {
    /// Rows r0..r0+rn of one head (columns off..off+hs) into `out`; `s` is (rn, keys) scratch
    /// with keys = past + r0 + rn. `out` must be (≥ r0 + rn, c), these rows' head columns
    /// written by this call alone (as `attention_cached` hands them out).
    #[allow(clippy::too_many_arguments)]
    fn head_block(
        out: SendPtr,
        s: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: Geometry,
        off: usize,
        r0: usize,
        rn: usize,
    ) {
        let (c, hs) = (g.c, g.hs);
        let keys = g.past + r0 + rn;
        // Row r sees keys 0..visible(r).
        let visible = |r: usize| g.past + r0 + r + 1;
        for j in 0..keys {
            let kj = &k[j * c + off..][..hs];
            for r in 0..rn {
                if j < visible(r) {
                    let qr = &q[(r0 + r) * c + off..][..hs];
                    s[r * keys + j] = math::dot(qr, kj) * g.scale;
                }
            }
        }
        let mut sums = [0.0f32; ROWS];
        for r in 0..rn {
            let row = &mut s[r * keys..r * keys + visible(r)];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0.0;
            for x in row.iter_mut() {
                *x = math::exp(*x - max);
                sum += *x;
            }
            sums[r] = sum;
        }
        // SAFETY: rows r0..r0+rn, columns off..off+hs of `out` are this call's alone.
        let o = |r: usize| unsafe {
            std::slice::from_raw_parts_mut(out.get().add((r0 + r) * c + off), hs)
        };
        for r in 0..rn {
            o(r).fill(0.0);
        }
        for j in 0..keys {
            let vj = &v[j * c + off..][..hs];
            for r in 0..rn {
                if j < visible(r) {
                    math::axpy(o(r), s[r * keys + j] / sums[r], vj);
                }
            }
        }
    }
}
