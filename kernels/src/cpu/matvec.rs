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
/// Rows per AVX-512 tile against half a panel: 10 rows x 2 vectors = 20 accumulators (at 11
/// and 12 rows LLVM loads every row's input first and the sums no longer fit the 32
/// registers). From 7 to 10 rows (a decode step of that many sequences) one such tile per
/// half reads each weight once, so an f16 weight is converted as it is loaded instead of
/// widened into a scratch chunk that two tiles of MR rows would each read back (the
/// widening's stores and loads cost a quarter as much as the multiply-adds there).
const MR_HALF: usize = 10;

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
        assert_eq!(w.len(), out.len(), "widen_into: lengths");
        // `half`'s own slice conversion calls a function per 8 values.
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::available() {
                // SAFETY: the CPU has AVX-512F; the lengths match.
                return unsafe { avx512::widen(w, out) };
            }
            if avx2::available() {
                // SAFETY: the CPU has AVX2 and F16C; the lengths match.
                return unsafe { avx2::widen(w, out) };
            }
        }
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

/// [`pack_in_out`] of the transpose of `w` (oc, c), row-major: an (out, in) matrix, such as
/// the tied embedding used as the LM head, packed for [`forward_packed`].
pub fn pack_out_in<W: Weight>(packed: &mut [W], w: &[f32], c: usize, oc: usize) {
    assert!(packed.len() == c * oc && w.len() == c * oc, "pack_out_in: sizes");
    for (j, row) in w.chunks_exact(c).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            packed[packed_index(c, oc, i, j)] = W::from_f32(v);
        }
    }
}

/// Where element (i, j) of a (c, oc) matrix sits once packed.
pub fn packed_index(c: usize, oc: usize, i: usize, j: usize) -> usize {
    let (at, wp) = panel_at(j / PANEL, c, oc);
    at + i * wp + j % PANEL
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

/// Weight rows of a panel that every tile of input rows takes in turn before the next
/// ones: 16 KiB of f32 (8 KiB of f16). With several tiles, the later ones then read the
/// chunk from L1, where the whole panel (up to 768 KiB) would come again from L2 or memory
/// for each tile. A tile keeps its partial sums in the output between chunks and resumes
/// from them, so the sums are the same chains in the same order.
#[cfg(target_arch = "x86_64")]
const CHUNK: usize = 64;
/// Rows up to which panels are taken in chunks: decode steps. A prompt's hundreds of rows
/// run whole panels, which stay in L2 for all their tiles (chunks measured 5-10% slower
/// there, the partial sums going out and back in for every chunk).
#[cfg(target_arch = "x86_64")]
const CHUNK_ROWS: usize = 24;

thread_local! {
    /// An f16 chunk (or, on the portable path, panel) widened to f32, reused from call to call.
    static WIDE_PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How a tile's accumulators start.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Start<'a> {
    /// At the bias (PANEL values; zero without one): the panel's first chunk.
    Bias(Option<&'a [f32]>),
    /// At the partial sums the tile stored in the output after the previous chunk.
    Resume,
}

/// Weights for a tile to prefetch while it computes: `lines` cache lines of each of its
/// weight rows, from `ptr` on (rows `stride` bytes apart). The chunk after the current one
/// sits right after it in memory, also across panels (a task takes its panels in address
/// order), so the first tile of each chunk fetches the next while the other tiles compute
/// from L1; the hardware prefetcher alone stops when the demand loads pause. Half-panel
/// tiles fetch half the lines each, so the requests spread over the whole chunk. The lines
/// go to L2: fetched into L1 they held its miss buffers for the whole memory latency (Zen 4,
/// one thread, a bare f16 decode step of 8 rows, single runs: 39-43 ms with half-panel tiles
/// alone, 36-38 with the split, 33-36 with the split into L2).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Ahead {
    ptr: *const i8,
    lines: usize,
    /// Bytes from one weight row to the next.
    stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl Ahead {
    const NONE: Ahead = Ahead { ptr: std::ptr::null(), lines: 0, stride: 0 };

    /// Half `k` (0 or 1) of each row's lines: the share of one half-panel tile.
    fn half(self, k: usize) -> Ahead {
        let (a, b) = (self.lines * k / 2, self.lines * (k + 1) / 2);
        Ahead { ptr: self.ptr.wrapping_add(64 * a), lines: b - a, ..self }
    }

    /// Fetches what weight row `i` of the tile is ahead of.
    #[inline(always)]
    fn row(self, i: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let row = self.ptr.wrapping_add(i * self.stride);
        for l in 0..self.lines {
            // SAFETY: a prefetch does not fault, whatever the address (past the matrix's
            // end on its last chunk).
            unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(64 * l)) };
        }
    }
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
    #[cfg(target_arch = "x86_64")]
    if wp == PANEL {
        let tiles = if avx512::available() {
            Some(Tiles::Avx512)
        } else if avx2::available() {
            Some(Tiles::Avx2)
        } else {
            None
        };
        if let Some(t) = tiles {
            return chunked(t, dst, inp, w, bias, rows, c);
        }
    }
    // A narrow panel, or a CPU without the vector kernels: an f16 panel is widened once here.
    match W::as_f32(w) {
        Some(w) => portable_rows(dst, inp, w, bias, rows, c, wp),
        None => WIDE_PANEL.with(|cell| {
            let mut wide = cell.borrow_mut();
            wide.resize(w.len(), 0.0);
            W::widen_into(w, &mut wide);
            portable_rows(dst, inp, &wide, bias, rows, c, wp);
        }),
    }
}

fn portable_rows(
    dst: DstTile,
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    c: usize,
    wp: usize,
) {
    let mut r0 = 0;
    while r0 < rows {
        let rt = 4.min(rows - r0);
        panel_portable(DstTile { r0, ..dst }, inp, w, bias, c, wp, rt);
        r0 += rt;
    }
}

/// The vector kernels of this CPU.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Tiles {
    /// Tiles of up to MR rows against the whole panel; from MR + 1 rows to CHUNK_ROWS, tiles
    /// of up to MR_HALF rows against each half of it.
    Avx512,
    /// One row against the whole panel; several rows in tiles of up to 3 against half of it
    /// (3 rows x 4 vectors of accumulators, their inputs and a weight vector fit 16 registers).
    Avx2,
}

