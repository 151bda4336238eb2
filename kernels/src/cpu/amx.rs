//! Linear layers in bf16 on AMX tiles (Intel Xeon from Sapphire Rapids on), for
//! `MatmulPrecision::Bf16`: both operands rounded to bf16 (nearest even), every product
//! summed in f32, as PyTorch's bf16 autocast does; the master weights, gradients and the
//! optimizer stay f32.
//!
//! One product runs in two parallel passes over a scratch buffer the backend keeps:
//! 1. Packing. The left operand becomes 16-row x 32-k tiles (each row 32 bf16), the right
//!    one 16-column tiles of 16 pairs of k (`tdpbf16ps`'s layout: row p holds, for each
//!    column, its values at k = 2p and 2p + 1). A tile is 1 KiB; the tiles of one block of
//!    16 rows (or columns) follow each other along k. Either operand may be stored by rows
//!    or by columns (the backward pass reads both transposed); the second case is converted
//!    in registers and transposed 16 x 16 at a time. Zeros pad every edge.
//! 2. Products. Each task owns blocks of 32 x 32 outputs, four accumulator tiles fed by two
//!    tiles of each operand per step of 32 k. Along k the work is cut so that the packed
//!    panels of the smaller operand (the one read again for every block of the larger) fit
//!    in L2; the sums travel through `dst` between those cuts, in f32.
//!
//! Every output is summed in the same order whatever the thread count, and each row of the
//! output depends on its own row of the left operand alone.
//!
//! Decoding (`--dtype bf16`) packs each weight once ([`pack_weight`]) and, per call, only the
//! few input rows ([`forward_packed`]); up to 16 rows take one tile of inputs against four
//! of weights a step, and the weight tiles, read once from memory, are prefetched ahead.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::{Mutex, OnceLock};

use super::matmul::{Init, Mat};
use super::par_ranges;
use crate::WeightLayout;

/// Rows (or columns) of a tile.
const T: usize = 16;
/// k per tile: 16 rows of 64 bytes of bf16.
const TK: usize = 32;
/// The packed panels of the operand read again for each block of the other are cut to about
/// this many bytes a k-cut, so they stay in L2 (2 MiB a core on these Xeons).
const L2_PANEL_BYTES: usize = 1 << 20;
/// Steps along k that a streamed right operand is prefetched ahead.
const AHEAD: usize = 8;

/// One 64-byte row of a tile: 32 bf16 bit patterns.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([u16; TK]);

/// The packed operands of one product, kept between calls (grown, never shrunk).
#[derive(Default)]
pub struct Scratch(Mutex<Vec<Line>>);

/// Whether this CPU and OS run the kernels below: AMX-BF16 tiles, AVX-512 BF16 for the
/// packing, and the tile state granted to this process by Linux. Checked once.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let isa = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        // CPUID leaf 7 (present wherever AVX-512 is): EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let amx = isa && {
            let l7 = __cpuid_count(7, 0);
            l7.edx & (1 << 22) != 0 && l7.edx & (1 << 24) != 0
        };
        amx && request_tile_state()
    })
}

/// Linux saves the 8 KiB of tile registers per thread only for processes that ask:
/// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), once for all threads.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a syscall with integer arguments only.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// A raw pointer to the packed tiles that the tasks of one pass share.
#[derive(Clone, Copy)]
struct Packed(*mut Line);
unsafe impl Send for Packed {}
unsafe impl Sync for Packed {}

impl Packed {
    /// Tile `block` x `step` of an operand of `steps` tiles along k.
    #[inline]
    fn tile(self, block: usize, step: usize, steps: usize) -> *mut Line {
        self.0.wrapping_add((block * steps + step) * T)
    }
}

