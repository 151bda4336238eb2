//! Linear layers for decoding: few rows (one per active sequence, or a prompt chunk) against
//! a large weight matrix that is read from memory once per call whatever the number of rows.
//!
//! Every output element is `bias[j] + sum_i inp[r,i] * w[i,j]`, accumulated with one fused
//! multiply-add per term in increasing `i`, whatever the number of rows, how they are tiled,
//! the thread count or the instruction set; so a sequence's result has the same bits alone,
//! batched, or with its prompt cut into other chunks. (`gemm` picks kernels and blockings by
//! shape, so its bits change with the row count.)
//!
//! Decoding is bound by memory bandwidth, so the (in, out) weights are first rearranged
//! ([`pack_in_out`]) into panels of [`PANEL`] output columns, each panel one contiguous run of
//! memory: a task streams whole panels in address order, which the hardware prefetcher
//! follows at full speed. (Read in place, each input row would give a task one 256-byte
//! piece per weight row, a stride the prefetcher does not follow.)
//!
//! Runs on the caller's rayon pool. AVX-512 kernels where the CPU has it, AVX2 + FMA + F16C
//! kernels where it has those; elsewhere the same arithmetic in portable code
//! (`math::multiversion`).

use rayon::prelude::*;

use super::SendPtr;
use crate::math;

/// Output columns per panel of a packed (in, out) weight: four 16-lane vectors.
pub const PANEL: usize = 64;
/// Rows per register tile of the AVX-512 panel kernel: 6 rows x 4 vectors = 24 accumulators.
const MR: usize = 6;
/// Lanes of the dot products of the (out, in) kernel.
const LANES: usize = 16;
/// Weight rows per task of the (out, in) kernel: 768 KiB of a 768-wide matrix.
const OUT_IN_BLOCK: usize = 256;

/// A weight element of these kernels: `f32`, or `f16` for half the bytes to stream per
/// decode step. An f16 weight is widened to f32 exactly, and the sums are the same f32
/// fused multiply-add chains, so the bit-for-bit guarantees above hold for either (for the
/// f16-rounded weights).
pub trait Weight: Copy + Default + Send + Sync + sealed::Sealed + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// The slice itself when the weights are f32.
    fn as_f32(w: &[Self]) -> Option<&[f32]>;
    /// `out` = `w` as f32 (exact), a vector loop where the CPU has one.
    fn widen_into(w: &[Self], out: &mut [f32]);
    /// Sixteen consecutive weights as f32 lanes.
    ///
    /// # Safety
    /// Sixteen elements are readable at `p`, and the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// Eight consecutive weights as f32 lanes.
    ///
    /// # Safety
    /// Eight elements are readable at `p`, and the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