#[cfg(target_arch = "x86_64")]
impl Tiles {
    /// Whether the AVX-512 kernels take `rows` rows in half-panel tiles.
    fn halves(rows: usize) -> bool {
        (MR + 1..=CHUNK_ROWS).contains(&rows)
    }

    /// How many tiles read each weight for `rows` rows.
    fn passes(self, rows: usize) -> usize {
        match self {
            Tiles::Avx512 if Self::halves(rows) => rows.div_ceil(MR_HALF),
            Tiles::Avx512 => rows.div_ceil(MR),
            Tiles::Avx2 if rows == 1 => 1,
            Tiles::Avx2 => rows.div_ceil(3),
        }
    }

    /// Every tile of rows against rows `i0..i0 + n` of the panel; `w` holds those rows.
    #[allow(clippy::too_many_arguments)]
    fn run<W: Weight>(
        self,
        dst: DstTile,
        inp: &[f32],
        w: &[W],
        rows: usize,
        c: usize,
        i0: usize,
        n: usize,
        start: Start<'_>,
        ahead: Ahead,
    ) {
        assert!(w.len() >= n * PANEL && i0 + n <= c && inp.len() >= rows * c);
        // Row r0 of a tile's input, from column i0: the tile reads rt rows of it, c apart.
        let x = |r0: usize, rt: usize| &inp[r0 * c + i0..(r0 + rt - 1) * c + i0 + n];
        match self {
            Tiles::Avx512 if Self::halves(rows) => {
                // Tiles of equal size but the last, at most MR_HALF rows: from 7 to 24 rows,
                // 5 to 10 in each.
                let rt = rows.div_ceil(rows.div_ceil(MR_HALF));
                for half in [0, PANEL / 2] {
                    for r0 in (0..rows).step_by(rt) {
                        let rt = rt.min(rows - r0);
                        let (d, x) = (DstTile { r0, j0: dst.j0 + half, ..dst }, x(r0, rt));
                        let first =
                            if r0 == 0 { ahead.half(half / (PANEL / 2)) } else { Ahead::NONE };
                        let h = half;
                        // SAFETY: as below; columns half..half + 32 of the panel.
                        unsafe {
                            match rt {
                                10 => {
                                    avx512::panel_tile::<W, 10, 2>(d, x, c, w, h, n, start, first)
                                }
                                9 => avx512::panel_tile::<W, 9, 2>(d, x, c, w, h, n, start, first),
                                8 => avx512::panel_tile::<W, 8, 2>(d, x, c, w, h, n, start, first),
                                7 => avx512::panel_tile::<W, 7, 2>(d, x, c, w, h, n, start, first),
                                6 => avx512::panel_tile::<W, 6, 2>(d, x, c, w, h, n, start, first),
                                5 => avx512::panel_tile::<W, 5, 2>(d, x, c, w, h, n, start, first),
                                _ => unreachable!("a half-panel tile of {rt} rows"),
                            }
                        }
                    }
                }
            }
            Tiles::Avx512 => {
                let mut r0 = 0;
                while r0 < rows {
                    let rt = MR.min(rows - r0);
                    let (d, x) = (DstTile { r0, ..dst }, x(r0, rt));
                    let first = if r0 == 0 { ahead } else { Ahead::NONE };
                    // SAFETY: the CPU has AVX-512; the tile is inside `out`, written by this
                    // task alone; `x`, `w` and a bias hold what the kernel reads (asserted
                    // and sliced above).
                    unsafe {
                        match rt {
                            6 => avx512::panel_tile::<W, 6, 4>(d, x, c, w, 0, n, start, first),
                            5 => avx512::panel_tile::<W, 5, 4>(d, x, c, w, 0, n, start, first),
                            4 => avx512::panel_tile::<W, 4, 4>(d, x, c, w, 0, n, start, first),
                            3 => avx512::panel_tile::<W, 3, 4>(d, x, c, w, 0, n, start, first),
                            2 => avx512::panel_tile::<W, 2, 4>(d, x, c, w, 0, n, start, first),
                            _ => avx512::panel_tile::<W, 1, 4>(d, x, c, w, 0, n, start, first),
                        }
                    }
                    r0 += rt;
                }
            }
            Tiles::Avx2 if rows == 1 => {
                // SAFETY: the CPU has AVX2, FMA and F16C; as above, one row, a whole panel.
                unsafe { avx2::panel_tile::<W, 1, 8>(dst, x(0, 1), c, w, 0, n, start, ahead) };
            }
            Tiles::Avx2 => {
                for half in [0, PANEL / 2] {
                    let mut r0 = 0;
                    while r0 < rows {
                        let rt = 3.min(rows - r0);
                        let (d, x) = (DstTile { r0, j0: dst.j0 + half, ..dst }, x(r0, rt));
                        let first = if r0 + half == 0 { ahead } else { Ahead::NONE };
                        // SAFETY: as above; columns half..half + 32 of the panel.
                        unsafe {
                            match rt {
                                3 => avx2::panel_tile::<W, 3, 4>(d, x, c, w, half, n, start, first),
                                2 => avx2::panel_tile::<W, 2, 4>(d, x, c, w, half, n, start, first),
                                _ => avx2::panel_tile::<W, 1, 4>(d, x, c, w, half, n, start, first),
                            }
                        }
                        r0 += rt;
                    }
                }
            }
        }
    }
}

