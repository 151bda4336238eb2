//! Attention of new positions against a KV cache, for decoding and chunked prefill.
//!
//! Each head's cache is contiguous. Its keys are stored in blocks of [`KEY_BLOCK`] positions,
//! each block dimension-major, (head size, KEY_BLOCK), 16 KiB in one run: the scores of a
//! block's keys are one vector loop (a fused multiply-add per dimension, the 64 running sums
//! in registers) rather than a dot product and a horizontal sum per key, and a block streams
//! from memory in order. Its values are position-major, (cap, head size), each key's value
//! row added into the output as a vector.
//!
//! One call serves every sequence of a decode step. A task takes one sequence, one head and
//! a block of up to [`ROWS`] query rows, and walks the keys (then the values) once for the
//! whole block, so a long prompt's cache is read from memory once per block rather than once
//! per row. Each row is still computed on its own, in a fixed order (a score is the chain of
//! its dimensions in order, the softmax summed by key, values accumulated by key), so its
//! bits depend neither on the block it falls in, nor on how a prompt is cut into chunks, nor
//! on the other sequences.

use std::cell::RefCell;

use rayon::prelude::*;

use super::SendPtr;
use crate::math;

/// Query rows per task.
const ROWS: usize = 16;
/// The head size the value loop keeps in registers (GPT-2's); others take a general loop
/// with the same sums.
const HS: usize = 64;
/// Positions per block of a key cache, scored together with their running sums in
/// registers (four 16-lane vectors).
pub const KEY_BLOCK: usize = 64;

/// Floats of one layer's key cache for `cap` positions of `c` (all heads): whole blocks.
pub fn key_cache_len(cap: usize, c: usize) -> usize {
    cap.div_ceil(KEY_BLOCK) * KEY_BLOCK * c
}

/// Stores the keys of position `pos` (`row`: c values, heads side by side) in one layer's
/// key cache `k` (of [`key_cache_len`]) for `cap` positions and `nh` heads.
pub fn store_keys(k: &mut [f32], cap: usize, nh: usize, pos: usize, row: &[f32]) {
    let (c, hs) = (row.len(), row.len() / nh);
    assert!(pos < cap && k.len() >= key_cache_len(cap, c), "store_keys: position or size");
    let per_head = key_cache_len(cap, hs);
    let (b, t) = (pos / KEY_BLOCK, pos % KEY_BLOCK);
    for h in 0..nh {
        let block = &mut k[h * per_head + b * hs * KEY_BLOCK..][..hs * KEY_BLOCK];
        for (d, &x) in row[h * hs..(h + 1) * hs].iter().enumerate() {
            block[d * KEY_BLOCK + t] = x;
        }
    }
}

thread_local! {
    /// Scores, then probabilities, of one task: (ROWS, keys).
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One sequence's share of [`attention_cached`]: its new rows are `row0..row0 + rows` of the
/// call's `q` and `out`, at positions `past..past + rows`; `k` and `v` are its cache for
/// this layer, keys as [`store_keys`] writes them and values (heads, cap, head size), with
/// the new positions already written.
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
        assert!(keys <= s.cap && s.k.len() >= key_cache_len(s.cap, c));
        assert!(s.v.len() >= nh * s.cap * hs);
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
        let kh = key_cache_len(s.cap, hs);
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
            let k = &s.k[h * kh..(h + 1) * kh];
            head_block(out, &mut sc[..need], q, k, &s.v[head], g, r0, rn);
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
    /// `k` is this head's keys, blocks of (hs, KEY_BLOCK), and `v` its values, (cap, hs);
    /// `s` is (rn, keys) scratch with keys = past + r0 + rn. These rows' head columns of
    /// `out` are written by this call alone.
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
        // Score (r, j) = scale * (sum over d of q[r, d] * k[d, j], one fused multiply-add per
        // dimension in order), a block of keys at a time, read once for all the rows.
        for j0 in (0..keys).step_by(KEY_BLOCK) {
            let block = &k[j0 * hs..][..hs * KEY_BLOCK];
            for r in 0..rn {
                let n = KEY_BLOCK.min(visible(r).saturating_sub(j0));
                if n == 0 {
                    continue;
                }
                let qr = &q[(r0 + r) * c + off..][..hs];
                let row = &mut s[r * keys + j0..][..n];
                if n == KEY_BLOCK {
                    let mut acc = [0.0f32; KEY_BLOCK];
                    for (kd, &qd) in block.chunks_exact(KEY_BLOCK).zip(qr) {
                        for t in 0..KEY_BLOCK {
                            acc[t] = qd.mul_add(kd[t], acc[t]);
                        }
                    }
                    for (x, a) in row.iter_mut().zip(acc) {
                        *x = a * g.scale;
                    }
                } else {
                    row.fill(0.0);
                    for (kd, &qd) in block.chunks_exact(KEY_BLOCK).zip(qr) {
                        for (x, &kv) in row.iter_mut().zip(kd) {
                            *x = qd.mul_add(kv, *x);
                        }
                    }
                    for x in row.iter_mut() {
                        *x *= g.scale;
                    }
                }
            }
        }
        for r in 0..rn {
            let row = &mut s[r * keys..r * keys + visible(r)];
            let max = math::max(row);
            // Exponentials first (a vector loop), then their sum in lanes: one running sum
            // would chain every add on the last (a long prompt's rows are 1000s of keys).
            for x in row.iter_mut() {
                *x = math::exp(*x - max);
            }
            let sum = math::sum(row);
            for x in row.iter_mut() {
                *x /= sum;
            }
        }
        // SAFETY: rows r0..r0+rn, columns off..off+hs of `out` are this call's alone.
        let o = |r: usize| unsafe {
            std::slice::from_raw_parts_mut(out.get().add((r0 + r) * c + off), hs)
        };
        for r in 0..rn {
            o(r).fill(0.0);
        }
        // Values in the order of the keys, a block of them (from L1) for every row in turn.
        for j0 in (0..keys).step_by(KEY_BLOCK) {
            for r in 0..rn {
                let n = KEY_BLOCK.min(visible(r).saturating_sub(j0));
                if n == 0 {
                    continue;
                }
                let p = &s[r * keys + j0..][..n];
                let vs = v[j0 * hs..].chunks_exact(hs);
                let o = o(r);
                if hs == HS {
                    // The row's sums in registers for the whole block.
                    let mut acc: [f32; HS] = (&*o).try_into().expect("head size");
                    for (&pj, vj) in p.iter().zip(vs) {
                        for (a, &x) in acc.iter_mut().zip(vj) {
                            *a += pj * x;
                        }
                    }
                    o.copy_from_slice(&acc);
                } else {
                    for (&pj, vj) in p.iter().zip(vs) {
                        math::axpy(o, pj, vj);
                    }
                }
            }
        }
    }
}
