//! The CPU backend: plain slices, the `gemm` crate for matrix products and a rayon pool of
//! a fixed size. Each op's module holds its forward and backward side by side.

mod adamw;
#[cfg(target_arch = "x86_64")]
pub mod amx;
/// No AMX tiles off x86-64: bf16 products are never in effect there (`available()` is false,
/// and the rest is not reached).
#[cfg(not(target_arch = "x86_64"))]
pub mod amx {
    use crate::WeightLayout;

    #[derive(Default)]
    pub struct Scratch;
    pub fn available() -> bool {
        false
    }
    pub fn weight_len(c: usize, oc: usize) -> usize {
        c * oc
    }
    pub fn pack_weight(_: &mut [u16], _: &[f32], _: WeightLayout, _: usize, _: usize) {
        unreachable!("no AMX-BF16 off x86-64")
    }
    pub fn weight_at(_: &[u16], _: usize, _: usize, _: usize, _: usize) -> f32 {
        unreachable!("no AMX-BF16 off x86-64")
    }
    #[allow(clippy::too_many_arguments)]
    pub fn forward_packed(
        _: &Scratch,
        _: &mut [f32],
        _: &[f32],
        _: &[u16],
        _: Option<&[f32]>,
        _: usize,
        _: usize,
        _: usize,
    ) {
        unreachable!("no AMX-BF16 off x86-64")
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        _: &Scratch,
        _: usize,
        _: usize,
        _: usize,
        _: *mut f32,
        _: usize,
        _: super::matmul::Init,
        _: super::matmul::Mat,
        _: super::matmul::Mat,
        _: usize,
    ) {
        unreachable!("no Scratch is made where AMX is unavailable")
    }
}
mod attention;
mod crossentropy;
mod encoder;
mod gelu;
mod kv_attention;
mod layernorm;
mod matmul;
pub mod matvec;
mod pages;
mod softmax;

use std::ops::Range;

use rayon::prelude::*;

use crate::{AdamW, Backend, KernelError, MatmulPrecision, Result, WeightLayout};

pub use attention::MAX_SEQ_LEN;
pub use half::f16;
pub use kv_attention::{attention_cached, key_cache_len, store_keys, CachedSeq};
pub use matvec::Weight;
pub use pages::HugePageBuf;
pub use softmax::{exp, exp_shifted, log_sum_exp};

/// Rows below this many elements are not worth sending to another thread.
const MIN_PAR_ELEMS: usize = 1 << 14;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    /// The packed operands of bf16 products; `None` while the linear layers run in f32.
    bf16: Option<amx::Scratch>,
}

