//! Linear layers for decoding: few rows (one per active sequence) against a large weight
//! matrix. Each weight is read from memory once per call whatever the number of rows, and
//! every output element is summed in the same order however many rows there are and however
//! they are grouped, so a sequence's result does not depend on what it is batched with.
//! (`gemm` picks kernels by shape, so its bits change with the row count.)
//!
//! Runs on the caller's rayon pool, split over blocks of output columns.

use rayon::prelude::*;

use super::SendPtr;
use crate::math;

/// Output columns per block: four 16-lane vectors.
const NB: usize = 64;
/// Rows per tile: 4 rows x 4 vectors = 16 accumulators.
const RT: usize = 4;
/// Lanes of the dot products of the (out, in) kernel.
const LANES: usize = 16;

/// out (rows, oc) = inp (rows, c) @ w (c, oc) + bias, w row-major (`WeightLayout::InOut`).
///
/// Element (r, j) is `bias[j] + sum_i inp[r,i] * w[i,j]`, accumulated with fused
/// multiply-adds in increasing `i`.
#[allow(clippy::too_many_arguments)]
pub fn forward_in_out(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    c: usize,
    oc: usize,
) {
    assert!(out.len() >= rows * oc && inp.len() >= rows * c && w.len() >= c * oc);
    assert!(bias.is_none_or(|b| b.len() >= oc));
    let op = SendPtr(out.as_mut_ptr());
    (0..oc.div_ceil(NB)).into_par_iter().for_each(|blk| {
        let j0 = blk * NB;
        let nb = NB.min(oc - j0);
        let mut r0 = 0;
        while r0 < rows {
            let rt = RT.min(rows - r0);
            // SAFETY: this task alone writes columns j0..j0+nb of every row.
            let dst = DstTile { ptr: op, ld: oc, r0, j0 };
            if nb == NB {
                match rt {
                    4 => tile4(dst, inp, w, bias, c, oc),
                    _ => tile_any(dst, inp, w, bias, c, oc, rt, nb),
                }
            } else {
                tile_any(dst, inp, w, bias, c, oc, rt, nb);
            }
            r0 += rt;
        }
    });
}

/// Where a tile's results go: rows r0.., columns j0.. of a row-major (_, ld) matrix.
#[derive(Clone, Copy)]
struct DstTile {
    ptr: SendPtr,
    ld: usize,
    r0: usize,
    j0: usize,
}

impl DstTile {
    /// # Safety
    /// The element must be inside the output and written by this tile alone.
    #[inline(always)]
    unsafe fn write(self, r: usize, j: usize, x: f32) {
        unsafe { *self.ptr.get().add((self.r0 + r) * self.ld + self.j0 + j) = x };
    }
}

