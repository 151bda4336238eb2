//! [`Backend`] for [`CudaBackend`]: each op checks its sizes against the views (a caller bug
//! panics, as the CPU backend's slicing does) and queues its kernels from `kernels/*.cu` with
//! the launch geometry each kernel's comment states. Matmuls are in `blas.rs`.

use std::ops::Range;

use cudarc::driver::CudaSlice;

use super::backend::{p, CudaBackend, CudaIBuf, CudaView, CudaViewMut};
use crate::{AdamW, Backend, Result, WeightLayout, IGNORE_INDEX};

/// Threads per block of the 1-D elementwise kernels.
const BLOCK: u32 = 256;
/// Largest head size attention.cu handles (its ATT_HS_MAX).
pub const ATT_HS_MAX: usize = 128;

fn blocks(n: usize, per: usize) -> u32 {
    u32::try_from(n.div_ceil(per)).expect("grid too large for one launch")
}

fn i32_of(x: usize) -> i32 {
    i32::try_from(x).expect("dimension above i32::MAX")
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type IBuf = CudaIBuf;
    type View<'a> = CudaView<'a>;
    type ViewMut<'a> = CudaViewMut<'a>;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal(), self.device_name())
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        // Ops bind the context themselves; binding here saves nothing but documents intent.
        let _ = self.bind();
        f()
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.alloc_f32(len)
    }

    fn alloc_i32(&self, len: usize) -> Result<CudaIBuf> {
        self.alloc_i32_buf(len)
    }

    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn view<'a>(&self, buf: &'a CudaSlice<f32>, range: Range<usize>) -> CudaView<'a> {
        self.view_of(buf, range)
    }

    fn view_mut<'a>(&self, buf: &'a mut CudaSlice<f32>, range: Range<usize>) -> CudaViewMut<'a> {
        self.view_mut_of(buf, range)
    }

    fn split_mut<'a, const N: usize>(
        &self,
        buf: &'a mut CudaSlice<f32>,
        ranges: [Range<usize>; N],
    ) -> [CudaViewMut<'a>; N] {
        self.split_of(buf, ranges)
    }

    fn upload(&self, dst: &mut CudaSlice<f32>, src: &[f32]) -> Result<()> {
        self.upload_f32(dst, src)
    }

    fn download(&self, src: CudaView<'_>, dst: &mut [f32]) -> Result<()> {
        self.download_f32(src, dst)
    }

    fn upload_i32(&self, dst: &mut CudaIBuf, src: &[i32]) -> Result<()> {
        self.upload_i32_buf(dst, src)
    }

    fn fill(&self, dst: CudaViewMut<'_>, value: f32) {
        self.fill_f32(dst, value)
    }

    fn encoder_forward(
        &self,
        out: CudaViewMut<'_>,
        tokens: &CudaIBuf,
        wte: CudaView<'_>,
        wpe: CudaView<'_>,
        b: usize,
        t: usize,
        c: usize,
    ) {
        let n = b * t * c;
        assert!(out.len >= n && tokens.host.len() >= b * t && wpe.len >= t * c);
        assert!(tokens.host[..b * t].iter().all(|&x| x >= 0 && (x as usize + 1) * c <= wte.len));
        let tok = self.base(&tokens.dev);
        self.launch(
            "encoder",
            "encoder_forward",
            (blocks(n, 256), 1, 1),
            (BLOCK, 1, 1),
            &mut [
                p(&out.ptr),
                p(&tok),
                p(&wte.ptr),
                p(&wpe.ptr),
                p(&i32_of(b)),
                p(&i32_of(t)),
                p(&i32_of(c)),
            ],
        );
    }

    fn encoder_backward(
        &self,
        dwte: CudaViewMut<'_>,
        dwpe: CudaViewMut<'_>,
        dout: CudaView<'_>,
        tokens: &CudaIBuf,
        b: usize,
        t: usize,
        c: usize,
    ) {
        let n = b * t;
        assert!(dout.len >= n * c && dwpe.len >= t * c && tokens.host.len() >= n);
        assert!(tokens.host[..n].iter().all(|&x| x >= 0 && (x as usize + 1) * c <= dwte.len));
        self.launch(
            "encoder",
            "encoder_backward_wpe",
            (blocks(t * c, 256), 1, 1),
            (BLOCK, 1, 1),
            &mut [p(&dwpe.ptr), p(&dout.ptr), p(&i32_of(b)), p(&i32_of(t)), p(&i32_of(c))],
        );
        if n == 0 {
            return;
        }
        // Bucket positions by token on the host, then one block row per bucket.
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *s;
        let n_buckets = bucket_by_token(&tokens.host[..n], &mut s.host_order, &mut s.host_starts);
        let staged = self
            .bind()
            .map_err(|e| e.to_string())
            .and_then(|()| self.stage_i32(&mut s.order, &s.host_order))
            .and_then(|o| Ok((o, self.stage_i32(&mut s.starts, &s.host_starts)?)));
        let (order, starts) = match staged {
            Ok(x) => x,
            Err(msg) => return self.fail(format!("encoder_backward: {msg}")),
        };
        let tok = self.base(&tokens.dev);
        self.launch(
            "encoder",
            "encoder_backward_wte",
            (u32::try_from(n_buckets).expect("buckets"), blocks(c, 256), 1),
            (BLOCK, 1, 1),
            &mut [
                p(&dwte.ptr),
                p(&dout.ptr),
                p(&tok),
                p(&order),
                p(&starts),
                p(&i32_of(n_buckets)),
                p(&i32_of(c)),
            ],
        );
    }

    fn layernorm_forward(
        &self,
        out: CudaViewMut<'_>,
        mean: CudaViewMut<'_>,
        rstd: CudaViewMut<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        bias: CudaView<'_>,
        n: usize,
        c: usize,
    ) {
        assert!(out.len >= n * c && inp.len >= n * c && mean.len >= n && rstd.len >= n);
        assert!(weight.len >= c && bias.len >= c);
        self.launch(
            "layernorm",
            "layernorm_forward",
            (blocks(n, 8), 1, 1),
            (BLOCK, 1, 1),
            &mut [
                p(&out.ptr),
                p(&mean.ptr),
                p(&rstd.ptr),
                p(&inp.ptr),
                p(&weight.ptr),
                p(&bias.ptr),
                p(&i32_of(n)),
                p(&i32_of(c)),
            ],
        );
    }

    fn layernorm_backward(
        &self,
        dinp: CudaViewMut<'_>,
        dweight: CudaViewMut<'_>,
        dbias: CudaViewMut<'_>,
        dout: CudaView<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        mean: CudaView<'_>,
        rstd: CudaView<'_>,
        n: usize,
        c: usize,
    ) {
        assert!(dinp.len >= n * c && dout.len >= n * c && inp.len >= n * c);
        assert!(dweight.len >= c && dbias.len >= c && weight.len >= c);
        assert!(mean.len >= n && rstd.len >= n);
        let (ni, ci) = (i32_of(n), i32_of(c));
        self.launch(
            "layernorm",
            "layernorm_backward_dinp",
            (blocks(n, 8), 1, 1),
            (BLOCK, 1, 1),
            &mut [
                p(&dinp.ptr),
                p(&dout.ptr),
                p(&inp.ptr),
                p(&weight.ptr),
                p(&mean.ptr),
                p(&rstd.ptr),
                p(&ni),
                p(&ci),
            ],
        );
        self.launch(
            "layernorm",
            "layernorm_backward_params",
            (blocks(c, 32), 1, 1),
            (32, 16, 1),
            &mut [
                p(&dweight.ptr),
                p(&dbias.ptr),
                p(&dout.ptr),
                p(&inp.ptr),
                p(&mean.ptr),
                p(&rstd.ptr),
                p(&ni),
                p(&ci),
            ],
        );
    }

    fn matmul_forward(
        &self,
        out: CudaViewMut<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        bias: Option<CudaView<'_>>,
        layout: WeightLayout,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        assert!(out.len >= n * oc && inp.len >= n * c && weight.len >= c * oc);
        if let Some(bias) = bias {
            assert!(bias.len >= oc);
            self.launch(
                "bias",
                "bias_broadcast",
                (blocks(n * oc, 256), 1, 1),
                (BLOCK, 1, 1),
                &mut [p(&out.ptr), p(&bias.ptr), p(&i32_of(n)), p(&i32_of(oc))],
            );
        }
        self.gemm_forward(out.ptr, inp.ptr, weight.ptr, bias.is_some(), layout, n, c, oc);
    }

    fn matmul_backward(
        &self,
        dinp: CudaViewMut<'_>,
        dweight: CudaViewMut<'_>,
        dbias: Option<CudaViewMut<'_>>,
        dout: CudaView<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        layout: WeightLayout,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        assert!(dinp.len >= n * c && dout.len >= n * oc && inp.len >= n * c);
        assert!(dweight.len >= c * oc && weight.len >= c * oc);
        self.gemm_backward(dinp.ptr, dweight.ptr, dout.ptr, inp.ptr, weight.ptr, layout, n, c, oc);
        if let Some(db) = dbias {
            assert!(db.len >= oc);
            self.launch(
                "bias",
                "bias_backward",
                (blocks(oc, 32), 1, 1),
                (32, 32, 1),
                &mut [p(&db.ptr), p(&dout.ptr), p(&i32_of(n)), p(&i32_of(oc))],
            );
        }
    }

    fn attention_forward(
        &self,
        out: CudaViewMut<'_>,
        lse: CudaViewMut<'_>,
        qkv: CudaView<'_>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) {
        assert!(out.len >= b * t * c && lse.len >= b * nh * t && qkv.len >= b * t * 3 * c);
        if !self.attention_fits(c, nh) {
            return;
        }
        self.launch(
            "attention",
            "attention_forward",
            (blocks(t, 16), u32::try_from(b * nh).expect("grid"), 1),
            (BLOCK, 1, 1),
            &mut [
                p(&out.ptr),
                p(&lse.ptr),
                p(&qkv.ptr),
                p(&i32_of(b)),
                p(&i32_of(t)),
                p(&i32_of(c)),
                p(&i32_of(nh)),
            ],
        );
    }

    fn attention_backward(
        &self,
        dqkv: CudaViewMut<'_>,
        dout: CudaView<'_>,
        qkv: CudaView<'_>,
        out: CudaView<'_>,
        lse: CudaView<'_>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) {
        assert!(dqkv.len >= b * t * 3 * c && qkv.len >= b * t * 3 * c);
        assert!(dout.len >= b * t * c && out.len >= b * t * c && lse.len >= b * nh * t);
        if !self.attention_fits(c, nh) {
            return;
        }
        let bh = u32::try_from(b * nh).expect("grid");
        let (bi, ti, ci, nhi) = (i32_of(b), i32_of(t), i32_of(c), i32_of(nh));
        for (entry, rows) in [("attention_backward_dq", 8), ("attention_backward_dkv", 8)] {
            self.launch(
                "attention",
                entry,
                (blocks(t, rows), bh, 1),
                (BLOCK, 1, 1),
                &mut [
                    p(&dqkv.ptr),
                    p(&dout.ptr),
                    p(&qkv.ptr),
                    p(&out.ptr),
                    p(&lse.ptr),
                    p(&bi),
                    p(&ti),
                    p(&ci),
                    p(&nhi),
                ],
            );
        }
    }

    fn gelu_forward(&self, out: CudaViewMut<'_>, inp: CudaView<'_>, n: usize) {
        assert!(out.len >= n && inp.len >= n);
        self.launch(
            "gelu",
            "gelu_forward",
            (blocks(n, 256), 1, 1),
            (BLOCK, 1, 1),
            &mut [p(&out.ptr), p(&inp.ptr), p(&(n as u64))],
        );
    }

    fn gelu_backward(
        &self,
        dinp: CudaViewMut<'_>,
        inp: CudaView<'_>,
        dout: CudaView<'_>,
        n: usize,
    ) {
        assert!(dinp.len >= n && inp.len >= n && dout.len >= n);
        self.launch(
            "gelu",
            "gelu_backward",
            (blocks(n, 256), 1, 1),
            (BLOCK, 1, 1),
            &mut [p(&dinp.ptr), p(&inp.ptr), p(&dout.ptr), p(&(n as u64))],
        );
    }

    fn residual_forward(&self, out: CudaViewMut<'_>, a: CudaView<'_>, b: CudaView<'_>) {
        assert!(a.len == out.len && b.len == out.len);
        let n = out.len;
        self.launch(
            "residual",
            "residual_forward",
            (blocks(n, 256), 1, 1),
            (BLOCK, 1, 1),
            &mut [p(&out.ptr), p(&a.ptr), p(&b.ptr), p(&(n as u64))],
        );
    }

    fn crossentropy_forward(
        &self,
        losses: CudaViewMut<'_>,
        logits: CudaViewMut<'_>,
        targets: &CudaIBuf,
        n: usize,
        v: usize,
        vp: usize,
    ) {
        assert!(losses.len >= n && logits.len >= n * vp && targets.host.len() >= n && v <= vp);
        let tg = self.base(&targets.dev);
        self.launch(
            "crossentropy",
            "crossentropy_forward",
            (u32::try_from(n).expect("grid"), 1, 1),
            (BLOCK, 1, 1),
            &mut [
                p(&losses.ptr),
                p(&logits.ptr),
                p(&tg),
                p(&i32_of(n)),
                p(&i32_of(v)),
                p(&i32_of(vp)),
            ],
        );
    }

    fn crossentropy_backward(
        &self,
        probs: CudaViewMut<'_>,
        targets: &CudaIBuf,
        dloss: f32,
        n: usize,
        v: usize,
        vp: usize,
    ) {
        assert!(probs.len >= n * vp && targets.host.len() >= n && v <= vp);
        const { assert!(IGNORE_INDEX == -1, "crossentropy.cu hard-codes the ignore index") };
        let tg = self.base(&targets.dev);
        self.launch(
            "crossentropy",
            "crossentropy_backward",
            (blocks(n * vp, 256), 1, 1),
            (BLOCK, 1, 1),
            &mut [p(&probs.ptr), p(&tg), p(&dloss), p(&i32_of(n)), p(&i32_of(v)), p(&i32_of(vp))],
        );
    }

    fn sum_squares(&self, x: CudaView<'_>) -> f64 {
        let s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let g = self.norm_blocks;
        let partials = self.base(&s.norm);
        let total = partials + 8 * g as u64;
        self.launch(
            "global_norm",
            "sum_squares_partial",
            (g, 1, 1),
            (BLOCK, 1, 1),
            &mut [p(&partials), p(&x.ptr), p(&(x.len as u64))],
        );
        self.launch(
            "global_norm",
            "sum_squares_final",
            (1, 1, 1),
            (BLOCK, 1, 1),
            &mut [p(&total), p(&partials), p(&(g as i32))],
        );
        let mut out = [0.0f64];
        let copied = self.bind().and_then(|()| {
            // SAFETY: `total` is the last f64 of the scratch buffer, alive while `s` is held.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut out[..],
                    total,
                    self.stream.cu_stream(),
                )
            }
            .and_then(|()| self.stream.synchronize())
            .map_err(|e| self.driver_err("sum_squares", e))
        });
        // The op cannot return an error: a NaN norm stops clipping from hiding it, and the
        // error itself is reported by the next fallible call.
        match copied.and_then(|()| self.check()) {
            Ok(()) => out[0],
            Err(_) => f64::NAN,
        }
    }

    fn adamw(
        &self,
        params: CudaViewMut<'_>,
        grads: CudaView<'_>,
        m: CudaViewMut<'_>,
        v: CudaViewMut<'_>,
        hp: &AdamW,
    ) {
        let n = params.len;
        assert!(grads.len == n && m.len == n && v.len == n);
        // Bias corrections in f32 on the host, exactly as the CPU reference computes them.
        let bc1 = 1.0 - hp.beta1.powi(hp.step as i32);
        let bc2 = 1.0 - hp.beta2.powi(hp.step as i32);
        self.launch(
            "adamw",
            "adamw",
            (blocks(n, 256), 1, 1),
            (BLOCK, 1, 1),
            &mut [
                p(&params.ptr),
                p(&grads.ptr),
                p(&m.ptr),
                p(&v.ptr),
                p(&(n as u64)),
                p(&hp.lr),
                p(&hp.beta1),
                p(&hp.beta2),
                p(&hp.eps),
                p(&hp.weight_decay),
                p(&hp.grad_scale),
                p(&bc1),
                p(&bc2),
            ],
        );
    }
}

