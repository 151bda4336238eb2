//! The linear layers' products through cuBLAS (f32 `sgemm`), mirroring `cpu/matmul.rs`.
//!
//! cuBLAS is column-major; a row-major (r, k) matrix is the column-major (k, r) matrix, its
//! transpose. So row-major `out = inp @ w` is computed as column-major `out^T = w^T @ inp^T`,
//! with every operand passed as stored and the transposes chosen per layout:
//!
//! | product (row-major)                 | column-major call                 | ops (InOut / OutIn) |
//! |-------------------------------------|-----------------------------------|---------------------|
//! | out (n,oc) = inp (n,c) @ W          | out^T (oc,n) = W^T · inp^T        | A: N / T, B: N      |
//! | dinp (n,c) = dout (n,oc) @ W^T      | dinp^T (c,n) = W · dout^T         | A: T / N, B: N      |
//! | dW (c,oc) += inp^T @ dout  (InOut)  | dW^T (oc,c) += dout^T · inp       | A: N, B: T          |
//! | dW (oc,c) += dout^T @ inp  (OutIn)  | dW^T (c,oc) += inp^T · dout       | A: N, B: T          |
//!
//! The calls are described by [`Gemm`] values ([`forward_calls`], [`backward_calls`]), so a
//! unit test checks the transposes and leading dimensions on the CPU, without a GPU.

use cudarc::cublas::result::sgemm;
use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::driver::sys::CUdeviceptr;

use super::backend::CudaBackend;
use crate::WeightLayout;

/// One operand of a linear layer's products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Operand {
    Inp,
    W,
    Out,
    Dout,
    Dinp,
    Dw,
}

/// One column-major `C (m,n) = A·B + beta C` call; `ta`/`tb`: whether A/B are used
/// transposed (as stored, with leading dimensions `lda`/`ldb`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Gemm {
    pub what: &'static str,
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub lda: usize,
    pub b: Operand,
    pub ldb: usize,
    pub beta: f32,
    pub c: Operand,
    pub ldc: usize,
}

/// out (n,oc) [+]= inp (n,c) @ w.
pub(super) fn forward_calls(
    layout: WeightLayout,
    accumulate: bool,
    n: usize,
    c: usize,
    oc: usize,
) -> Gemm {
    let (ta, lda) = match layout {
        WeightLayout::InOut => (false, oc),
        WeightLayout::OutIn => (true, c),
    };
    Gemm {
        what: "forward",
        ta,
        tb: false,
        m: oc,
        n,
        k: c,
        a: Operand::W,
        lda,
        b: Operand::Inp,
        ldb: c,
        beta: if accumulate { 1.0 } else { 0.0 },
        c: Operand::Out,
        ldc: oc,
    }
}

/// dinp (n,c) = dout @ w^T (written), then dw += the weight gradient in w's layout.
pub(super) fn backward_calls(layout: WeightLayout, n: usize, c: usize, oc: usize) -> [Gemm; 2] {
    let (ta, lda) = match layout {
        WeightLayout::InOut => (true, oc),
        WeightLayout::OutIn => (false, c),
    };
    let dinp = Gemm {
        what: "dinp",
        ta,
        tb: false,
        m: c,
        n,
        k: oc,
        a: Operand::W,
        lda,
        b: Operand::Dout,
        ldb: oc,
        beta: 0.0,
        c: Operand::Dinp,
        ldc: c,
    };
    let dw = match layout {
        // dW^T (oc,c) += dout^T (oc,n) · inp (n,c)
        WeightLayout::InOut => Gemm {
            what: "dweight",
            ta: false,
            tb: true,
            m: oc,
            n: c,
            k: n,
            a: Operand::Dout,
            lda: oc,
            b: Operand::Inp,
            ldb: c,
            beta: 1.0,
            c: Operand::Dw,
            ldc: oc,
        },
        // dW^T (c,oc) += inp^T (c,n) · dout (n,oc)
        WeightLayout::OutIn => Gemm {
            what: "dweight",
            ta: false,
            tb: true,
            m: c,
            n: oc,
            k: n,
            a: Operand::Inp,
            lda: c,
            b: Operand::Dout,
            ldb: oc,
            beta: 1.0,
            c: Operand::Dw,
            ldc: c,
        },
    };
    [dinp, dw]
}

fn int(x: usize) -> i32 {
    i32::try_from(x).expect("matrix dimension above i32::MAX")
}

fn op(transposed: bool) -> Op {
    if transposed {
        Op::CUBLAS_OP_T
    } else {
        Op::CUBLAS_OP_N
    }
}