math::multiversion! {
    /// A full tile: 4 rows by 64 columns.
    fn tile4(dst: DstTile, inp: &[f32], w: &[f32], bias: Option<&[f32]>, c: usize, oc: usize) {
        let mut acc = [[0.0f32; NB]; RT];
        for a in acc.iter_mut() {
            match bias {
                Some(b) => a.copy_from_slice(&b[dst.j0..dst.j0 + NB]),
                None => a.fill(0.0),
            }
        }
        let x: [&[f32]; RT] = std::array::from_fn(|r| &inp[(dst.r0 + r) * c..][..c]);
        for i in 0..c {
            let wr: &[f32; NB] = w[i * oc + dst.j0..][..NB].try_into().expect("block");
            for r in 0..RT {
                let a = x[r][i];
                for j in 0..NB {
                    acc[r][j] = a.mul_add(wr[j], acc[r][j]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (j, &v) in a.iter().enumerate() {
                // SAFETY: see `forward_in_out`.
                unsafe { dst.write(r, j, v) };
            }
        }
    }
}

math::multiversion! {
    /// A partial tile (fewer rows or columns): the same arithmetic in the same order.
    #[allow(clippy::too_many_arguments)]
    fn tile_any(
        dst: DstTile,
        inp: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        c: usize,
        oc: usize,
        rt: usize,
        nb: usize,
    ) {
        let mut acc = [[0.0f32; NB]; RT];
        for a in acc[..rt].iter_mut() {
            match bias {
                Some(b) => a[..nb].copy_from_slice(&b[dst.j0..dst.j0 + nb]),
                None => a.fill(0.0),
            }
        }
        for i in 0..c {
            let wr = &w[i * oc + dst.j0..][..nb];
            for (r, a) in acc[..rt].iter_mut().enumerate() {
                let x = inp[(dst.r0 + r) * c + i];
                for (s, &wv) in a[..nb].iter_mut().zip(wr) {
                    *s = x.mul_add(wv, *s);
                }
            }
        }
        for (r, a) in acc[..rt].iter().enumerate() {
            for (j, &v) in a[..nb].iter().enumerate() {
                // SAFETY: see `forward_in_out`.
                unsafe { dst.write(r, j, v) };
            }
        }
    }
}

/// out (rows, oc) = inp (rows, c) @ w^T for w (oc, c) row-major (`WeightLayout::OutIn`, the
/// tied LM head). Element (r, j) is a 16-lane fused dot product of row r and weight row j.
pub fn forward_out_in(out: &mut [f32], inp: &[f32], w: &[f32], rows: usize, c: usize, oc: usize) {
    assert!(out.len() >= rows * oc && inp.len() >= rows * c && w.len() >= c * oc);
    let op = SendPtr(out.as_mut_ptr());
    const CHUNK: usize = 256;
    (0..oc.div_ceil(CHUNK)).into_par_iter().for_each(|blk| {
        let j0 = blk * CHUNK;
        let j1 = (j0 + CHUNK).min(oc);
        dots_block(op, inp, w, rows, c, oc, j0, j1);
    });
}

math::multiversion! {
    /// Weight rows j0..j1 against every input row, four weight rows at a time so each input
    /// chunk is loaded once for four independent accumulator chains.
    #[allow(clippy::too_many_arguments)]
    fn dots_block(
        op: SendPtr,
        inp: &[f32],
        w: &[f32],
        rows: usize,
        c: usize,
        oc: usize,
        j0: usize,
        j1: usize,
    ) {
        let mut j = j0;
        while j < j1 {
            let n = 4.min(j1 - j);
            let wr: [&[f32]; 4] = std::array::from_fn(|q| &w[(j + q.min(n - 1)) * c..][..c]);
            for r in 0..rows {
                let x = &inp[r * c..][..c];
                let d = dot4(x, wr);
                for (q, &v) in d[..n].iter().enumerate() {
                    // SAFETY: this task alone writes columns j0..j1.
                    unsafe { *op.get().add(r * oc + j + q) = v };
                }
            }
            j += n;
        }
    }
}

/// Four dot products of `x` with `w[q]`, each exactly as a lone 16-lane fused dot product.
#[inline(always)]
fn dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0.0f32; LANES]; 4];
    let full = x.len() - x.len() % LANES;
    let mut i = 0;
    while i < full {
        let xs: &[f32; LANES] = x[i..i + LANES].try_into().expect("chunk");
        for q in 0..4 {
            let ws: &[f32; LANES] = w[q][i..i + LANES].try_into().expect("chunk");
            for l in 0..LANES {
                acc[q][l] = xs[l].mul_add(ws[l], acc[q][l]);
            }
        }
        i += LANES;
    }
    std::array::from_fn(|q| {
        let mut tail = 0.0f32;
        for k in full..x.len() {
            tail = x[k].mul_add(w[q][k], tail);
        }
        acc[q].iter().fold(0.0f32, |s, &a| s + a) + tail
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap()
    }

    #[test]
    fn in_out_matches_naive_and_is_independent_of_row_count() {
        for (c, oc) in [(32, 96), (48, 200), (64, 128)] {
            let rows = 7;
            let (inp, w, b) = (data(rows * c, 1), data(c * oc, 2), data(oc, 3));
            let mut all = vec![0.0; rows * oc];
            pool().install(|| forward_in_out(&mut all, &inp, &w, Some(&b), rows, c, oc));
            for r in 0..rows {
                for j in 0..oc {
                    let want: f64 = b[j] as f64
                        + (0..c).map(|i| inp[r * c + i] as f64 * w[i * oc + j] as f64).sum::<f64>();
                    assert!((all[r * oc + j] as f64 - want).abs() < 1e-4, "({r},{j})");
                }
                let mut one = vec![0.0; oc];
                let x = &inp[r * c..(r + 1) * c];
                pool().install(|| forward_in_out(&mut one, x, &w, Some(&b), 1, c, oc));
                assert_eq!(one, all[r * oc..(r + 1) * oc], "row {r} alone differs (c={c})");
            }
        }
    }

    #[test]
    fn out_in_matches_naive_and_is_independent_of_row_count() {
        let (rows, c, oc) = (5, 40, 70);
        let (inp, w) = (data(rows * c, 4), data(oc * c, 5));
        let mut all = vec![0.0; rows * oc];
        pool().install(|| forward_out_in(&mut all, &inp, &w, rows, c, oc));
        for r in 0..rows {
            for j in 0..oc {
                let want: f64 = (0..c).map(|i| inp[r * c + i] as f64 * w[j * c + i] as f64).sum();
                assert!((all[r * oc + j] as f64 - want).abs() < 1e-4, "({r},{j})");
            }
            let mut one = vec![0.0; oc];
            pool().install(|| forward_out_in(&mut one, &inp[r * c..(r + 1) * c], &w, 1, c, oc));
            assert_eq!(one, all[r * oc..(r + 1) * oc]);
        }
    }
}