/// Groups the positions of `tokens` by token for `encoder_backward_wte`: `order` lists every
/// position, grouped by token and ascending inside a group (a stable sort: the CPU
/// reference's summation order); group k is `order[starts[k]..starts[k + 1]]`. Returns the
/// number of groups. Reuses the two vectors' allocations.
pub(super) fn bucket_by_token(
    tokens: &[i32],
    order: &mut Vec<i32>,
    starts: &mut Vec<i32>,
) -> usize {
    order.clear();
    order.extend(0..tokens.len() as i32);
    order.sort_by_key(|&i| tokens[i as usize]);
    starts.clear();
    for (k, &pos) in order.iter().enumerate() {
        if k == 0 || tokens[pos as usize] != tokens[order[k - 1] as usize] {
            starts.push(k as i32);
        }
    }
    let groups = starts.len();
    starts.push(tokens.len() as i32);
    groups
}

impl CudaBackend {
    /// attention.cu holds a head in registers and static shared memory sized for
    /// [`ATT_HS_MAX`] channels.
    fn attention_fits(&self, c: usize, nh: usize) -> bool {
        if nh == 0 || !c.is_multiple_of(nh) || c / nh > ATT_HS_MAX {
            self.fail(format!(
                "attention: head size {c}/{nh} is not a whole number at most {ATT_HS_MAX}"
            ));
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_by_token;

    /// Runs without a GPU: every position lands in exactly one group, a group holds one
    /// token, positions ascend inside it, and the groups are the distinct tokens.
    #[test]
    fn bucket_by_token_groups_positions_in_order() {
        let tokens = [5, 3, 5, 0, 3, 5, 9, 0];
        let (mut order, mut starts) = (vec![99; 3], vec![]);
        let groups = bucket_by_token(&tokens, &mut order, &mut starts);
        assert_eq!(groups, 4);
        assert_eq!(order, [3, 7, 1, 4, 0, 2, 5, 6]);
        assert_eq!(starts, [0, 2, 4, 7, 8]);
        for k in 0..groups {
            let g = &order[starts[k] as usize..starts[k + 1] as usize];
            assert!(g
                .windows(2)
                .all(|w| w[0] < w[1] && tokens[w[0] as usize] == tokens[w[1] as usize]));
        }
        assert_eq!(bucket_by_token(&[], &mut order, &mut starts), 0);
        assert_eq!(starts, [0]);
    }
}