/// dst (m,n) (row-major, `ld` apart) = init + lhs (m,k) @ rhs (k,n), in bf16 products.
///
/// # Safety
/// `available()` is true; `dst` holds m rows of `ld` elements; lhs and rhs cover their
/// strided ranges and each has a unit stride along rows or columns.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    scratch: &Scratch,
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
    // Blocks of 32 (two tiles), so every product step has whole tile pairs.
    let (mb, nb, steps) = (m.div_ceil(2 * T), n.div_ceil(2 * T), k.div_ceil(TK));
    let (a_tiles, b_tiles) = (2 * mb * steps, 2 * nb * steps);
    let mut buf = scratch.0.lock().unwrap_or_else(|e| e.into_inner());
    if buf.len() < (a_tiles + b_tiles) * T {
        buf.resize((a_tiles + b_tiles) * T, Line([0; TK]));
    }
    let a = Packed(buf.as_mut_ptr());
    let b = Packed(buf.as_mut_ptr().wrapping_add(a_tiles * T));

    // Pass 1: whole tile blocks per task, A's and B's in one list.
    let blocks = 2 * mb + 2 * nb;
    par_ranges(blocks, threads, 1, |range| {
        for blk in range {
            // SAFETY: each block's tiles are written by this task alone, within the buffer.
            unsafe {
                if blk < 2 * mb {
                    pack_lhs(a, blk, steps, lhs, m, k);
                } else {
                    pack_rhs(b, blk - 2 * mb, steps, rhs, n, k);
                }
            }
        }
    });

    // SAFETY: the caller's bounds; the tiles are packed.
    unsafe { products::<false>(a, b, steps, m, n, dst, ld, init, threads) }
}

/// Pass 2 of a product over packed tiles: dst (m,n) = init + A @ B. The larger dimension is
/// split between tasks; the smaller one's panels are read again for every block of the
/// larger, so k is cut to keep them in L2.
///
/// # Safety
/// `available()`; a and b hold the packed tiles of (m, k) and (k, n) (`steps` along k);
/// dst holds m rows of `ld`.
#[allow(clippy::too_many_arguments)]
unsafe fn products<const STREAM: bool>(
    a: Packed,
    b: Packed,
    steps: usize,
    m: usize,
    n: usize,
    dst: *mut f32,
    ld: usize,
    init: Init,
    threads: usize,
) {
    let (mb, nb) = (m.div_ceil(2 * T), n.div_ceil(2 * T));
    let rows_outer = m >= n;
    let small = if rows_outer { nb } else { mb };
    let per_step = small * 2 * T * TK * 2;
    let cut = (L2_PANEL_BYTES / per_step.max(1)).clamp(1, steps.max(1));
    let dst = super::SendPtr(dst);
    let outer = if rows_outer { mb } else { nb };
    // Up to 16 rows (decode steps) against more columns: one row of tiles, four column
    // tiles a step.
    let one_row = m <= T && !rows_outer;
    par_ranges(outer, threads, if one_row { 2 } else { 1 }, |range| {
        // SAFETY: tasks own disjoint blocks of dst; the packed tiles are only read.
        unsafe {
            let cfg = TileConfig::new();
            cfg.load();
            let mut edge = [0f32; 4 * T * T];
            // One pass even when k = 0, so dst still gets its init.
            for s0 in (0..steps.max(1)).step_by(cut) {
                let ks = s0..(s0 + cut).min(steps);
                // The first cut starts from init, the others from the sums in dst.
                let start = match init {
                    _ if s0 > 0 => Start::Dst,
                    Init::Zero => Start::Zero,
                    Init::Dst => Start::Dst,
                    Init::Bias(b) => Start::Bias(b),
                };
                if one_row {
                    let mut o = range.start;
                    while o < range.end {
                        let out = Out { dst: dst.get(), ld, m, n, bi: 0, bj: o };
                        if o + 1 < range.end {
                            row_block::<STREAM>(a, b, steps, ks.clone(), out, start, &mut edge);
                            o += 2;
                        } else {
                            block::<STREAM>(a, b, steps, ks.clone(), out, start, &mut edge);
                            o += 1;
                        }
                    }
                    continue;
                }
                for o in range.clone() {
                    for i in 0..small {
                        let (bi, bj) = if rows_outer { (o, i) } else { (i, o) };
                        let out = Out { dst: dst.get(), ld, m, n, bi, bj };
                        block::<STREAM>(a, b, steps, ks.clone(), out, start, &mut edge);
                    }
                }
            }
            tile_release();
        }
    });
}

/// u16 elements of a (c, oc) weight packed by [`pack_weight`] (whole blocks of 32 columns
/// and of 32 along c).
pub fn weight_len(c: usize, oc: usize) -> usize {
    2 * oc.div_ceil(2 * T) * c.div_ceil(TK) * T * TK
}