impl Weight for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32(w: &[Self]) -> Option<&[f32]> {
        Some(w)
    }
    fn widen_into(w: &[Self], out: &mut [f32]) {
        out.copy_from_slice(w);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Weight for half::f16 {
    /// Rounded to the nearest f16 (ties to even).
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn widen_into(w: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(w, out);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 halves are 32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (8 halves are 16 bytes).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// Where panel `p` of a packed (c, oc) weight starts, and its width.
#[inline]
fn panel_at(p: usize, c: usize, oc: usize) -> (usize, usize) {
    let j0 = p * PANEL;
    (j0 * c, PANEL.min(oc - j0))
}

/// Rearranges `w` (c, oc), row-major, into `packed` (the same size): panel `p` holds columns
/// `p*PANEL..` (the last may be narrower, width `wp`), starting at `p*PANEL*c`, with element
/// (i, j) at `i*wp + (j - p*PANEL)` from there.
pub fn pack_in_out<W: Weight>(packed: &mut [W], w: &[f32], c: usize, oc: usize) {
    assert!(packed.len() == c * oc && w.len() == c * oc, "pack_in_out: sizes");
    for p in 0..oc.div_ceil(PANEL) {
        let (at, wp) = panel_at(p, c, oc);
        let j0 = p * PANEL;
        for i in 0..c {
            let dst = &mut packed[at + i * wp..][..wp];
            for (d, &v) in dst.iter_mut().zip(&w[i * oc + j0..][..wp]) {
                *d = W::from_f32(v);
            }
        }
    }
}

/// out (rows, oc) = inp (rows, c) @ w (c, oc) + bias, with `w` packed by [`pack_in_out`].
///
/// Element (r, j) is `bias[j] + sum_i inp[r,i] * w[i,j]`, accumulated with fused
/// multiply-adds in increasing `i` (0 in place of a missing bias).
#[allow(clippy::too_many_arguments)]
pub fn forward_packed<W: Weight>(
    out: &mut [f32],
    inp: &[f32],
    packed: &[W],
    bias: Option<&[f32]>,
    rows: usize,
    c: usize,
    oc: usize,
) {
    assert!(out.len() >= rows * oc && inp.len() >= rows * c && packed.len() >= c * oc);
    assert!(bias.is_none_or(|b| b.len() >= oc));
    let op = SendPtr(out.as_mut_ptr());
    (0..oc.div_ceil(PANEL)).into_par_iter().for_each(|p| {
        let (at, wp) = panel_at(p, c, oc);
        let w = &packed[at..at + c * wp];
        let b = bias.map(|b| &b[p * PANEL..p * PANEL + wp]);
        // SAFETY: this task alone writes columns p*PANEL.. p*PANEL+wp of every row.
        let dst = DstTile { ptr: op, ld: oc, r0: 0, j0: p * PANEL };
        panel(dst, inp, w, b, rows, c, wp);
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
    unsafe fn at(self, r: usize, j: usize) -> *mut f32 {
        unsafe { self.ptr.get().add((self.r0 + r) * self.ld + self.j0 + j) }
    }
}

/// Rows from which an f16 panel is widened to f32 once per call (into a per-thread scratch)
/// rather than converted again for every tile of rows: a prompt's prefill then runs at the
/// f32 kernels' speed, and since widening is exact the bits are the same. (Converting in
/// the tile costs little while memory bounds the step, i.e. for a few decode rows; with
/// hundreds of rows it made an AVX2 prefill 25-40% slower than with f32 weights.)
const WIDEN_ROWS: usize = 8;

thread_local! {
    /// The widened panel of [`panel`], reused from call to call.
    static WIDE_PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Every row against one panel (`w` is the panel, (c, wp)).
fn panel<W: Weight>(
    dst: DstTile,
    inp: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    rows: usize,
    c: usize,
    wp: usize,
) {
    // The vector tiles read f16 themselves; everywhere else (many rows, a narrow panel, a
    // CPU without them) an f16 panel is widened once here and the f32 code runs.
    #[cfg(target_arch = "x86_64")]
    let tiles = wp == PANEL && (avx512::available() || avx2::available());
    #[cfg(not(target_arch = "x86_64"))]
    let tiles = false;
    if W::as_f32(w).is_none() && (rows >= WIDEN_ROWS || !tiles) {
        return WIDE_PANEL.with(|cell| {
            // Not reentrant: the f32 call below never comes back here.
            let mut wide = cell.borrow_mut();
            wide.resize(w.len(), 0.0);
            W::widen_into(w, &mut wide);
            panel::<f32>(dst, inp, &wide, bias, rows, c, wp);
        });
    }
    #[cfg(target_arch = "x86_64")]
    if wp == PANEL && avx512::available() {
        let mut r0 = 0;
        while r0 < rows {
            let rt = MR.min(rows - r0);
            let d = DstTile { r0, ..dst };
            let x = &inp[r0 * c..(r0 + rt) * c];
            // SAFETY: the CPU has AVX-512; the tile is inside `out` and `x`, `w`, `bias` hold
            // rt rows of c, c rows of PANEL and PANEL values (checked by the slicing above).
            unsafe {
                match rt {
                    6 => avx512::panel_tile::<W, 6>(d, x, w, bias, c),
                    5 => avx512::panel_tile::<W, 5>(d, x, w, bias, c),
                    4 => avx512::panel_tile::<W, 4>(d, x, w, bias, c),
                    3 => avx512::panel_tile::<W, 3>(d, x, w, bias, c),
                    2 => avx512::panel_tile::<W, 2>(d, x, w, bias, c),
                    _ => avx512::panel_tile::<W, 1>(d, x, w, bias, c),
                }
            }
            r0 += rt;
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if wp == PANEL && avx2::available() {
        if rows == 1 {
            // SAFETY: the CPU has AVX2, FMA and F16C; one row of c, a full panel.
            unsafe { avx2::panel_tile::<W, 1, 8>(dst, &inp[..c], w, 0, bias, c) };
            return;
        }
        // Several rows: half a panel (4 vectors) at a time, so that 3 rows of accumulators,
        // their broadcast inputs and a weight vector fit the 16 registers.
        for half in [0, PANEL / 2] {
            let mut r0 = 0;
            while r0 < rows {
                let rt = 3.min(rows - r0);
                let d = DstTile { r0, j0: dst.j0 + half, ..dst };
                let x = &inp[r0 * c..(r0 + rt) * c];
                // SAFETY: as above; columns half..half+32 of the panel.
                unsafe {
                    match rt {
                        3 => avx2::panel_tile::<W, 3, 4>(d, x, w, half, bias, c),
                        2 => avx2::panel_tile::<W, 2, 4>(d, x, w, half, bias, c),
                        _ => avx2::panel_tile::<W, 1, 4>(d, x, w, half, bias, c),
                    }
                }
                r0 += rt;
            }
        }
        return;
    }
    let w = W::as_f32(w).expect("f16 panels are widened above");
    let mut r0 = 0;
    while r0 < rows {
        let rt = 4.min(rows - r0);
        panel_portable(DstTile { r0, ..dst }, inp, w, bias, c, wp, rt);
        r0 += rt;
    }
}

/// `w` as f32 for the portable dot products: borrowed when it is f32, else converted
/// (exactly) into a copy. Only CPUs without AVX-512 or AVX2 take this detour with f16 weights.
fn widened<W: Weight>(w: &[W]) -> std::borrow::Cow<'_, [f32]> {
    match W::as_f32(w) {
        Some(f) => std::borrow::Cow::Borrowed(f),
        None => std::borrow::Cow::Owned(w.iter().map(|v| v.to_f32()).collect()),
    }
}

math::multiversion! {
    /// Up to 4 rows against a panel of width `wp`: the same arithmetic as the AVX-512 tile.
    #[allow(clippy::too_many_arguments)]
    fn panel_portable(
        dst: DstTile,
        inp: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        c: usize,
        wp: usize,
        rt: usize,
    ) {
        let mut acc = [[0.0f32; PANEL]; 4];
        if let Some(b) = bias {
            for a in acc[..rt].iter_mut() {
                a[..wp].copy_from_slice(b);
            }
        }
        for i in 0..c {
            let wr = &w[i * wp..][..wp];
            for (r, a) in acc[..rt].iter_mut().enumerate() {
                let x = inp[(dst.r0 + r) * c + i];
                for (s, &wv) in a[..wp].iter_mut().zip(wr) {
                    *s = x.mul_add(wv, *s);
                }
            }
        }
        for (r, a) in acc[..rt].iter().enumerate() {
            for (j, &v) in a[..wp].iter().enumerate() {
                // SAFETY: see `forward_packed`.
                unsafe { *dst.at(r, j) = v };
            }
        }
    }
}

/// out (rows, oc) = inp (rows, c) @ w^T for w (oc, c) row-major (`WeightLayout::OutIn`, the
/// tied LM head). Element (r, j) is a 16-lane fused dot product of input row r and weight
/// row j: lane l sums the terms i ≡ l (mod 16) in increasing i, the lanes are added in
/// order, then the terms past the last multiple of 16 (summed in order) are added.
pub fn forward_out_in<W: Weight>(
    out: &mut [f32],
    inp: &[f32],
    w: &[W],
    rows: usize,
    c: usize,
    oc: usize,
) {
    assert!(out.len() >= rows * oc && inp.len() >= rows * c && w.len() >= c * oc);
    let op = SendPtr(out.as_mut_ptr());
    (0..oc.div_ceil(OUT_IN_BLOCK)).into_par_iter().for_each(|blk| {
        let j0 = blk * OUT_IN_BLOCK;
        let j1 = (j0 + OUT_IN_BLOCK).min(oc);
        dots_block(op, inp, w, rows, c, oc, j0, j1);
    });
}

/// Weight rows j0..j1 against every input row, four weight rows at a time, so that each
/// group of four is read from memory once and from cache for the other input rows.
#[allow(clippy::too_many_arguments)]
fn dots_block<W: Weight>(
    op: SendPtr,
    inp: &[f32],
    w: &[W],
    rows: usize,
    c: usize,
    oc: usize,
    j0: usize,
    j1: usize,
) {
    let mut j = j0;
    while j < j1 {
        let n = 4.min(j1 - j);
        let wr: [&[W]; 4] = std::array::from_fn(|q| &w[(j + q.min(n - 1)) * c..][..c]);
        let dst = DstTile { ptr: op, ld: oc, r0: 0, j0: j };
        let mut r0 = 0;
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            while r0 < rows {
                let rt = 4.min(rows - r0);
                let x = &inp[r0 * c..(r0 + rt) * c];
                let d = DstTile { r0, ..dst };
                // SAFETY: the CPU has AVX-512; `x` holds rt rows of c and each `wr` c values;
                // this task alone writes columns j0..j1.
                unsafe {
                    match rt {
                        4 => avx512::dots::<W, 4>(d, x, wr, c, n),
                        3 => avx512::dots::<W, 3>(d, x, wr, c, n),
                        2 => avx512::dots::<W, 2>(d, x, wr, c, n),
                        _ => avx512::dots::<W, 1>(d, x, wr, c, n),
                    }
                }
                r0 += rt;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if r0 == 0 && avx2::available() {
            while r0 < rows {
                let x = &inp[r0 * c..(r0 + 1) * c];
                // SAFETY: the CPU has AVX2, FMA and F16C; as for AVX-512 above.
                unsafe { avx2::dots(DstTile { r0, ..dst }, x, wr, c, n) };
                r0 += 1;
            }
        }
        if r0 == rows {
            j += n;
            continue;
        }
        let wide: [std::borrow::Cow<'_, [f32]>; 4] = std::array::from_fn(|q| widened(wr[q]));
        let wide: [&[f32]; 4] = std::array::from_fn(|q| &wide[q][..]);
        for r in r0..rows {
            let d = dot4(&inp[r * c..][..c], wide);
            for (q, &v) in d[..n].iter().enumerate() {
                // SAFETY: this task alone writes columns j0..j1.
                unsafe { *dst.at(r, q) = v };
            }
        }
        j += n;
    }
}

math::multiversion! {
    /// Four dot products of `x` with `w[q]`, each exactly as [`forward_out_in`] defines it.
    fn dot4_into(out: &mut [f32; 4], x: &[f32], w: [&[f32]; 4]) {
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
        for q in 0..4 {
            out[q] = finish_dot(&acc[q], x, w[q], full);
        }
    }
}

fn dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
    let mut out = [0.0; 4];
    dot4_into(&mut out, x, w);
    out
}

/// The lanes of a dot product added in order, then its tail terms `full..` (in order).
#[inline(always)]
fn finish_dot<W: Weight>(lanes: &[f32; LANES], x: &[f32], w: &[W], full: usize) -> f32 {
    let mut tail = 0.0f32;
    for k in full..x.len() {
        tail = x[k].mul_add(w[k].to_f32(), tail);
    }
    lanes.iter().fold(0.0f32, |s, &a| s + a) + tail
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{finish_dot, DstTile, Weight, LANES, PANEL};

    /// Whether the CPU runs the kernels of this module (cached by std after the first call).
    #[inline]
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// `R` rows of `x` (R, c) against a full panel `w` (c, PANEL), into `dst`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `dst` covers R rows of PANEL columns written by this call
    /// alone; `x`, `w` and `bias` have R*c, c*PANEL and PANEL elements.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel_tile<W: Weight, const R: usize>(
        dst: DstTile,
        x: &[f32],
        w: &[W],
        bias: Option<&[f32]>,
        c: usize,
    ) {
        debug_assert!(x.len() >= R * c && w.len() >= c * PANEL);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if let Some(b) = bias {
            // SAFETY: `b` has PANEL = 64 values.
            let bv: [__m512; 4] =
                std::array::from_fn(|q| unsafe { _mm512_loadu_ps(b.as_ptr().add(16 * q)) });
            acc = [bv; R];
        }
        for i in 0..c {
            // SAFETY: i < c, so the row i*PANEL.. of the panel and element (r, i) of x exist.
            unsafe {
                let row = wp.add(i * PANEL);
                let w0 = W::load16(row);
                let w1 = W::load16(row.add(16));
                let w2 = W::load16(row.add(32));
                let w3 = W::load16(row.add(48));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xp.add(r * c + i));
                    a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                    a[2] = _mm512_fmadd_ps(xv, w2, a[2]);
                    a[3] = _mm512_fmadd_ps(xv, w3, a[3]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (q, &v) in a.iter().enumerate() {
                // SAFETY: (r, 16q..16q+16) is inside the tile.
                unsafe { _mm512_storeu_ps(dst.at(r, 16 * q), v) };
            }
        }
    }

    /// `R` rows of `x` (R, c) dotted with the weight rows `w[..n]`, into columns 0..n of
    /// `dst`; the same sums as `dot4`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `dst` covers R rows of n columns written by this call alone;
    /// `x` has R*c elements and each `w[q]` c.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dots<W: Weight, const R: usize>(
        dst: DstTile,
        x: &[f32],
        w: [&[W]; 4],
        c: usize,
        n: usize,
    ) {
        let full = c - c % LANES;
        let xp = x.as_ptr();
        let wp: [*const W; 4] = w.map(|s| s.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= full <= c.
            unsafe {
                let wv: [__m512; 4] = std::array::from_fn(|q| W::load16(wp[q].add(i)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(xp.add(r * c + i));
                    for q in 0..4 {
                        a[q] = _mm512_fmadd_ps(xv, wv[q], a[q]);
                    }
                }
            }
            i += LANES;
        }
        for (r, a) in acc.iter().enumerate() {
            let xr = &x[r * c..(r + 1) * c];
            for (q, &v) in a[..n].iter().enumerate() {
                let mut lanes = [0.0f32; LANES];
                // SAFETY: `lanes` holds 16 floats.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
                // SAFETY: (r, q) is inside the tile.
                unsafe { *dst.at(r, q) = finish_dot(&lanes, xr, w[q], full) };
            }
        }
    }
}

/// The same kernels in 8-lane AVX2 vectors, for x86 CPUs without AVX-512 (AMD before Zen 4,
/// Intel client cores): the sums and their order are those of the AVX-512 kernels.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{finish_dot, DstTile, Weight, LANES, PANEL};

    /// Whether the CPU runs the kernels of this module (cached by std after the first call).
    #[inline]
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// `R` rows of `x` (R, c) against columns `col..col + 8V` of a full panel `w`
    /// (c, PANEL), into columns 0..8V of `dst`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `col + 8V <= PANEL`; `dst` covers R rows of 8V
    /// columns written by this call alone; `x`, `w` and `bias` have R*c, c*PANEL and PANEL
    /// elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn panel_tile<W: Weight, const R: usize, const V: usize>(
        dst: DstTile,
        x: &[f32],
        w: &[W],
        col: usize,
        bias: Option<&[f32]>,
        c: usize,
    ) {
        debug_assert!(x.len() >= R * c && w.len() >= c * PANEL && col + 8 * V <= PANEL);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        if let Some(b) = bias {
            // SAFETY: `b` has PANEL values and col + 8V <= PANEL.
            let bv: [__m256; V] =
                std::array::from_fn(|q| unsafe { _mm256_loadu_ps(b.as_ptr().add(col + 8 * q)) });
            acc = [bv; R];
        }
        for i in 0..c {
            // SAFETY: i < c, so the row i*PANEL.. of the panel and element (r, i) of x exist.
            unsafe {
                let row = wp.add(i * PANEL + col);
                let xv: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(*xp.add(r * c + i)));
                for q in 0..V {
                    let wv = W::load8(row.add(8 * q));
                    for (a, &x) in acc.iter_mut().zip(&xv) {
                        a[q] = _mm256_fmadd_ps(x, wv, a[q]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (q, &v) in a.iter().enumerate() {
                // SAFETY: (r, 8q..8q+8) is inside the tile.
                unsafe { _mm256_storeu_ps(dst.at(r, 8 * q), v) };
            }
        }
    }

    /// One row `x` (c) dotted with the weight rows `w[..n]`, into columns 0..n of row 0 of
    /// `dst`; the same 16 lane sums as `dot4`, kept as two 8-lane halves.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `dst` covers n columns of one row written by this
    /// call alone; `x` and each `w[q]` have c elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots<W: Weight>(
        dst: DstTile,
        x: &[f32],
        w: [&[W]; 4],
        c: usize,
        n: usize,
    ) {
        let full = c - c % LANES;
        let xp = x.as_ptr();
        let wp: [*const W; 4] = w.map(|s| s.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i < full {
            // The next four rows follow these in memory: fetch the part of them that
            // this step's share of the work covers.
            let ahead = wp[0].wrapping_add(4 * c + 4 * i).cast::<i8>();
            for k in (0..64 * std::mem::size_of::<W>()).step_by(64) {
                // A prefetch does not fault, whatever the address (past the matrix's end on
                // the last rows).
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(k));
            }
            // SAFETY: i + 16 <= full <= c.
            unsafe {
                let (x0, x1) = (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8)));
                for q in 0..4 {
                    acc[q][0] = _mm256_fmadd_ps(x0, W::load8(wp[q].add(i)), acc[q][0]);
                    acc[q][1] = _mm256_fmadd_ps(x1, W::load8(wp[q].add(i + 8)), acc[q][1]);
                }
            }
            i += LANES;
        }
        for (q, a) in acc[..n].iter().enumerate() {
            let mut lanes = [0.0f32; LANES];
            // SAFETY: `lanes` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), a[1]);
            }
            // SAFETY: (0, q) is inside the tile.
            unsafe { *dst.at(0, q) = finish_dot(&lanes, x, w[q], full) };
        }
    }
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

    /// The defined sum, one element at a time.
    fn reference(inp: &[f32], w: &[f32], b: &[f32], rows: usize, c: usize, oc: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * oc];
        for r in 0..rows {
            for j in 0..oc {
                let mut s = b[j];
                for i in 0..c {
                    s = inp[r * c + i].mul_add(w[i * oc + j], s);
                }
                out[r * oc + j] = s;
            }
        }
        out
    }

    #[test]
    fn packed_has_the_bits_of_the_defined_sum_for_any_row_count() {
        for (c, oc) in [(32, 96), (48, 200), (64, 128), (17, 64)] {
            let rows = 13;
            let (inp, w, b) = (data(rows * c, 1), data(c * oc, 2), data(oc, 3));
            let mut packed = vec![0.0; c * oc];
            pack_in_out(&mut packed, &w, c, oc);
            let want = reference(&inp, &w, &b, rows, c, oc);
            for n in [rows, 1, 2, 5, 6, 7] {
                let mut out = vec![0.0; n * oc];
                let x = &inp[..n * c];
                pool().install(|| forward_packed(&mut out, x, &packed, Some(&b), n, c, oc));
                assert_eq!(out, want[..n * oc], "{n} rows (c={c}, oc={oc})");
            }
            let mut out = vec![0.0; rows * oc];
            forward_packed(&mut out, &inp, &packed, None, rows, c, oc);
            let zero = vec![0.0; oc];
            assert_eq!(out, reference(&inp, &w, &zero, rows, c, oc));
        }
    }

    #[test]
    fn f16_weights_give_the_defined_sum_of_their_rounded_values() {
        use half::f16;
        // oc = 200: three full panels (vector kernels) and a narrow one (portable); from
        // WIDEN_ROWS rows the panels are widened first, below they are converted in the tile.
        let (rows, c, oc) = (13, 48, 200);
        let (inp, w, b) = (data(rows * c, 6), data(c * oc, 7), data(oc, 8));
        let rounded: Vec<f32> = w.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let mut packed = vec![f16::ZERO; c * oc];
        pack_in_out(&mut packed, &w, c, oc);
        let want = reference(&inp, &rounded, &b, rows, c, oc);
        for n in [rows, 1, 6, WIDEN_ROWS - 1, WIDEN_ROWS] {
            let mut out = vec![0.0; n * oc];
            pool().install(|| forward_packed(&mut out, &inp[..n * c], &packed, Some(&b), n, c, oc));
            assert_eq!(out, want[..n * oc], "{n} rows");
        }
        // The LM head's layout: the same dot products as on the rounded f32 weights.
        let halves: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let (mut a, mut r) = (vec![0.0; rows * oc], vec![0.0; rows * oc]);
        pool().install(|| forward_out_in(&mut a, &inp, &halves, rows, c, oc));
        pool().install(|| forward_out_in(&mut r, &inp, &rounded, rows, c, oc));
        assert_eq!(a, r);
    }

    /// The AVX2 kernels called directly, so that a CPU with AVX-512 (which the dispatch sends
    /// elsewhere) tests them too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_give_the_bits_of_the_defined_sums() {
        use half::f16;
        if !avx2::available() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        let (rows, c, oc) = (3, 40, PANEL);
        let (inp, w, b) = (data(rows * c, 9), data(c * oc, 10), data(oc, 11));
        let rounded: Vec<f32> = w.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let (mut p32, mut p16) = (vec![0.0f32; c * oc], vec![f16::ZERO; c * oc]);
        pack_in_out(&mut p32, &w, c, oc);
        pack_in_out(&mut p16, &w, c, oc);
        for (weights, packed16) in [(&w, false), (&rounded, true)] {
            let want = reference(&inp, weights, &b, rows, c, oc);
            let mut out = vec![0.0; rows * oc];
            let dst = DstTile { ptr: SendPtr(out.as_mut_ptr()), ld: oc, r0: 0, j0: 0 };
            let half = DstTile { j0: PANEL / 2, ..dst };
            // SAFETY: the CPU has the features; `out` is rows x PANEL, written here alone.
            unsafe {
                if packed16 {
                    avx2::panel_tile::<f16, 3, 4>(dst, &inp, &p16, 0, Some(&b), c);
                    avx2::panel_tile::<f16, 3, 4>(half, &inp, &p16, PANEL / 2, Some(&b), c);
                } else {
                    avx2::panel_tile::<f32, 3, 4>(dst, &inp, &p32, 0, Some(&b), c);
                    avx2::panel_tile::<f32, 3, 4>(half, &inp, &p32, PANEL / 2, Some(&b), c);
                }
            }
            assert_eq!(out, want, "three rows, half panels (f16: {packed16})");
            let mut one = vec![0.0; oc];
            let dst = DstTile { ptr: SendPtr(one.as_mut_ptr()), ld: oc, r0: 0, j0: 0 };
            // SAFETY: as above, one row.
            unsafe {
                if packed16 {
                    avx2::panel_tile::<f16, 1, 8>(dst, &inp[..c], &p16, 0, Some(&b), c);
                } else {
                    avx2::panel_tile::<f32, 1, 8>(dst, &inp[..c], &p32, 0, Some(&b), c);
                }
            }
            assert_eq!(one, want[..oc], "one row, whole panel (f16: {packed16})");
        }
        // The (out, in) dots, c = 40: two 16-lane steps and a tail of 8; f16 rows give the
        // dots of their rounded values.
        let wt: Vec<f32> = data(4 * c, 12);
        let ht: Vec<f16> = wt.iter().map(|&v| f16::from_f32(v)).collect();
        let rt: Vec<f32> = ht.iter().map(|v| v.to_f32()).collect();
        let ws: [&[f32]; 4] = std::array::from_fn(|q| &wt[q * c..(q + 1) * c]);
        let rs: [&[f32]; 4] = std::array::from_fn(|q| &rt[q * c..(q + 1) * c]);
        let hs: [&[f16]; 4] = std::array::from_fn(|q| &ht[q * c..(q + 1) * c]);
        for r in 0..rows {
            let x = &inp[r * c..(r + 1) * c];
            let (mut got, mut got16) = ([0.0f32; 4], [0.0f32; 4]);
            let dst = DstTile { ptr: SendPtr(got.as_mut_ptr()), ld: 4, r0: 0, j0: 0 };
            let dst16 = DstTile { ptr: SendPtr(got16.as_mut_ptr()), ..dst };
            // SAFETY: the CPU has the features; `got` and `got16` are one row of 4 each.
            unsafe {
                avx2::dots(dst, x, ws, c, 4);
                avx2::dots(dst16, x, hs, c, 4);
            }
            assert_eq!(got, dot4(x, ws), "row {r}");
            assert_eq!(got16, dot4(x, rs), "row {r}, f16 weights");
        }
    }

    #[test]
    fn out_in_matches_naive_and_is_independent_of_row_count() {
        for (rows, c, oc) in [(5, 40, 70), (9, 64, 37), (3, 16, 4)] {
            let (inp, w) = (data(rows * c, 4), data(oc * c, 5));
            let mut all = vec![0.0; rows * oc];
            pool().install(|| forward_out_in(&mut all, &inp, &w, rows, c, oc));
            for r in 0..rows {
                for j in 0..oc {
                    let want: f64 =
                        (0..c).map(|i| inp[r * c + i] as f64 * w[j * c + i] as f64).sum();
                    assert!((all[r * oc + j] as f64 - want).abs() < 1e-4, "({r},{j})");
                    let x = &inp[r * c..(r + 1) * c];
                    let d = dot4(x, [&w[j * c..(j + 1) * c]; 4]);
                    assert_eq!(all[r * oc + j], d[0], "({r},{j}) differs from dot4");
                }
                let mut one = vec![0.0; oc];
                let x = &inp[r * c..(r + 1) * c];
                pool().install(|| forward_out_in(&mut one, x, &w, 1, c, oc));
                assert_eq!(one, all[r * oc..(r + 1) * oc]);
            }
        }
    }
}