impl CpuBackend {
    /// A backend with its own pool of `threads` threads (0: one per core).
    pub fn new(threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ferrite-cpu-{i}"))
            .build()
            .map_err(|e| KernelError::ThreadPool(e.to_string()))?;
        let threads = pool.current_num_threads();
        Ok(CpuBackend { pool, threads, bf16: None })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Sets how the linear layers multiply and returns the precision in effect: bf16 needs
    /// AMX-BF16 (Intel Xeon from Sapphire Rapids on); elsewhere they stay f32.
    pub fn set_matmul_precision(&mut self, p: MatmulPrecision) -> MatmulPrecision {
        self.bf16 = match p {
            MatmulPrecision::Bf16 if amx::available() => Some(amx::Scratch::default()),
            _ => None,
        };
        self.matmul_precision()
    }

    pub fn matmul_precision(&self) -> MatmulPrecision {
        match self.bf16 {
            Some(_) => MatmulPrecision::Bf16,
            None => MatmulPrecision::F32,
        }
    }
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer; a method, so closures capture the whole (Send) wrapper.
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `f(range)` in parallel over `parts` contiguous pieces of `0..len` whose starts are
/// multiples of `align` (fewer pieces when `len` is small). Allocates nothing.
pub(crate) fn par_ranges(len: usize, parts: usize, align: usize, f: impl Fn(Range<usize>) + Sync) {
    let per = len.div_ceil(parts.max(1)).div_ceil(align).max(1) * align;
    let count = len.div_ceil(per);
    (0..count).into_par_iter().for_each(|i| f(i * per..((i + 1) * per).min(len)));
}

/// Runs `f(row_index, row)` over the rows of `out`, in parallel when it is large enough.
pub(crate) fn for_rows(out: &mut [f32], row: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() < MIN_PAR_ELEMS {
        out.chunks_mut(row).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        let min_rows = (MIN_PAR_ELEMS / row.max(1)).max(1);
        out.par_chunks_mut(row).with_min_len(min_rows).enumerate().for_each(|(i, r)| f(i, r));
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type IBuf = Vec<i32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> String {
        match self.bf16 {
            Some(_) => format!("cpu ({} threads, bf16 matmuls on AMX)", self.threads),
            None => format!("cpu ({} threads)", self.threads),
        }
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn alloc_i32(&self, len: usize) -> Result<Vec<i32>> {
        Ok(vec![0; len])
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }

    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }

    fn split_mut<'a, const N: usize>(
        &self,
        buf: &'a mut Vec<f32>,
        ranges: [Range<usize>; N],
    ) -> [&'a mut [f32]; N] {
        for (i, a) in ranges.iter().enumerate() {
            assert!(a.end <= buf.len(), "range {a:?} out of a buffer of {}", buf.len());
            for b in &ranges[i + 1..] {
                assert!(a.end <= b.start || b.end <= a.start, "overlapping {a:?} and {b:?}");
            }
        }
        let base = buf.as_mut_ptr();
        // SAFETY: the ranges are in bounds and pairwise disjoint (checked above), and the
        // returned slices borrow `buf` mutably for 'a.
        ranges.map(|r| unsafe { std::slice::from_raw_parts_mut(base.add(r.start), r.len()) })
    }

    fn upload(&self, dst: &mut Vec<f32>, src: &[f32]) -> Result<()> {
        check_len(dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        check_len(dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn upload_i32(&self, dst: &mut Vec<i32>, src: &[i32]) -> Result<()> {
        check_len(dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn fill(&self, dst: &mut [f32], value: f32) {
        if dst.len() < MIN_PAR_ELEMS {
            dst.fill(value);
        } else {
            dst.par_chunks_mut(MIN_PAR_ELEMS).for_each(|c| c.fill(value));
        }
    }

    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &Vec<i32>,
        wte: &[f32],
        wpe: &[f32],
        b: usize,
        t: usize,
        c: usize,
    ) {
        encoder::forward(out, tokens, wte, wpe, b, t, c)
    }

    fn encoder_backward(
        &self,
        dwte: &mut [f32],
        dwpe: &mut [f32],
        dout: &[f32],
        tokens: &Vec<i32>,
        b: usize,
        t: usize,
        c: usize,
    ) {
        encoder::backward(dwte, dwpe, dout, tokens, b, t, c)
    }

    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        n: usize,
        c: usize,
    ) {
        layernorm::forward(out, mean, rstd, inp, weight, bias, n, c)
    }

    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        n: usize,
        c: usize,
    ) {
        layernorm::backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c)
    }

    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        layout: WeightLayout,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        matmul::forward(self.bf16.as_ref(), out, inp, weight, bias, layout, n, c, oc, self.threads)
    }

    fn matmul_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        layout: WeightLayout,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        matmul::backward(
            self.bf16.as_ref(),
            dinp,
            dweight,
            dbias,
            dout,
            inp,
            weight,
            layout,
            n,
            c,
            oc,
            self.threads,
        )
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        qkv: &[f32],
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) {
        attention::forward(out, lse, qkv, b, t, c, nh)
    }

    fn attention_backward(
        &self,
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
        attention::backward(dqkv, dout, qkv, out, lse, b, t, c, nh)
    }

    fn gelu_forward(&self, out: &mut [f32], inp: &[f32], n: usize) {
        gelu::forward(&mut out[..n], &inp[..n])
    }

    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], n: usize) {
        gelu::backward(&mut dinp[..n], &inp[..n], &dout[..n])
    }

    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        assert!(a.len() == out.len() && b.len() == out.len());
        let chunk = MIN_PAR_ELEMS;
        let go = |(i, o): (usize, &mut [f32])| {
            let s = i * chunk;
            for ((o, x), y) in o.iter_mut().zip(&a[s..]).zip(&b[s..]) {
                *o = x + y;
            }
        };
        if out.len() < chunk {
            out.chunks_mut(chunk).enumerate().for_each(go);
        } else {
            out.par_chunks_mut(chunk).enumerate().for_each(go);
        }
    }

    fn crossentropy_forward(
        &self,
        losses: &mut [f32],
        logits: &mut [f32],
        targets: &Vec<i32>,
        n: usize,
        v: usize,
        vp: usize,
    ) {
        crossentropy::forward(losses, logits, targets, n, v, vp)
    }

    fn crossentropy_backward(
        &self,
        probs: &mut [f32],
        targets: &Vec<i32>,
        dloss: f32,
        n: usize,
        v: usize,
        vp: usize,
    ) {
        crossentropy::backward(probs, targets, dloss, n, v, vp)
    }

    fn sum_squares(&self, x: &[f32]) -> f64 {
        // A fixed partition summed in order: the same bits for any thread count, and no
        // allocation.
        const PARTS: usize = 64;
        let mut partial = [0.0f64; PARTS];
        let per = x.len().div_ceil(PARTS).max(1);
        partial.par_iter_mut().enumerate().for_each(|(i, p)| {
            let lo = (i * per).min(x.len());
            let hi = ((i + 1) * per).min(x.len());
            *p = x[lo..hi].iter().map(|&g| (g as f64) * (g as f64)).sum();
        });
        partial.iter().sum()
    }

    fn adamw(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamW) {
        adamw::update(params, grads, m, v, hp)
    }
}

fn check_len(expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Size { expected, got })
    }
}