/// Packs the weight `w` of a linear layer (c inputs, oc outputs; stored (c, oc) for
/// `InOut`, (oc, c) for `OutIn`) once into `dst` (bf16 bit patterns, `weight_len` long), as
/// the right operand of [`forward_packed`].
///
/// # Panics
/// When the CPU lacks AMX-BF16 or the sizes disagree.
pub fn pack_weight(dst: &mut [u16], w: &[f32], layout: WeightLayout, c: usize, oc: usize) {
    assert!(available(), "pack_weight: this CPU has no AMX-BF16");
    assert!(dst.len() == weight_len(c, oc) && w.len() == c * oc, "pack_weight: sizes");
    let rhs = match layout {
        WeightLayout::InOut => Mat { ptr: w.as_ptr(), rs: oc as isize, cs: 1 },
        WeightLayout::OutIn => Mat { ptr: w.as_ptr(), rs: 1, cs: c as isize },
    };
    let (steps, blocks) = (c.div_ceil(TK), 2 * oc.div_ceil(2 * T));
    let b = Packed(dst.as_mut_ptr().cast());
    par_ranges(blocks, rayon::current_num_threads(), 1, |range| {
        for blk in range {
            // SAFETY: AMX (asserted); each block's tiles lie in dst and are written once.
            unsafe { pack_rhs(b, blk, steps, rhs, oc, c) };
        }
    });
}

/// Element (i, j) of a (c, oc) weight packed by [`pack_weight`], as f32.
pub fn weight_at(packed: &[u16], c: usize, oc: usize, i: usize, j: usize) -> f32 {
    debug_assert!(i < c && j < oc && packed.len() == weight_len(c, oc));
    let tile = (j / T) * c.div_ceil(TK) + i / TK;
    let bits = packed[tile * T * TK + (i % TK) / 2 * TK + (j % T) * 2 + i % 2];
    f32::from_bits((bits as u32) << 16)
}

/// out (rows, oc) = inp (rows, c) @ w + bias in bf16 products, `w` packed by
/// [`pack_weight`]; the rows of `inp` are packed into `scratch` first. Runs on the calling
/// rayon pool. Each row's results depend on that row alone.
#[allow(clippy::too_many_arguments)]
pub fn forward_packed(
    scratch: &Scratch,
    out: &mut [f32],
    inp: &[f32],
    packed: &[u16],
    bias: Option<&[f32]>,
    rows: usize,
    c: usize,
    oc: usize,
) {
    assert!(available(), "forward_packed: this CPU has no AMX-BF16");
    assert!(out.len() >= rows * oc && inp.len() >= rows * c && packed.len() == weight_len(c, oc));
    assert!(bias.is_none_or(|b| b.len() >= oc));
    let (mb, steps) = (rows.div_ceil(2 * T), c.div_ceil(TK));
    let mut buf = scratch.0.lock().unwrap_or_else(|e| e.into_inner());
    if buf.len() < 2 * mb * steps * T {
        buf.resize(2 * mb * steps * T, Line([0; TK]));
    }
    let a = Packed(buf.as_mut_ptr());
    let lhs = Mat { ptr: inp.as_ptr(), rs: c as isize, cs: 1 };
    let threads = rayon::current_num_threads();
    // A decode step's few rows are packed here: another task would cost more than they do.
    let pack_threads = if rows <= 2 * T { 1 } else { threads };
    par_ranges(2 * mb, pack_threads, 1, |range| {
        for blk in range {
            // SAFETY: AMX (asserted); each block's tiles are written by this task alone.
            unsafe { pack_lhs(a, blk, steps, lhs, rows, c) };
        }
    });
    let init = match bias {
        Some(b) => Init::Bias(&b[..oc]),
        None => Init::Zero,
    };
    let b = Packed(packed.as_ptr().cast_mut().cast());
    // SAFETY: sizes asserted; the packed weight is only read.
    unsafe { products::<true>(a, b, steps, rows, oc, out.as_mut_ptr(), oc, init, threads) }
}

/// What a block's sums start from.
#[derive(Clone, Copy)]
enum Start<'a> {
    Zero,
    /// The values in dst.
    Dst,
    /// The bias (n) in every row.
    Bias(&'a [f32]),
}

/// The 32 x 32 block (bi, bj) of a row-major (m, n) output `ld` apart.
struct Out {
    dst: *mut f32,
    ld: usize,
    m: usize,
    n: usize,
    bi: usize,
    bj: usize,
}

