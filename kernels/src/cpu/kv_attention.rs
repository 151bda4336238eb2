//! Attention of new positions against a KV cache, for decoding and chunked prefill.
//!
//! The cache is head-major, (heads, cap, head size) per layer, so one head's keys (and
//! values) are one contiguous run that the hardware prefetcher streams; position-major rows
//! would give each head a 256-byte piece of every 3 KiB row instead.
//!
//! One call serves every sequence of a decode step. A task takes one sequence, one head and
//! a block of up to [`ROWS`] query rows, and walks the keys (then the values) once for the
//! whole block, so a long prompt's cache is read from memory once per block rather than once
//! per row. Each row is still computed on its own, in a fixed order (scores by key, softmax
//! summed by key, values accumulated by key), so its bits depend neither on the block it
//! falls in, nor on how a prompt is cut into chunks, nor on the other sequences.

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

/// One sequence's share of [`attention_cached`]: its new rows are `row0..row0 + rows` of the
/// call's `q` and `out`, at positions `past..past + rows`; `k` and `v` are its cache for
/// this layer, (heads, cap, head size), with the new positions already written.
#[derive(Clone, Copy)]
pub struct CachedSeq<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub cap: usize,
    pub past: usize,
    pub row0: usize,
    pub rows: usize,
}

/// Attention of every sequence's new rows against its own KV cache, for decoding: row r of
/// a sequence sits at position `past + r` and sees its keys 0..=past + r. `q` and `out` are
/// (total rows, c), heads side by side in each row.
pub fn attention_cached(out: &mut [f32], q: &[f32], seqs: &[CachedSeq<'_>], c: usize, nh: usize) {
    let hs = c / nh;
    let total: usize = seqs.iter().map(|s| s.row0 + s.rows).max().unwrap_or(0);
    assert!(out.len() >= total * c && q.len() >= total * c);
    for s in seqs {
        let keys = s.past + s.rows;
        assert!(keys <= s.cap && s.k.len() >= nh * s.cap * hs && s.v.len() >= nh * s.cap * hs);
    }
    // (sequence, head, first row of the block) of every task.
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            (0..s.rows.div_ceil(ROWS)).flat_map(move |b| (0..nh).map(move |h| (i, h, b * ROWS)))
        })
        .collect();
    let op = SendPtr(out.as_mut_ptr());
    let scale = 1.0 / (hs as f32).sqrt();
    tasks.into_par_iter().for_each(|(i, h, r0)| {
        let s = &seqs[i];
        let rn = ROWS.min(s.rows - r0);
        let head = h * s.cap * hs..(h + 1) * s.cap * hs;
        let g = Geometry { past: s.past, c, hs, off: h * hs, scale };
        SCORES.with(|cell| {
            let mut sc = cell.borrow_mut();
            let need = rn * (s.past + r0 + rn);
            if sc.len() < need {
                sc.resize(need, 0.0);
            }
            let q = &q[s.row0 * c..(s.row0 + s.rows) * c];
            // SAFETY (of the writes in head_block): head h of rows row0 + r0.. of `out`
            // belong to this task alone.
            let out = SendPtr(unsafe { op.get().add(s.row0 * c) });
            head_block(out, &mut sc[..need], q, &s.k[head.clone()], &s.v[head], g, r0, rn);
        })
    });
}

/// Shapes shared by the tasks of one sequence and head.
#[derive(Clone, Copy)]
struct Geometry {
    past: usize,
    c: usize,
    hs: usize,
    /// The head's first column in a row of `q` and `out`.
    off: usize,
    scale: f32,
}

math::multiversion! {
    /// Rows r0..r0+rn of one head into `out` (rows of c, this head's columns off..off+hs);
    /// `k` and `v` are this head's cache, (cap, hs); `s` is (rn, keys) scratch with keys =
    /// past + r0 + rn. These rows' head columns of `out` are written by this call alone.
    #[allow(clippy::too_many_arguments)]
    fn head_block(
        out: SendPtr,
        s: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: Geometry,
        r0: usize,
        rn: usize,
    ) {
        let (c, hs, off) = (g.c, g.hs, g.off);
        let keys = g.past + r0 + rn;
        // Row r sees keys 0..visible(r).
        let visible = |r: usize| g.past + r0 + r + 1;
        for j in 0..keys {
            let kj = &k[j * hs..][..hs];
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
            // Exponentials first (a vector loop), then their sum in lanes: one running sum
            // would chain every add on the last (a long prompt's rows are 1000s of keys).
            for x in row.iter_mut() {
                *x = math::exp(*x - max);
            }
            sums[r] = math::sum(row);
        }
        // SAFETY: rows r0..r0+rn, columns off..off+hs of `out` are this call's alone.
        let o = |r: usize| unsafe {
            std::slice::from_raw_parts_mut(out.get().add((r0 + r) * c + off), hs)
        };
        for r in 0..rn {
            o(r).fill(0.0);
        }
        for j in 0..keys {
            let vj = &v[j * hs..][..hs];
            for r in 0..rn {
                if j < visible(r) {
                    math::axpy(o(r), s[r * keys + j] / sums[r], vj);
                }
            }
        }
    }
}
