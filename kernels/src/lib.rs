//! Ferrite's numeric core: the [`Backend`] trait, with every transformer op as a
//! forward/backward pair, and its implementations.
//!
//! This crate knows nothing of jobs, files or networks; `model` builds the GPT on top of it.
//!
//! Layout:
//! - [`Backend`]: buffers, views and the ops (encoder, layernorm, matmul, attention, GELU,
//!   residual, fused softmax + cross-entropy, AdamW, gradient norm).
//! - [`cpu`]: the readable reference and the fast CPU path (the `gemm` crate + rayon).
//! - [`cuda`]: the CUDA backend (feature `cuda`: cudarc, cuBLAS, NVRTC-compiled kernels);
//!   without the feature or without a GPU it returns [`KernelError::NoCuda`].
//!
//! Conventions shared by every backend:
//! - Buffers hold `f32`; token ids and targets are `i32`, with [`IGNORE_INDEX`] (-1) marking a
//!   target that does not count in the loss.
//! - Linear weights are stored `(in, out)` ([`WeightLayout::InOut`], GPT-2's Conv1D layout)
//!   except the tied token embedding, used as the LM head in `(out, in)` layout.
//! - Parameter gradients accumulate (`+=`), so micro-batches add up; gradients of activations
//!   returned by matmul, GELU and attention are written (`=`); layernorm's input gradient
//!   accumulates, because it lands on the residual stream that already holds a gradient.
//! - Results are deterministic for a given thread count: reductions never depend on timing.

#[macro_use]
mod math;
pub mod cpu;
pub mod cuda;

use std::ops::Range;

pub use cpu::CpuBackend;

/// Target value that contributes neither loss nor gradient (prompt tokens in finetuning).
pub const IGNORE_INDEX: i32 = -1;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no CUDA device available: {0}")]
    NoCuda(String),
    /// A CUDA call failed on a device that was usable (a launch, a copy, a kernel fault).
    #[error("CUDA error: {0}")]
    Cuda(String),
    #[error("could not start the CPU thread pool: {0}")]
    ThreadPool(String),
    #[error("buffer size mismatch: expected {expected} elements, got {got}")]
    Size { expected: usize, got: usize },
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// How a linear layer's weight matrix is laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `(in, out)`, row-major: GPT-2's Conv1D layout. `out = inp @ w`.
    InOut,
    /// `(out, in)`, row-major: the token embedding used as the LM head. `out = inp @ w^T`.
    OutIn,
}

/// How the CPU backend's linear layers multiply (`[train] matmul_precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// Exact f32 products (the gemm crate).
    #[default]
    F32,
    /// Operands rounded to bf16, products summed in f32, on AMX tiles: PyTorch's bf16
    /// autocast for the linear layers. Weights, gradients, optimizer state, attention and
    /// the rest stay f32.
    Bf16,
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(MatmulPrecision::F32),
            "bf16" => Ok(MatmulPrecision::Bf16),
            _ => Err(format!("`{s}` is not a matmul precision (f32 or bf16)")),
        }
    }
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        })
    }
}

/// Hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay; the caller passes 0 for biases and LayerNorm parameters.
    pub weight_decay: f32,
    /// Multiplies the gradient before use (gradient clipping, loss scaling).
    pub grad_scale: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
}

/// The numeric operations a device provides. Dimensions: `b` batch, `t` sequence length,
/// `c` channels, `oc` output channels, `nh` heads, `n` rows (`b * t`), `v` vocabulary and
/// `vp` padded vocabulary (the row stride of logits).
///
/// Argument order is outputs, inputs, then dimensions, the same in forward and backward.
pub trait Backend: Send + Sync {
    /// An owned device buffer of `f32`.
    type Buf: Send;
    /// An owned device buffer of `i32` (tokens, targets).
    type IBuf: Send;
    /// A read-only range of a buffer.
    type View<'a>: Copy
    where
        Self: 'a;
    /// A writable range of a buffer.
    type ViewMut<'a>
    where
        Self: 'a;