/// The panel in chunks of [`CHUNK`] weight rows, every tile of rows through each chunk. An
/// f16 chunk that more than one tile reads is widened to f32 once (exact, so the same bits);
/// a single tile converts its weights as it loads them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn chunked<W: Weight>(
    t: Tiles,
    dst: DstTile,
    inp: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    rows: usize,
    c: usize,
) {
    // Many rows (a prompt): whole panels, which stay in L2 for all the tiles.
    let chunk = if rows <= CHUNK_ROWS { CHUNK } else { c };
    let each = |run: &mut dyn FnMut(usize, usize, Start<'_>)| {
        for i0 in (0..c).step_by(chunk) {
            let start = if i0 == 0 { Start::Bias(bias) } else { Start::Resume };
            run(i0, chunk.min(c - i0), start);
        }
    };
    // The chunk after rows i0..i0 + n (or the next panel's first).
    let lines = PANEL * std::mem::size_of::<W>() / 64;
    let ahead = |i0: usize, n: usize| Ahead {
        ptr: w.as_ptr().wrapping_add((i0 + n) * PANEL).cast(),
        lines,
        stride: lines * 64,
    };
    if W::as_f32(w).is_some() || t.passes(rows) == 1 {
        each(&mut |i0, n, start| {
            let w = &w[i0 * PANEL..(i0 + n) * PANEL];
            t.run(dst, inp, w, rows, c, i0, n, start, ahead(i0, n))
        });
    } else {
        WIDE_PANEL.with(|cell| {
            // Not reentrant: the f32 kernels never come back here.
            let mut wide = cell.borrow_mut();
            wide.resize(chunk * PANEL, 0.0);
            each(&mut |i0, n, start| {
                let wide = &mut wide[..n * PANEL];
                W::widen_into(&w[i0 * PANEL..(i0 + n) * PANEL], wide);
                t.run::<f32>(dst, inp, wide, rows, c, i0, n, start, ahead(i0, n));
            });
        });
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Ahead, DstTile, Start, Weight, PANEL};

    /// Whether the CPU runs the kernels of this module (cached by std after the first call).
    #[inline]
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// `out` = `w` widened (exactly).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `out` is as long as `w`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen(w: &[half::f16], out: &mut [f32]) {
        let full = w.len() - w.len() % 16;
        for i in (0..full).step_by(16) {
            // SAFETY: i + 16 <= full <= both lengths.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(i), Weight::load16(w.as_ptr().add(i))) };
        }
        for i in full..w.len() {
            out[i] = w[i].to_f32();
        }
    }

    /// `R` rows of `x` (row r from `r * xs`) against columns `col..col + 16V` of `n` rows
    /// of a full panel `w` (n, PANEL), into columns 0..16V of `dst`: from `start`, one fused
    /// multiply-add per weight row in order.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `col + 16V <= PANEL`; `dst` covers R rows of 16V columns
    /// written by this call alone; `x` has (R - 1) * xs + n elements, `w` n * PANEL, and a
    /// bias PANEL.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panel_tile<W: Weight, const R: usize, const V: usize>(
        dst: DstTile,
        x: &[f32],
        xs: usize,
        w: &[W],
        col: usize,
        n: usize,
        start: Start<'_>,
        ahead: Ahead,
    ) {
        debug_assert!(x.len() >= (R - 1) * xs + n && w.len() >= n * PANEL);
        debug_assert!(col + 16 * V <= PANEL);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        match start {
            Start::Bias(Some(b)) => {
                // SAFETY: `b` has PANEL values and col + 16V <= PANEL.
                let bv: [__m512; V] = std::array::from_fn(|q| unsafe {
                    _mm512_loadu_ps(b.as_ptr().add(col + 16 * q))
                });
                acc = [bv; R];
            }
            Start::Bias(None) => {}
            Start::Resume => {
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: (r, 16q..16q+16) is inside the tile.
                    *a = std::array::from_fn(|q| unsafe { _mm512_loadu_ps(dst.at(r, 16 * q)) });
                }
            }
        }
        for i in 0..n {
            ahead.row(i);
            // SAFETY: i < n, so the row i*PANEL.. of `w` and element (r, i) of x exist.
            unsafe {
                let row = wp.add(i * PANEL + col);
                let wv: [__m512; V] = std::array::from_fn(|q| W::load16(row.add(16 * q)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xp.add(r * xs + i));
                    for (a, &w) in a.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, w, *a);
                    }
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
}