/// dst block (+)= the block's products over the k steps `ks`; a partial block goes through
/// `edge`, zero-padded.
#[target_feature(enable = "avx512f")]
unsafe fn block<const STREAM: bool>(
    a: Packed,
    b: Packed,
    steps: usize,
    ks: Range<usize>,
    out: Out,
    start: Start,
    edge: &mut [f32; 4 * T * T],
) {
    let (r0, c0) = (out.bi * 2 * T, out.bj * 2 * T);
    let (rows, cols) = ((out.m - r0).min(2 * T), (out.n - c0).min(2 * T));
    let sums = Sums::new(&out, r0, c0, rows, cols, 2 * T, start, edge);
    let (c, cs) = (sums.c, sums.cs);
    let at = [c, c.add(T), c.add(T * cs / 4), c.add(T * cs / 4 + T)];
    sums.start(at, start, [c0, c0 + T, c0, c0 + T]);
    let (i0, j0) = (2 * out.bi, 2 * out.bj);
    let end = ks.end;
    for s in ks {
        if STREAM && s + AHEAD < end {
            prefetch(b, j0..j0 + 2, s + AHEAD, steps);
        }
        asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a.tile(i0, s, steps), a1 = in(reg) a.tile(i0 + 1, s, steps),
            b0 = in(reg) b.tile(j0, s, steps), b1 = in(reg) b.tile(j0 + 1, s, steps),
            s = in(reg) TK * 2,
            options(nostack, readonly),
        );
    }
    sums.finish(at, &out, r0, c0);
}

/// dst rows 0..m (m <= 16) x the 64 columns from block `out.bj` (+)= their products over
/// `ks`: one tile of A against four of B a step. A partial block goes through `edge`.
#[target_feature(enable = "avx512f")]
unsafe fn row_block<const STREAM: bool>(
    a: Packed,
    b: Packed,
    steps: usize,
    ks: Range<usize>,
    out: Out,
    start: Start,
    edge: &mut [f32; 4 * T * T],
) {
    let c0 = out.bj * 2 * T;
    let (rows, cols) = (out.m.min(T), (out.n - c0).min(4 * T));
    let sums = Sums::new(&out, 0, c0, rows, cols, 4 * T, start, edge);
    let c = sums.c;
    let at = [c, c.add(T), c.add(2 * T), c.add(3 * T)];
    sums.start(at, start, [c0, c0 + T, c0 + 2 * T, c0 + 3 * T]);
    let j0 = 2 * out.bj;
    let end = ks.end;
    for s in ks {
        if STREAM && s + AHEAD < end {
            prefetch(b, j0..j0 + 4, s + AHEAD, steps);
        }
        asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm5, [{b0} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm5",
            "tileloadd tmm6, [{b1} + {s}*1]",
            "tdpbf16ps tmm1, tmm4, tmm6",
            "tileloadd tmm7, [{b2} + {s}*1]",
            "tdpbf16ps tmm2, tmm4, tmm7",
            "tileloadd tmm5, [{b3} + {s}*1]",
            "tdpbf16ps tmm3, tmm4, tmm5",
            a0 = in(reg) a.tile(0, s, steps),
            b0 = in(reg) b.tile(j0, s, steps), b1 = in(reg) b.tile(j0 + 1, s, steps),
            b2 = in(reg) b.tile(j0 + 2, s, steps), b3 = in(reg) b.tile(j0 + 3, s, steps),
            s = in(reg) TK * 2,
            options(nostack, readonly),
        );
    }
    sums.finish(at, &out, 0, c0);
}

/// Asks for the tiles `blocks` x `step` of a streamed operand (read once from memory).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn prefetch(b: Packed, blocks: Range<usize>, step: usize, steps: usize) {
    for blk in blocks {
        let p = b.tile(blk, step, steps).cast::<i8>();
        for line in 0..T {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line * 64));
        }
    }
}

/// Where the four accumulator tiles of a block live between calls: in dst itself when the
/// block is whole, else in `edge` (`width` columns a row), zero-padded.
struct Sums {
    c: *mut f32,
    /// Bytes a row.
    cs: usize,
    rows: usize,
    cols: usize,
    width: usize,
    whole: bool,
}