    fn name(&self) -> String;
    /// Runs `f` in the backend's execution context (the CPU backend's thread pool), so that
    /// the ops it calls start no new threads and allocate nothing.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R;

    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    fn alloc_i32(&self, len: usize) -> Result<Self::IBuf>;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, range: Range<usize>) -> Self::View<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::ViewMut<'a>;
    /// Disjoint writable ranges of one buffer; panics if they overlap (a caller bug).
    fn split_mut<'a, const N: usize>(
        &self,
        buf: &'a mut Self::Buf,
        ranges: [Range<usize>; N],
    ) -> [Self::ViewMut<'a>; N];
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    fn download(&self, src: Self::View<'_>, dst: &mut [f32]) -> Result<()>;
    fn upload_i32(&self, dst: &mut Self::IBuf, src: &[i32]) -> Result<()>;
    fn fill(&self, dst: Self::ViewMut<'_>, value: f32);

    /// out (b,t,c) = wte[tokens] + wpe[position].
    #[allow(clippy::too_many_arguments)]
    fn encoder_forward(
        &self,
        out: Self::ViewMut<'_>,
        tokens: &Self::IBuf,
        wte: Self::View<'_>,
        wpe: Self::View<'_>,
        b: usize,
        t: usize,
        c: usize,
    );
    #[allow(clippy::too_many_arguments)]
    fn encoder_backward(
        &self,
        dwte: Self::ViewMut<'_>,
        dwpe: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        tokens: &Self::IBuf,
        b: usize,
        t: usize,
        c: usize,
    );

    /// out (n,c) normalised per row; saves mean (n) and rstd (n) for backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        bias: Self::View<'_>,
        n: usize,
        c: usize,
    );
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dbias: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        n: usize,
        c: usize,
    );

    /// out (n,oc) = inp (n,c) @ weight + bias.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        bias: Option<Self::View<'_>>,
        layout: WeightLayout,
        n: usize,
        c: usize,
        oc: usize,
    );
    /// dinp (n,c) is written; dweight and dbias accumulate.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dbias: Option<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        layout: WeightLayout,
        n: usize,
        c: usize,
        oc: usize,
    );

    /// Causal multi-head attention over qkv (b,t,3c) laid out [q | k | v], heads of c/nh
    /// channels. Writes out (b,t,c) and saves the log-sum-exp of each score row in lse
    /// (b,nh,t): memory is O(t) per row, backward recomputes the probabilities.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
        qkv: Self::View<'_>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    );
    /// dqkv (b,t,3c) is written.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        qkv: Self::View<'_>,
        out: Self::View<'_>,
        lse: Self::View<'_>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    );

    /// GELU, tanh approximation (as GPT-2).
    fn gelu_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>, n: usize);
    /// dinp is written.
    fn gelu_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        dout: Self::View<'_>,
        n: usize,
    );

    /// out = a + b. Its backward is the identity on both inputs, so the model routes the
    /// gradient without a kernel.
    fn residual_forward(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>);

    /// Fused softmax + cross-entropy. Turns logits (n,vp) into probabilities in place
    /// (columns ≥ v, the padding, become 0) and writes each row's loss (0 where the target
    /// is [`IGNORE_INDEX`]).
    #[allow(clippy::too_many_arguments)]
    fn crossentropy_forward(
        &self,
        losses: Self::ViewMut<'_>,
        logits: Self::ViewMut<'_>,
        targets: &Self::IBuf,
        n: usize,
        v: usize,
        vp: usize,
    );
    /// Turns the probabilities left by forward into dlogits in place:
    /// `(p - onehot(target)) * dloss`, 0 on ignored rows and padded columns.
    fn crossentropy_backward(
        &self,
        probs: Self::ViewMut<'_>,
        targets: &Self::IBuf,
        dloss: f32,
        n: usize,
        v: usize,
        vp: usize,
    );

    /// Sum of squares (accumulated in f64), for the global gradient norm.
    fn sum_squares(&self, x: Self::View<'_>) -> f64;

    /// One fused AdamW update of `params` from `grads`, with decoupled weight decay.
    fn adamw(
        &self,
        params: Self::ViewMut<'_>,
        grads: Self::View<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        hp: &AdamW,
    );
}