/// The same kernels in 8-lane AVX2 vectors, for x86 CPUs without AVX-512 (AMD before Zen 4,
/// Intel client cores): the sums and their order are those of the AVX-512 kernels.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Ahead, DstTile, Start, Weight, PANEL};

    /// Whether the CPU runs the kernels of this module (cached by std after the first call).
    #[inline]
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// `out` = `w` widened (exactly).
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `out` is as long as `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen(w: &[half::f16], out: &mut [f32]) {
        let full = w.len() - w.len() % 8;
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 <= full <= both lengths.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), Weight::load8(w.as_ptr().add(i))) };
        }
        for i in full..w.len() {
            out[i] = w[i].to_f32();
        }
    }

    /// `R` rows of `x` (row r from `r * xs`) against columns `col..col + 8V` of `n` rows of
    /// a full panel `w` (n, PANEL), into columns 0..8V of `dst`, from `start`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `col + 8V <= PANEL`; `dst` covers R rows of 8V
    /// columns written by this call alone; `x` has (R - 1) * xs + n elements, `w` n * PANEL,
    /// and a bias PANEL.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panel_tile<W: Weight, const R: usize, const V: usize>(
        dst: DstTile,
        x: &[f32],
        xs: usize,
        w: &[W],
        col: usize,
        n: usize,
        start: Start<'_>,
        ahead: Ahead,
    ) {
        debug_assert!(x.len() >= (R - 1) * xs + n && w.len() >= n * PANEL && col + 8 * V <= PANEL);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        match start {
            Start::Bias(Some(b)) => {
                // SAFETY: `b` has PANEL values and col + 8V <= PANEL.
                let bv: [__m256; V] = std::array::from_fn(|q| unsafe {
                    _mm256_loadu_ps(b.as_ptr().add(col + 8 * q))
                });
                acc = [bv; R];
            }
            Start::Bias(None) => {}
            Start::Resume => {
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: (r, 8q..8q+8) is inside the tile.
                    *a = std::array::from_fn(|q| unsafe { _mm256_loadu_ps(dst.at(r, 8 * q)) });
                }
            }
        }
        for i in 0..n {
            ahead.row(i);
            // SAFETY: i < n, so the row i*PANEL.. of `w` and element (r, i) of x exist.
            unsafe {
                let row = wp.add(i * PANEL + col);
                let xv: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(*xp.add(r * xs + i)));
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
        for (c, oc) in [(32, 96), (48, 200), (64, 128), (17, 64), (150, 128)] {
            // 30 rows: more than CHUNK_ROWS, so whole panels; the others in chunks.
            let rows = 30;
            let (inp, w, b) = (data(rows * c, 1), data(c * oc, 2), data(oc, 3));
            let mut packed = vec![0.0; c * oc];
            pack_in_out(&mut packed, &w, c, oc);
            let want = reference(&inp, &w, &b, rows, c, oc);
            for n in [rows, 1, 2, 5, 6, 7, 12, 13, 20] {
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
        // oc = 200: three full panels (vector kernels) and a narrow one (portable); c = 150:
        // three chunks. With more rows than one tile takes, each chunk (or, past CHUNK_ROWS,
        // the panel) is widened first; with fewer, the tile converts as it loads.
        let (rows, c, oc) = (30, 150, 200);
        let (inp, w, b) = (data(rows * c, 6), data(c * oc, 7), data(oc, 8));
        let rounded: Vec<f32> = w.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let mut packed = vec![f16::ZERO; c * oc];
        pack_in_out(&mut packed, &w, c, oc);
        let want = reference(&inp, &rounded, &b, rows, c, oc);
        for n in [rows, 1, 3, 4, 6, 7, 8, 11, 16, 24] {
            let mut out = vec![0.0; n * oc];
            pool().install(|| forward_packed(&mut out, &inp[..n * c], &packed, Some(&b), n, c, oc));
            assert_eq!(out, want[..n * oc], "{n} rows");
        }
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
        // One panel through the AVX2 tiles as `panel` runs them: c = 150 is three chunks
        // (64, 64, 22), so the tiles resume from stored sums; from 4 rows on, several tiles
        // share a chunk and f16 chunks are widened first; 30 rows take whole panels.
        let (rows, c, oc) = (30, 150, PANEL);
        let (inp, w, b) = (data(rows * c, 9), data(c * oc, 10), data(oc, 11));
        let rounded: Vec<f32> = w.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let (mut p32, mut p16) = (vec![0.0f32; c * oc], vec![f16::ZERO; c * oc]);
        pack_in_out(&mut p32, &w, c, oc);
        pack_in_out(&mut p16, &w, c, oc);
        for (weights, packed16) in [(&w, false), (&rounded, true)] {
            let want = reference(&inp, weights, &b, rows, c, oc);
            for n in [1, 2, 3, 4, 7, rows] {
                let mut out = vec![0.0; n * oc];
                let dst = DstTile { ptr: SendPtr(out.as_mut_ptr()), ld: oc, r0: 0, j0: 0 };
                let x = &inp[..n * c];
                if packed16 {
                    chunked(Tiles::Avx2, dst, x, &p16, Some(&b), n, c);
                } else {
                    chunked(Tiles::Avx2, dst, x, &p32, Some(&b), n, c);
                }
                assert_eq!(out, want[..n * oc], "{n} rows (f16: {packed16})");
            }
        }
    }

    #[test]
    fn an_out_in_matrix_packs_as_its_transpose() {
        // The tied LM head: the embedding's (vocab, c) rows, packed as the (c, vocab) matrix.
        for (c, oc) in [(48, 200), (17, 64)] {
            let w = data(oc * c, 5);
            let wt: Vec<f32> = (0..c * oc).map(|k| w[(k % oc) * c + k / oc]).collect();
            let (mut a, mut b) = (vec![0.0; c * oc], vec![0.0; c * oc]);
            pack_out_in(&mut a, &w, c, oc);
            pack_in_out(&mut b, &wt, c, oc);
            assert_eq!(a, b, "c={c} oc={oc}");
            for (i, j) in [(0, 0), (c - 1, oc - 1), (3, oc - 2), (c / 2, oc / 3)] {
                assert_eq!(a[packed_index(c, oc, i, j)], w[j * c + i], "({i}, {j})");
            }
        }
    }
}