impl Sums {
    /// The block of `rows` x `cols` (of `width` at most) at (r0, c0) of `out`; a partial
    /// one gets in `edge` what its sums start from.
    #[allow(clippy::too_many_arguments)]
    unsafe fn new(
        out: &Out,
        r0: usize,
        c0: usize,
        rows: usize,
        cols: usize,
        width: usize,
        start: Start,
        edge: &mut [f32; 4 * T * T],
    ) -> Sums {
        let whole = rows * width == edge.len() && cols == width;
        if whole {
            return Sums {
                c: out.dst.add(r0 * out.ld + c0),
                cs: out.ld * 4,
                rows,
                cols,
                width,
                whole,
            };
        }
        edge.fill(0.0);
        for r in 0..rows {
            let row = &mut edge[r * width..][..cols];
            match start {
                Start::Zero => {}
                Start::Dst => {
                    for (j, e) in row.iter_mut().enumerate() {
                        *e = *out.dst.add((r0 + r) * out.ld + c0 + j);
                    }
                }
                Start::Bias(b) => row.copy_from_slice(&b[c0..c0 + cols]),
            }
        }
        Sums { c: edge.as_mut_ptr(), cs: width * 4, rows, cols, width, whole }
    }

    /// Accumulator tiles 0..4: zeros, the four 16 x 16 blocks at `c`, or (a whole block
    /// starting from the bias) the bias from columns `cols[i]` in every row, a tile load
    /// with row stride 0.
    #[inline]
    unsafe fn start(&self, c: [*mut f32; 4], start: Start, cols: [usize; 4]) {
        let (c, cs) = match start {
            Start::Zero => {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                return;
            }
            Start::Bias(b) if self.whole => (cols.map(|j| b[j..j + T].as_ptr()), 0),
            _ => (c.map(|p| p.cast_const()), self.cs),
        };
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c1} + {s}*1]",
            "tileloadd tmm2, [{c2} + {s}*1]",
            "tileloadd tmm3, [{c3} + {s}*1]",
            c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3],
            s = in(reg) cs,
            options(nostack, readonly),
        );
    }

    /// Stores accumulator tiles 0..4 at `c`, and a partial block's valid part into dst (read
    /// back through `self.c`, the pointer the tiles were stored through).
    #[inline]
    unsafe fn finish(&self, c: [*mut f32; 4], out: &Out, r0: usize, c0: usize) {
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3],
            s = in(reg) self.cs,
            options(nostack),
        );
        if !self.whole {
            for r in 0..self.rows {
                for j in 0..self.cols {
                    *out.dst.add((r0 + r) * out.ld + c0 + j) = *self.c.add(r * self.width + j);
                }
            }
        }
    }
}

/// The tile palette: eight tiles of 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = T as u8; // rows
        }
        TileConfig(c)
    }

    /// Configures this thread's tiles.
    unsafe fn load(&self) {
        asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly));
    }
}

/// Returns this thread's tile registers to their initial state (so the OS need not save them).
unsafe fn tile_release() {
    asm!("tilerelease", options(nostack, nomem));
}

/// Mask of the first `count` (clamped to 0..=16) of 16 lanes.
#[inline]
fn lanes(count: usize) -> __mmask16 {
    ((1u32 << count.min(16)) - 1) as __mmask16
}

/// Up to 16 f32 from `p` (the first `count`), zeros after.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16(p: *const f32, count: usize) -> __m512 {
    _mm512_maskz_loadu_ps(lanes(count), p)
}

/// 32 bf16 (nearest even): lo's 16 values, then hi's.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn to_bf16(lo: __m512, hi: __m512) -> __m512i {
    std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
}

/// Up to 32 f32 from `p` (the first `count`, zeros after) as 32 bf16.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn run32(p: *const f32, count: usize) -> __m512i {
    to_bf16(load16(p, count), load16(p.wrapping_add(T), count.saturating_sub(T)))
}

/// 16 pairs (x[j], y[j]) as 32 bf16: each 32-bit lane j holds x's value low, y's high.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs(x: __m512, y: __m512) -> __m512i {
    const IDX: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut j = 0;
        while j < 16 {
            idx[2 * j] = j as u16;
            idx[2 * j + 1] = 16 + j as u16;
            j += 1;
        }
        idx
    };
    _mm512_permutexvar_epi16(_mm512_loadu_si512(IDX.as_ptr().cast()), to_bf16(x, y))
}

