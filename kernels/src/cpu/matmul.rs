//! Linear layers through the `gemm` crate. Each call is split into one contiguous block of
//! rows (or columns, for short matrices) per thread, and each block runs single-threaded
//! gemm: for the matrix sizes of these models that beats gemm's own threading, and the
//! result depends only on the thread count.

use gemm::{gemm, Parallelism};

use super::amx::{self, Scratch};
use super::{par_ranges, SendPtr};
use crate::WeightLayout;

/// A strided read-only matrix: element (i, j) is at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub(super) struct Mat {
    pub(super) ptr: *const f32,
    pub(super) rs: isize,
    pub(super) cs: isize,
}
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    fn row_major(s: &[f32], cols: usize) -> Mat {
        Mat { ptr: s.as_ptr(), rs: cols as isize, cs: 1 }
    }
    fn col_major(s: &[f32], rows: usize) -> Mat {
        Mat { ptr: s.as_ptr(), rs: 1, cs: rows as isize }
    }
}

/// What dst holds before the product is added to it.
#[derive(Clone, Copy)]
pub(super) enum Init<'a> {
    Zero,
    /// Keep dst's values (gradients accumulate).
    Dst,
    /// Each row starts as this bias (n). Filled by the task that owns the block, so the
    /// copy is parallel and the block is in that core's cache when gemm adds to it.
    Bias(&'a [f32]),
}

/// dst (m,n) (row-major, `ld` columns apart) = init + lhs (m,k) @ rhs (k,n); in bf16
/// products on AMX tiles when `bf16` is given (the caller checked `amx::available()`).
///
/// # Safety
/// `dst` must hold m rows of `ld` elements and lhs/rhs must cover the strided ranges.
#[allow(clippy::too_many_arguments)]
unsafe fn par_gemm(
    bf16: Option<&Scratch>,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    init: Init,
    lhs: Mat,
    rhs: Mat,
    threads: usize,
) {
    if let Some(scratch) = bf16 {
        // SAFETY: the caller's bounds; AMX checked by the backend.
        return unsafe { amx::gemm(scratch, m, n, k, dst, ld, init, lhs, rhs, threads) };
    }
    let dst = SendPtr(dst);
    let run = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
        let (dst, lhs, rhs) = (dst, lhs, rhs);
        // SAFETY: each task gets a disjoint block of dst; the caller vouches for bounds.
        unsafe {
            let accumulate = match init {
                Init::Zero => false,
                Init::Dst => true,
                Init::Bias(bias) => {
                    for r in rows.clone() {
                        let row = dst.get().add(r * ld + cols.start);
                        std::slice::from_raw_parts_mut(row, cols.len())
                            .copy_from_slice(&bias[cols.clone()]);
                    }
                    true
                }
            };
            gemm(
                rows.len(),
                cols.len(),
                k,
                dst.get().add(rows.start * ld + cols.start),
                1,
                ld as isize,
                accumulate,
                lhs.ptr.offset(rows.start as isize * lhs.rs),
                lhs.cs,
                lhs.rs,
                rhs.ptr.offset(cols.start as isize * rhs.cs),
                rhs.cs,
                rhs.rs,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    };
    if threads <= 1 || m * n * k < 1 << 18 {
        run(0..m, 0..n);
    } else if m >= 32 * threads {
        par_ranges(m, threads, 8, |rows| run(rows, 0..n));
    } else {
        par_ranges(n, threads, 16, |cols| run(0..m, cols));
    }
}

fn weight_mat(w: &[f32], layout: WeightLayout, c: usize, oc: usize) -> Mat {
    // As a (c, oc) matrix, the right operand of inp @ w.
    match layout {
        WeightLayout::InOut => Mat::row_major(w, oc),
        WeightLayout::OutIn => Mat::col_major(w, c),
    }
}

/// out (n,oc) = inp (n,c) @ w + bias
#[allow(clippy::too_many_arguments)]
pub fn forward(
    bf16: Option<&Scratch>,
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    layout: WeightLayout,
    n: usize,
    c: usize,
    oc: usize,
    threads: usize,
) {
    assert!(out.len() >= n * oc && inp.len() >= n * c && w.len() >= c * oc);
    let init = match bias {
        Some(b) => Init::Bias(&b[..oc]),
        None => Init::Zero,
    };
    let wm = weight_mat(w, layout, c, oc);
    // SAFETY: sizes asserted above.
    unsafe {
        par_gemm(bf16, n, oc, c, out.as_mut_ptr(), oc, init, Mat::row_major(inp, c), wm, threads)
    }
}

/// dinp (n,c) = dout @ w^T; dw += inp^T @ dout (in w's layout); dbias += column sums of dout.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    bf16: Option<&Scratch>,
    dinp: &mut [f32],
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    layout: WeightLayout,
    n: usize,
    c: usize,
    oc: usize,
    threads: usize,
) {
    assert!(dinp.len() >= n * c && dout.len() >= n * oc && inp.len() >= n * c);
    assert!(dw.len() >= c * oc && w.len() >= c * oc);
    // w^T as an (oc, c) matrix.
    let wt = match layout {
        WeightLayout::InOut => Mat::col_major(w, oc),
        WeightLayout::OutIn => Mat::row_major(w, c),
    };
    // SAFETY: sizes asserted above.
    unsafe {
        par_gemm(
            bf16,
            n,
            c,
            oc,
            dinp.as_mut_ptr(),
            c,
            Init::Zero,
            Mat::row_major(dout, oc),
            wt,
            threads,
        );
        match layout {
            // dw (c,oc) += inp^T (c,n) @ dout (n,oc)
            WeightLayout::InOut => par_gemm(
                bf16,
                c,
                oc,
                n,
                dw.as_mut_ptr(),
                oc,
                Init::Dst,
                Mat::col_major(inp, c),
                Mat::row_major(dout, oc),
                threads,
            ),
            // dw (oc,c) += dout^T (oc,n) @ inp (n,c)
            WeightLayout::OutIn => par_gemm(
                bf16,
                oc,
                c,
                n,
                dw.as_mut_ptr(),
                c,
                Init::Dst,
                Mat::col_major(dout, oc),
                Mat::row_major(inp, c),
                threads,
            ),
        }
    }
    if let Some(db) = dbias {
        assert!(db.len() >= oc);
        let dbp = SendPtr(db.as_mut_ptr());
        par_ranges(oc, threads, 16, |cols| {
            // SAFETY: cols < oc (asserted); column ranges are disjoint between tasks.
            let db =
                unsafe { std::slice::from_raw_parts_mut(dbp.get().add(cols.start), cols.len()) };
            for row in dout[..n * oc].chunks_exact(oc) {
                for (d, g) in db.iter_mut().zip(&row[cols.clone()]) {
                    *d += g;
                }
            }
        });
    }
}
