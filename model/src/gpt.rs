//! The GPT: parameters, gradients and AdamW moments each in one contiguous buffer,
//! activations in buffers sized once from (batch, sequence length); forward and backward
//! are written once over [`Backend`].

use std::ops::Range;

use ferrite_kernels::{AdamW, Backend, WeightLayout, IGNORE_INDEX};

use crate::layout::{ParamLayout, Tensor};
use crate::rng::Rng;
use crate::{GptConfig, ModelError};

/// Told by [`Gpt::backward_with`] which gradient ranges are final, with the gradients.
pub type GradsReady<'a, Buf> = dyn FnMut(&Buf, &[Range<usize>]) + 'a;

/// Activations of one block, saved by forward for backward.
struct LayerActs<B: Backend> {
    ln1: B::Buf,       // (B, T, C)
    ln1_mean: B::Buf,  // (B, T)
    ln1_rstd: B::Buf,  // (B, T)
    qkv: B::Buf,       // (B, T, 3C)
    atty: B::Buf,      // (B, T, C)
    lse: B::Buf,       // (B, NH, T)
    resid_mid: B::Buf, // (B, T, C) the residual stream between attention and MLP
    ln2: B::Buf,       // (B, T, C)
    ln2_mean: B::Buf,  // (B, T)
    ln2_rstd: B::Buf,  // (B, T)
    fch: B::Buf,       // (B, T, 4C)
    fch_gelu: B::Buf,  // (B, T, 4C)
    resid_out: B::Buf, // (B, T, C) the block's output
}

/// Everything sized from (B, T): allocated once, reused every step.
struct Acts<B: Backend> {
    tokens: B::IBuf,  // (B, T)
    targets: B::IBuf, // (B, T)
    encoded: B::Buf,  // (B, T, C)
    layers: Vec<LayerActs<B>>,
    proj: B::Buf,     // (B, T, C) attention / MLP projection before the residual add
    lnf: B::Buf,      // (B, T, C)
    lnf_mean: B::Buf, // (B, T)
    lnf_rstd: B::Buf, // (B, T)
    logits: B::Buf,   // (B, T, Vp); probabilities after the loss, then dlogits
    losses: B::Buf,   // (B, T)
    // Gradient scratch for backward.
    dres: B::Buf,   // (B, T, C) gradient of the residual stream
    dsmall: B::Buf, // (B, T, C)
    dqkv: B::Buf,   // (B, T, 3C)
    dbig1: B::Buf,  // (B, T, 4C)
    dbig2: B::Buf,  // (B, T, 4C)
}

/// What a forward pass with targets measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loss {
    /// Mean cross-entropy over the counted targets.
    pub mean: f32,
    /// Targets that counted (not [`IGNORE_INDEX`]).
    pub counted: usize,
}

pub struct Gpt<B: Backend> {
    pub cfg: GptConfig,
    pub layout: ParamLayout,
    pub params: B::Buf,
    pub grads: B::Buf,
    pub m: B::Buf,
    pub v: B::Buf,
    acts: Acts<B>,
    /// Batch and sequence length the activations were sized for.
    max_b: usize,
    max_t: usize,
    /// Sizes of the last forward, for backward.
    last: Option<(usize, usize)>,
    host_losses: Vec<f32>,
    host_targets: Vec<i32>,
}