/// Transposes 16 x 16 32-bit lanes: row i of the result is lane i of every input, in order.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let b = 4 * g;
        t[b] = _mm512_unpacklo_epi32(r[b], r[b + 1]);
        t[b + 1] = _mm512_unpackhi_epi32(r[b], r[b + 1]);
        t[b + 2] = _mm512_unpacklo_epi32(r[b + 2], r[b + 3]);
        t[b + 3] = _mm512_unpackhi_epi32(r[b + 2], r[b + 3]);
    }
    // Lane group L of r[4g + j] now holds column 4L + j of rows 4g..4g + 4.
    for g in 0..4 {
        let b = 4 * g;
        r[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        r[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        r[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        r[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    for j in 0..4 {
        t[j] = _mm512_shuffle_i32x4::<0x88>(r[j], r[j + 4]);
        t[j + 4] = _mm512_shuffle_i32x4::<0xdd>(r[j], r[j + 4]);
        t[8 + j] = _mm512_shuffle_i32x4::<0x88>(r[8 + j], r[12 + j]);
        t[12 + j] = _mm512_shuffle_i32x4::<0xdd>(r[8 + j], r[12 + j]);
    }
    for j in 0..8 {
        r[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[8 + j]);
        r[8 + j] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[8 + j]);
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_tile(tile: *mut Line, rows: &[__m512i; 16]) {
    for (i, v) in rows.iter().enumerate() {
        _mm512_storeu_si512(tile.add(i).cast(), *v);
    }
}

/// Packs rows `16 blk..` of lhs (m, k) into A tiles: row i of a tile holds 32 k.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_lhs(a: Packed, blk: usize, steps: usize, lhs: Mat, m: usize, k: usize) {
    debug_assert!(lhs.cs == 1 || lhs.rs == 1, "lhs has a unit stride");
    let i0 = blk * T;
    let rows = m.saturating_sub(i0).min(T);
    let at =
        |i: usize, kk: usize| lhs.ptr.wrapping_offset(i as isize * lhs.rs + kk as isize * lhs.cs);
    let mut v = [_mm512_setzero_si512(); 16];
    for s in 0..steps {
        let k0 = s * TK;
        let kn = k - k0; // > 0
        if lhs.cs == 1 {
            // Rows hold k: two loads of 16 k a tile row.
            for (r, row) in v.iter_mut().enumerate() {
                *row = if r < rows { run32(at(i0 + r, k0), kn) } else { _mm512_setzero_si512() };
            }
        } else {
            // Columns hold the rows: pair q of k across the 16 rows, then transpose.
            for (q, col) in v.iter_mut().enumerate() {
                let (ka, kb) = (2 * q, 2 * q + 1);
                let x = if ka < kn { load16(at(i0, k0 + ka), rows) } else { _mm512_setzero_ps() };
                let y = if kb < kn { load16(at(i0, k0 + kb), rows) } else { _mm512_setzero_ps() };
                *col = pairs(x, y);
            }
            transpose16(&mut v);
        }
        store_tile(a.tile(blk, s, steps), &v);
    }
}

/// Packs columns `16 blk..` of rhs (k, n) into B tiles: row p holds, for each of the 16
/// columns, its values at k = 2p and 2p + 1.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rhs(b: Packed, blk: usize, steps: usize, rhs: Mat, n: usize, k: usize) {
    debug_assert!(rhs.cs == 1 || rhs.rs == 1, "rhs has a unit stride");
    let j0 = blk * T;
    let cols = n.saturating_sub(j0).min(T);
    let at =
        |kk: usize, j: usize| rhs.ptr.wrapping_offset(kk as isize * rhs.rs + j as isize * rhs.cs);
    let mut v = [_mm512_setzero_si512(); 16];
    for s in 0..steps {
        let k0 = s * TK;
        let kn = k - k0;
        if rhs.cs == 1 {
            // Rows hold the columns: two rows of k make a tile row.
            for (p, row) in v.iter_mut().enumerate() {
                let (ka, kb) = (2 * p, 2 * p + 1);
                let x = if ka < kn { load16(at(k0 + ka, j0), cols) } else { _mm512_setzero_ps() };
                let y = if kb < kn { load16(at(k0 + kb, j0), cols) } else { _mm512_setzero_ps() };
                *row = pairs(x, y);
            }
        } else {
            // Columns hold k: 32 k of column j are its 16 pairs, then transpose.
            for (j, col) in v.iter_mut().enumerate() {
                *col = if j < cols { run32(at(k0, j0 + j), kn) } else { _mm512_setzero_si512() };
            }
            transpose16(&mut v);
        }
        store_tile(b.tile(blk, s, steps), &v);
    }
}