impl CudaBackend {
    /// Queues one [`Gemm`] on the stream, with `ptr` giving each operand's device address.
    fn sgemm(&self, g: &Gemm, ptr: impl Fn(Operand) -> CUdeviceptr) {
        if g.m == 0 || g.n == 0 || self.bind().is_err() {
            return;
        }
        let alpha = 1.0f32;
        // SAFETY: the callers checked that every operand covers the strided range that this
        // call reads or writes; the handle is bound to this backend's stream.
        let r = unsafe {
            sgemm(
                *self.blas.handle(),
                op(g.ta),
                op(g.tb),
                int(g.m),
                int(g.n),
                int(g.k),
                &alpha,
                ptr(g.a) as *const f32,
                int(g.lda),
                ptr(g.b) as *const f32,
                int(g.ldb),
                &g.beta,
                ptr(g.c) as *mut f32,
                int(g.ldc),
            )
        };
        if let Err(e) = r {
            self.fail(format!("cuBLAS sgemm ({}, {}x{}x{}): {e:?}", g.what, g.m, g.n, g.k));
        }
    }

    /// out (n,oc) [+]= inp (n,c) @ w; accumulates onto out when `accumulate` (the bias is
    /// already broadcast into it, as the CPU reference does).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_forward(
        &self,
        out: CUdeviceptr,
        inp: CUdeviceptr,
        w: CUdeviceptr,
        accumulate: bool,
        layout: WeightLayout,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        let g = forward_calls(layout, accumulate, n, c, oc);
        self.sgemm(&g, |o| match o {
            Operand::Inp => inp,
            Operand::W => w,
            Operand::Out => out,
            Operand::Dout | Operand::Dinp | Operand::Dw => unreachable!("not a forward operand"),
        });
    }

    /// dinp (n,c) = dout @ w^T (written); dw += the weight gradient in w's layout.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_backward(
        &self,
        dinp: CUdeviceptr,
        dw: CUdeviceptr,
        dout: CUdeviceptr,
        inp: CUdeviceptr,
        w: CUdeviceptr,
        layout: WeightLayout,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        for g in backward_calls(layout, n, c, oc) {
            self.sgemm(&g, |o| match o {
                Operand::Inp => inp,
                Operand::W => w,
                Operand::Dout => dout,
                Operand::Dinp => dinp,
                Operand::Dw => dw,
                Operand::Out => unreachable!("not a backward operand"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, CpuBackend};

    /// Column-major reference of cuBLAS sgemm with alpha = 1, as its documentation defines it.
    fn sgemm_ref(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        let at = |i: usize, p: usize| if g.ta { a[p + i * g.lda] } else { a[i + p * g.lda] };
        let bt = |p: usize, j: usize| if g.tb { b[j + p * g.ldb] } else { b[p + j * g.ldb] };
        for j in 0..g.n {
            for i in 0..g.m {
                let s: f64 = (0..g.k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
                let dst = &mut c[i + j * g.ldc];
                *dst = s as f32 + if g.beta == 0.0 { 0.0 } else { g.beta * *dst };
            }
        }
    }

    fn vals(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    fn close(name: &str, got: &[f32], want: &[f32]) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{name}[{i}]: {g} vs {w}");
        }
    }

    /// The sgemm calls the CUDA backend makes, run through a column-major reference on the
    /// host, give what the CPU backend gives: transposes and leading dimensions are right for
    /// both weight layouts, in forward and backward, with and without accumulation.
    #[test]
    fn cublas_calls_match_the_cpu_matmul_in_both_layouts() {
        let cpu = CpuBackend::new(1).unwrap();
        let (n, c, oc) = (5, 3, 4);
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let (inp, w, dout) = (vals(n * c, 1), vals(c * oc, 2), vals(n * oc, 3));
            let out0 = vals(n * oc, 4);
            let dw0 = vals(c * oc, 5);
            for accumulate in [false, true] {
                let mut want = out0.clone();
                cpu.matmul_forward(&mut want, &inp, &w, None, layout, n, c, oc);
                if accumulate {
                    want.iter_mut().zip(&out0).for_each(|(x, o)| *x += o);
                }
                let mut got = out0.clone();
                let g = forward_calls(layout, accumulate, n, c, oc);
                assert_eq!((g.a, g.b, g.c), (Operand::W, Operand::Inp, Operand::Out));
                sgemm_ref(&g, &w, &inp, &mut got);
                close(&format!("{layout:?} forward acc={accumulate}"), &got, &want);
            }
            let (mut dinp, mut dw) = (vec![0.0; n * c], dw0.clone());
            cpu.matmul_backward(&mut dinp, &mut dw, None, &dout, &inp, &w, layout, n, c, oc);
            let (mut gdinp, mut gdw) = (vals(n * c, 6), dw0.clone());
            for g in backward_calls(layout, n, c, oc) {
                let pick = |o: Operand| match o {
                    Operand::Inp => inp.clone(),
                    Operand::W => w.clone(),
                    Operand::Dout => dout.clone(),
                    other => panic!("{other:?} is not an input"),
                };
                let (a, b) = (pick(g.a), pick(g.b));
                match g.c {
                    Operand::Dinp => sgemm_ref(&g, &a, &b, &mut gdinp),
                    Operand::Dw => sgemm_ref(&g, &a, &b, &mut gdw),
                    other => panic!("{other:?} is not an output"),
                }
            }
            close(&format!("{layout:?} dinp"), &gdinp, &dinp);
            close(&format!("{layout:?} dweight"), &gdw, &dw);
        }
    }
}