impl<B: Backend> Gpt<B> {
    /// A model with zeroed parameters and activations for batches up to (max_b, max_t).
    pub fn new(be: &B, cfg: GptConfig, max_b: usize, max_t: usize) -> Result<Self, ModelError> {
        cfg.validate()?;
        if max_t > cfg.block_size {
            return Err(ModelError::Config {
                field: "block_size",
                why: format!("sequence length {max_t} exceeds block_size {}", cfg.block_size),
            });
        }
        let layout = ParamLayout::new(&cfg);
        let n = layout.len();
        let (bt, c, nh, vp) = (max_b * max_t, cfg.n_embd, cfg.n_head, cfg.padded_vocab());
        let a = |len: usize| be.alloc(len);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            layers.push(LayerActs {
                ln1: a(bt * c)?,
                ln1_mean: a(bt)?,
                ln1_rstd: a(bt)?,
                qkv: a(bt * 3 * c)?,
                atty: a(bt * c)?,
                lse: a(max_b * nh * max_t)?,
                resid_mid: a(bt * c)?,
                ln2: a(bt * c)?,
                ln2_mean: a(bt)?,
                ln2_rstd: a(bt)?,
                fch: a(bt * 4 * c)?,
                fch_gelu: a(bt * 4 * c)?,
                resid_out: a(bt * c)?,
            });
        }
        let acts = Acts {
            tokens: be.alloc_i32(bt)?,
            targets: be.alloc_i32(bt)?,
            encoded: a(bt * c)?,
            layers,
            proj: a(bt * c)?,
            lnf: a(bt * c)?,
            lnf_mean: a(bt)?,
            lnf_rstd: a(bt)?,
            logits: a(bt * vp)?,
            losses: a(bt)?,
            dres: a(bt * c)?,
            dsmall: a(bt * c)?,
            dqkv: a(bt * 3 * c)?,
            dbig1: a(bt * 4 * c)?,
            dbig2: a(bt * 4 * c)?,
        };
        Ok(Gpt {
            params: a(n)?,
            grads: a(n)?,
            m: a(n)?,
            v: a(n)?,
            cfg,
            layout,
            acts,
            max_b,
            max_t,
            last: None,
            host_losses: vec![0.0; bt],
            host_targets: vec![0; bt],
        })
    }

    /// GPT-2 initialisation: weights N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)),
    /// biases 0, LayerNorm weights 1; the vocabulary padding rows are 0.
    pub fn init_gpt2(&mut self, be: &B, seed: u64) -> Result<(), ModelError> {
        let mut host = vec![0.0f32; self.layout.len()];
        let mut rng = Rng::stream(seed, 0x1417);
        let resid_std = 0.02 / (2.0 * self.cfg.n_layer as f64).sqrt();
        for t in Tensor::ALL {
            let r = self.layout.all(t);
            match t {
                Tensor::Ln1W | Tensor::Ln2W | Tensor::LnfW => host[r].fill(1.0),
                Tensor::Wte => {
                    let real = self.cfg.vocab_size * self.cfg.n_embd;
                    for x in &mut host[r.start..r.start + real] {
                        *x = (rng.normal() * 0.02) as f32;
                    }
                }
                Tensor::Wpe | Tensor::QkvW | Tensor::FcW => {
                    host[r].iter_mut().for_each(|x| *x = (rng.normal() * 0.02) as f32)
                }
                Tensor::AttProjW | Tensor::FcProjW => {
                    host[r].iter_mut().for_each(|x| *x = (rng.normal() * resid_std) as f32)
                }
                _ => {} // biases stay 0
            }
        }
        be.upload(&mut self.params, &host)?;
        Ok(())
    }

    pub fn max_batch(&self) -> (usize, usize) {
        (self.max_b, self.max_t)
    }

    /// Forward over tokens (b, t). With targets, computes the loss and leaves the
    /// probabilities for [`Gpt::backward`]; without, leaves the logits (see [`Gpt::logits`]).
    pub fn forward(
        &mut self,
        be: &B,
        tokens: &[i32],
        targets: Option<&[i32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<Loss>, ModelError> {
        if b > self.max_b || t > self.max_t || tokens.len() != b * t {
            return Err(ModelError::Shape(format!(
                "batch ({b}, {t}) with {} tokens does not fit ({}, {})",
                tokens.len(),
                self.max_b,
                self.max_t
            )));
        }
        let vocab = self.cfg.vocab_size as i32;
        if let Some(bad) = tokens.iter().find(|&&x| x < 0 || x >= vocab) {
            return Err(ModelError::Shape(format!("token id {bad} outside vocabulary of {vocab}")));
        }
        let (c, nh, l_n, vp) =
            (self.cfg.n_embd, self.cfg.n_head, self.cfg.n_layer, self.cfg.padded_vocab());
        let n = b * t;
        let (lay, p, acts) = (&self.layout, &self.params, &mut self.acts);
        let w = |tensor: Tensor, l: usize| be.view(p, lay.at(tensor, l));
        upload_prefix_i32(be, &mut acts.tokens, tokens, &mut self.host_targets)?;

        be.encoder_forward(
            be.view_mut(&mut acts.encoded, 0..n * c),
            &acts.tokens,
            w(Tensor::Wte, 0),
            w(Tensor::Wpe, 0),
            b,
            t,
            c,
        );
        for l in 0..l_n {
            let (before, rest) = acts.layers.split_at_mut(l);
            let la = &mut rest[0];
            let x_in = match before.last() {
                Some(prev) => be.view(&prev.resid_out, 0..n * c),
                None => be.view(&acts.encoded, 0..n * c),
            };
            let r = |f: usize| 0..n * f;
            be.layernorm_forward(
                be.view_mut(&mut la.ln1, r(c)),
                be.view_mut(&mut la.ln1_mean, r(1)),
                be.view_mut(&mut la.ln1_rstd, r(1)),
                x_in,
                w(Tensor::Ln1W, l),
                w(Tensor::Ln1B, l),
                n,
                c,
            );
            be.matmul_forward(
                be.view_mut(&mut la.qkv, r(3 * c)),
                be.view(&la.ln1, r(c)),
                w(Tensor::QkvW, l),
                Some(w(Tensor::QkvB, l)),
                WeightLayout::InOut,
                n,
                c,
                3 * c,
            );
            be.attention_forward(
                be.view_mut(&mut la.atty, r(c)),
                be.view_mut(&mut la.lse, r(nh)),
                be.view(&la.qkv, r(3 * c)),
                b,
                t,
                c,
                nh,
            );
            be.matmul_forward(
                be.view_mut(&mut acts.proj, r(c)),
                be.view(&la.atty, r(c)),
                w(Tensor::AttProjW, l),
                Some(w(Tensor::AttProjB, l)),
                WeightLayout::InOut,
                n,
                c,
                c,
            );
            be.residual_forward(
                be.view_mut(&mut la.resid_mid, r(c)),
                x_in,
                be.view(&acts.proj, r(c)),
            );
            be.layernorm_forward(
                be.view_mut(&mut la.ln2, r(c)),
                be.view_mut(&mut la.ln2_mean, r(1)),
                be.view_mut(&mut la.ln2_rstd, r(1)),
                be.view(&la.resid_mid, r(c)),
                w(Tensor::Ln2W, l),
                w(Tensor::Ln2B, l),
                n,
                c,
            );
            be.matmul_forward(
                be.view_mut(&mut la.fch, r(4 * c)),
                be.view(&la.ln2, r(c)),
                w(Tensor::FcW, l),
                Some(w(Tensor::FcB, l)),
                WeightLayout::InOut,
                n,
                c,
                4 * c,
            );
            be.gelu_forward(
                be.view_mut(&mut la.fch_gelu, r(4 * c)),
                be.view(&la.fch, r(4 * c)),
                n * 4 * c,
            );
            be.matmul_forward(
                be.view_mut(&mut acts.proj, r(c)),
                be.view(&la.fch_gelu, r(4 * c)),
                w(Tensor::FcProjW, l),
                Some(w(Tensor::FcProjB, l)),
                WeightLayout::InOut,
                n,
                4 * c,
                c,
            );
            be.residual_forward(
                be.view_mut(&mut la.resid_out, r(c)),
                be.view(&la.resid_mid, r(c)),
                be.view(&acts.proj, r(c)),
            );
        }
        let top = &acts.layers[l_n - 1].resid_out;
        be.layernorm_forward(
            be.view_mut(&mut acts.lnf, 0..n * c),
            be.view_mut(&mut acts.lnf_mean, 0..n),
            be.view_mut(&mut acts.lnf_rstd, 0..n),
            be.view(top, 0..n * c),
            w(Tensor::LnfW, 0),
            w(Tensor::LnfB, 0),
            n,
            c,
        );
        be.matmul_forward(
            be.view_mut(&mut acts.logits, 0..n * vp),
            be.view(&acts.lnf, 0..n * c),
            w(Tensor::Wte, 0),
            None,
            WeightLayout::OutIn,
            n,
            c,
            vp,
        );
        self.last = None;
        let Some(targets) = targets else { return Ok(None) };
        if targets.len() != n {
            return Err(ModelError::Shape(format!("{} targets for {n} tokens", targets.len())));
        }
        if let Some(bad) = targets.iter().find(|&&x| x != IGNORE_INDEX && (x < 0 || x >= vocab)) {
            return Err(ModelError::Shape(format!(
                "target id {bad} outside vocabulary of {vocab}"
            )));
        }
        upload_prefix_i32(be, &mut acts.targets, targets, &mut self.host_targets)?;
        be.crossentropy_forward(
            be.view_mut(&mut acts.losses, 0..n),
            be.view_mut(&mut acts.logits, 0..n * vp),
            &acts.targets,
            n,
            self.cfg.vocab_size,
            vp,
        );
        be.download(be.view(&acts.losses, 0..n), &mut self.host_losses[..n])?;
        let counted = targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
        let sum: f64 = self.host_losses[..n].iter().map(|&x| x as f64).sum();
        self.last = Some((b, t));
        let mean = if counted == 0 { 0.0 } else { (sum / counted as f64) as f32 };
        Ok(Some(Loss { mean, counted }))
    }

    /// Logits (b*t, vocab_size) of the last forward without targets, copied into `out`
    /// row by row (the vocabulary padding is dropped).
    pub fn logits(&self, be: &B, row: usize, out: &mut [f32]) -> Result<(), ModelError> {
        let (v, vp) = (self.cfg.vocab_size, self.cfg.padded_vocab());
        be.download(be.view(&self.acts.logits, row * vp..row * vp + v), &mut out[..v])?;
        Ok(())
    }

    /// Backward of the last forward with targets; gradients accumulate into `grads`, with the
    /// loss scaled by `loss_scale` (1 / micro-batches for gradient accumulation).
    pub fn backward(&mut self, be: &B, loss: Loss, loss_scale: f32) -> Result<(), ModelError> {
        self.backward_with(be, loss, loss_scale, &mut |_, _| {})
    }

    /// [`Gpt::backward`], calling `ready(grads, ranges)` as soon as the gradients in `ranges`
    /// are final: the final LayerNorm, then each layer from the last to the first, then the
    /// embeddings (the token embedding is tied to the logits, so it is final only at the
    /// end). Data-parallel training starts averaging those while backward goes on.
    pub fn backward_with(
        &mut self,
        be: &B,
        loss: Loss,
        loss_scale: f32,
        ready: &mut GradsReady<'_, B::Buf>,
    ) -> Result<(), ModelError> {
        let (b, t) = self.last.take().ok_or_else(|| {
            ModelError::Shape("backward called without a forward with targets".into())
        })?;
        let (c, nh, l_n, vp) =
            (self.cfg.n_embd, self.cfg.n_head, self.cfg.n_layer, self.cfg.padded_vocab());
        let n = b * t;
        let dloss = if loss.counted == 0 { 0.0 } else { loss_scale / loss.counted as f32 };
        let (lay, p, g, acts) = (&self.layout, &self.params, &mut self.grads, &mut self.acts);
        let w = |tensor: Tensor, l: usize| be.view(p, lay.at(tensor, l));
        let r = |f: usize| 0..n * f;

        be.fill(be.view_mut(&mut acts.dres, r(c)), 0.0);
        be.crossentropy_backward(
            be.view_mut(&mut acts.logits, r(vp)),
            &acts.targets,
            dloss,
            n,
            self.cfg.vocab_size,
            vp,
        );
        be.matmul_backward(
            be.view_mut(&mut acts.dsmall, r(c)),
            be.view_mut(g, lay.at(Tensor::Wte, 0)),
            None,
            be.view(&acts.logits, r(vp)),
            be.view(&acts.lnf, r(c)),
            w(Tensor::Wte, 0),
            WeightLayout::OutIn,
            n,
            c,
            vp,
        );
        let [dw, db] = be.split_mut(g, [lay.at(Tensor::LnfW, 0), lay.at(Tensor::LnfB, 0)]);
        be.layernorm_backward(
            be.view_mut(&mut acts.dres, r(c)),
            dw,
            db,
            be.view(&acts.dsmall, r(c)),
            be.view(&acts.layers[l_n - 1].resid_out, r(c)),
            w(Tensor::LnfW, 0),
            be.view(&acts.lnf_mean, r(1)),
            be.view(&acts.lnf_rstd, r(1)),
            n,
            c,
        );
        ready(g, &[lay.at(Tensor::LnfW, 0), lay.at(Tensor::LnfB, 0)]);
        for l in (0..l_n).rev() {
            let la = &acts.layers[l];
            let x_in = match l {
                0 => be.view(&acts.encoded, r(c)),
                _ => be.view(&acts.layers[l - 1].resid_out, r(c)),
            };
            let [dw, db] =
                be.split_mut(g, [lay.at(Tensor::FcProjW, l), lay.at(Tensor::FcProjB, l)]);
            be.matmul_backward(
                be.view_mut(&mut acts.dbig1, r(4 * c)),
                dw,
                Some(db),
                be.view(&acts.dres, r(c)),
                be.view(&la.fch_gelu, r(4 * c)),
                w(Tensor::FcProjW, l),
                WeightLayout::InOut,
                n,
                4 * c,
                c,
            );
            be.gelu_backward(
                be.view_mut(&mut acts.dbig2, r(4 * c)),
                be.view(&la.fch, r(4 * c)),
                be.view(&acts.dbig1, r(4 * c)),
                n * 4 * c,
            );
            let [dw, db] = be.split_mut(g, [lay.at(Tensor::FcW, l), lay.at(Tensor::FcB, l)]);
            be.matmul_backward(
                be.view_mut(&mut acts.dsmall, r(c)),
                dw,
                Some(db),
                be.view(&acts.dbig2, r(4 * c)),
                be.view(&la.ln2, r(c)),
                w(Tensor::FcW, l),
                WeightLayout::InOut,
                n,
                c,
                4 * c,
            );
            let [dw, db] = be.split_mut(g, [lay.at(Tensor::Ln2W, l), lay.at(Tensor::Ln2B, l)]);
            be.layernorm_backward(
                be.view_mut(&mut acts.dres, r(c)),
                dw,
                db,
                be.view(&acts.dsmall, r(c)),
                be.view(&la.resid_mid, r(c)),
                w(Tensor::Ln2W, l),
                be.view(&la.ln2_mean, r(1)),
                be.view(&la.ln2_rstd, r(1)),
                n,
                c,
            );
            let [dw, db] =
                be.split_mut(g, [lay.at(Tensor::AttProjW, l), lay.at(Tensor::AttProjB, l)]);
            be.matmul_backward(
                be.view_mut(&mut acts.dsmall, r(c)),
                dw,
                Some(db),
                be.view(&acts.dres, r(c)),
                be.view(&la.atty, r(c)),
                w(Tensor::AttProjW, l),
                WeightLayout::InOut,
                n,
                c,
                c,
            );
            be.attention_backward(
                be.view_mut(&mut acts.dqkv, r(3 * c)),
                be.view(&acts.dsmall, r(c)),
                be.view(&la.qkv, r(3 * c)),
                be.view(&la.atty, r(c)),
                be.view(&la.lse, r(nh)),
                b,
                t,
                c,
                nh,
            );
            let [dw, db] = be.split_mut(g, [lay.at(Tensor::QkvW, l), lay.at(Tensor::QkvB, l)]);
            be.matmul_backward(
                be.view_mut(&mut acts.dsmall, r(c)),
                dw,
                Some(db),
                be.view(&acts.dqkv, r(3 * c)),
                be.view(&la.ln1, r(c)),
                w(Tensor::QkvW, l),
                WeightLayout::InOut,
                n,
                c,
                3 * c,
            );
            // The key bias adds q·b_k to every score of a query's row, which softmax ignores:
            // its gradient is exactly zero. Backward leaves rounding noise of sums that
            // cancel, which AdamW's normalisation would turn into steps that depend on the
            // summation order (batch B on two ranks against 2B on one diverged there by 6e-6
            // in 12 steps, 50x more than anywhere else). The bias is laid out (q, k, v).
            let k = lay.at(Tensor::QkvB, l).start + c;
            be.fill(be.view_mut(g, k..k + c), 0.0);
            let [dw, db] = be.split_mut(g, [lay.at(Tensor::Ln1W, l), lay.at(Tensor::Ln1B, l)]);
            be.layernorm_backward(
                be.view_mut(&mut acts.dres, r(c)),
                dw,
                db,
                be.view(&acts.dsmall, r(c)),
                x_in,
                w(Tensor::Ln1W, l),
                be.view(&la.ln1_mean, r(1)),
                be.view(&la.ln1_rstd, r(1)),
                n,
                c,
            );
            let grads: [_; Tensor::PER_LAYER.len()] =
                std::array::from_fn(|i| lay.at(Tensor::PER_LAYER[i], l));
            ready(g, &grads);
        }
        let [dwte, dwpe] = be.split_mut(g, [lay.at(Tensor::Wte, 0), lay.at(Tensor::Wpe, 0)]);
        be.encoder_backward(dwte, dwpe, be.view(&acts.dres, r(c)), &acts.tokens, b, t, c);
        ready(g, &[lay.at(Tensor::Wte, 0), lay.at(Tensor::Wpe, 0)]);
        Ok(())
    }

    pub fn zero_grad(&mut self, be: &B) {
        let n = self.layout.len();
        be.fill(be.view_mut(&mut self.grads, 0..n), 0.0);
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self, be: &B) -> f32 {
        be.sum_squares(be.view(&self.grads, 0..self.layout.len())).sqrt() as f32
    }

    /// Clips the gradients to `max_norm` (if > 0) and takes one AdamW step; weight decay
    /// applies to matrices only. Returns the norm before clipping.
    pub fn step(&mut self, be: &B, opt: &AdamW, max_norm: f32) -> f32 {
        let norm = self.grad_norm(be);
        let scale = if max_norm > 0.0 && norm > max_norm { max_norm / norm } else { 1.0 };
        for t in Tensor::ALL {
            let r = self.layout.all(t);
            let hp = AdamW {
                grad_scale: opt.grad_scale * scale,
                weight_decay: if t.decays() { opt.weight_decay } else { 0.0 },
                ..*opt
            };
            be.adamw(
                be.view_mut(&mut self.params, r.clone()),
                be.view(&self.grads, r.clone()),
                be.view_mut(&mut self.m, r.clone()),
                be.view_mut(&mut self.v, r),
                &hp,
            );
        }
        norm
    }
}

/// Uploads `src` into the front of `dst` (sized for the largest batch), through `scratch`.
fn upload_prefix_i32<B: Backend>(
    be: &B,
    dst: &mut B::IBuf,
    src: &[i32],
    scratch: &mut [i32],
) -> Result<(), ModelError> {
    scratch[..src.len()].copy_from_slice(src);
    scratch[src.len()..].fill(0);
    be.upload_i32(dst, scratch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use ferrite_kernels::CpuBackend;

    use super::*;

    #[test]
    fn backward_announces_every_gradient_once_when_final_from_the_top_down() {
        let be = CpuBackend::new(1).unwrap();
        let cfg = GptConfig { n_layer: 3, n_head: 2, n_embd: 8, block_size: 8, vocab_size: 11 };
        let mut gpt = Gpt::new(&be, cfg, 2, 8).unwrap();
        gpt.init_gpt2(&be, 3).unwrap();
        let tokens: Vec<i32> = (0..16).map(|i| i * 7 % 11).collect();
        let targets: Vec<i32> = (0..16).map(|i| i * 5 % 11).collect();
        let loss = gpt.forward(&be, &tokens, Some(&targets), 2, 8).unwrap().unwrap();
        gpt.zero_grad(&be);
        let mut seen: Vec<(Range<usize>, Vec<f32>)> = Vec::new();
        gpt.backward_with(&be, loss, 1.0, &mut |g, ranges| {
            seen.extend(ranges.iter().map(|r| (r.clone(), g[r.clone()].to_vec())));
        })
        .unwrap();
        let lay = &gpt.layout;
        assert_eq!(seen[0].0, lay.at(Tensor::LnfW, 0));
        assert_eq!(seen[2].0, lay.at(Tensor::Ln1W, 2), "the last layer comes first");
        assert_eq!(seen.last().unwrap().0, lay.at(Tensor::Wpe, 0));
        let mut covered = vec![0u8; lay.len()];
        for (r, snapshot) in &seen {
            assert_eq!(&gpt.grads[r.clone()], snapshot.as_slice(), "{r:?} changed after");
            covered[r.clone()].iter_mut().for_each(|c| *c += 1);
        }
        assert!(covered.iter().all(|&c| c == 1), "every gradient announced exactly once");

        // The key bias's gradient is exactly zero (softmax ignores a shift of a row's
        // scores); the query and value biases' are not.
        for l in 0..3 {
            let qkv_b = &gpt.grads[lay.at(Tensor::QkvB, l)];
            assert!(qkv_b[8..16].iter().all(|&g| g == 0.0), "layer {l}: {:?}", &qkv_b[8..16]);
            assert!(qkv_b[..8].iter().chain(&qkv_b[16..]).any(|&g| g != 0.0), "layer {l}");
        }

        let hooked = gpt.grads.clone();
        gpt.forward(&be, &tokens, Some(&targets), 2, 8).unwrap();
        gpt.zero_grad(&be);
        gpt.backward(&be, loss, 1.0).unwrap();
        assert_eq!(gpt.grads, hooked);
    }
}
