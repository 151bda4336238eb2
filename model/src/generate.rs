//! Decoding with a KV cache on the CPU: a prompt is prefilled in one pass (matrix products
//! over all its rows), then each new token costs one row through the model.

use std::path::Path;
use std::sync::Arc;

use ferrite_kernels::cpu::attention_cached;
use ferrite_kernels::{Backend, CpuBackend, WeightLayout};

use crate::checkpoint;
use crate::layout::{ParamLayout, Tensor};
use crate::sample::{sample, Sampled, SamplingParams};
use crate::{GptConfig, ModelError};

pub struct Generator {
    be: Arc<CpuBackend>,
    pub cfg: GptConfig,
    layout: ParamLayout,
    params: Vec<f32>,
    k: Vec<f32>, // (L, T, C)
    v: Vec<f32>, // (L, T, C)
    /// Tokens in the cache (its next position).
    pos: usize,
    /// Every token fed so far, to rebuild the cache when the context is full.
    history: Vec<u32>,
    s: Scratch,
}

/// Buffers for up to `block_size` rows, allocated once.
struct Scratch {
    x: Vec<f32>,      // (T, C) residual stream
    ln: Vec<f32>,     // (T, C)
    mean: Vec<f32>,   // (T)
    rstd: Vec<f32>,   // (T)
    qkv: Vec<f32>,    // (T, 3C)
    q: Vec<f32>,      // (T, C)
    att: Vec<f32>,    // (T, C)
    proj: Vec<f32>,   // (T, C)
    fch: Vec<f32>,    // (T, 4C)
    fchg: Vec<f32>,   // (T, 4C)
    logits: Vec<f32>, // (Vp)
    dist: Vec<(u32, f32)>,
}

impl Generator {
    /// A generator over `params` in this crate's layout.
    pub fn new(cfg: GptConfig, params: Vec<f32>, threads: usize) -> Result<Self, ModelError> {
        cfg.validate()?;
        let layout = ParamLayout::new(&cfg);
        if params.len() != layout.len() {
            return Err(ModelError::Shape(format!(
                "{} parameters for a model of {}",
                params.len(),
                layout.len()
            )));
        }
        let (t, c, l) = (cfg.block_size, cfg.n_embd, cfg.n_layer);
        let s = Scratch {
            x: vec![0.0; t * c],
            ln: vec![0.0; t * c],
            mean: vec![0.0; t],
            rstd: vec![0.0; t],
            qkv: vec![0.0; t * 3 * c],
            q: vec![0.0; t * c],
            att: vec![0.0; t * c],
            proj: vec![0.0; t * c],
            fch: vec![0.0; t * 4 * c],
            fchg: vec![0.0; t * 4 * c],
            logits: vec![0.0; cfg.padded_vocab()],
            dist: Vec::with_capacity(cfg.vocab_size),
        };
        Ok(Generator {
            be: Arc::new(CpuBackend::new(threads)?),
            layout,
            params,
            k: vec![0.0; l * t * c],
            v: vec![0.0; l * t * c],
            pos: 0,
            history: Vec::new(),
            s,
            cfg,
        })
    }

    /// Loads the weights of a checkpoint folder (ours or `transformers`').
    pub fn from_checkpoint(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        let w = checkpoint::load_weights(dir)?;
        Self::new(w.config, w.params, threads)
    }

    /// Forgets the context.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.history.clear();
    }

    /// Feeds tokens after the context and returns the logits (vocab_size) for the next one.
    /// When the context would overflow, the cache is rebuilt from the newest half-context.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<&[f32], ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Shape("nothing to feed".into()));
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(ModelError::Shape(format!("token id {bad} outside vocabulary of {vocab}")));
        }
        let t = self.cfg.block_size;
        self.history.extend_from_slice(tokens);
        let be = self.be.clone();
        if self.pos + tokens.len() <= t {
            be.run(|| self.forward_rows(tokens));
        } else {
            // Rebuild the cache from the newest half context (at least the new tokens).
            let keep = (t / 2).max(tokens.len().min(t)).min(self.history.len());
            let start = self.history.len() - keep;
            self.history.drain(..start);
            self.pos = 0;
            let history = std::mem::take(&mut self.history);
            be.run(|| self.forward_rows(&history));
            self.history = history;
        }
        Ok(&self.s.logits[..self.cfg.vocab_size])
    }

    fn forward_rows(&mut self, tokens: &[u32]) {
        let be = &*self.be;
        let (c, nh, t, vp) =
            (self.cfg.n_embd, self.cfg.n_head, self.cfg.block_size, self.cfg.padded_vocab());
        let (rows, p0) = (tokens.len(), self.pos);
        let (lay, p, s) = (&self.layout, &self.params[..], &mut self.s);
        let w = |tensor: Tensor, l: usize| &p[lay.at(tensor, l)];
        let n = rows * c;
        for (r, &tok) in tokens.iter().enumerate() {
            let (e, pe) = (
                &w(Tensor::Wte, 0)[tok as usize * c..][..c],
                &w(Tensor::Wpe, 0)[(p0 + r) * c..][..c],
            );
            for j in 0..c {
                s.x[r * c + j] = e[j] + pe[j];
            }
        }
        for l in 0..self.cfg.n_layer {
            be.layernorm_forward(
                &mut s.ln[..n],
                &mut s.mean,
                &mut s.rstd,
                &s.x[..n],
                w(Tensor::Ln1W, l),
                w(Tensor::Ln1B, l),
                rows,
                c,
            );
            be.matmul_forward(
                &mut s.qkv[..3 * n],
                &s.ln[..n],
                w(Tensor::QkvW, l),
                Some(w(Tensor::QkvB, l)),
                WeightLayout::InOut,
                rows,
                c,
                3 * c,
            );
            let cache = l * t * c;
            for r in 0..rows {
                let src = &s.qkv[r * 3 * c..(r + 1) * 3 * c];
                let at = cache + (p0 + r) * c;
                s.q[r * c..(r + 1) * c].copy_from_slice(&src[..c]);
                self.k[at..at + c].copy_from_slice(&src[c..2 * c]);
                self.v[at..at + c].copy_from_slice(&src[2 * c..]);
            }
            let kv = cache..cache + t * c;
            attention_cached(
                &mut s.att[..n],
                &s.q[..n],
                &self.k[kv.clone()],
                &self.v[kv],
                p0,
                rows,
                c,
                nh,
            );
            be.matmul_forward(
                &mut s.proj[..n],
                &s.att[..n],
                w(Tensor::AttProjW, l),
                Some(w(Tensor::AttProjB, l)),
                WeightLayout::InOut,
                rows,
                c,
                c,
            );
            add_into(&mut s.x[..n], &s.proj[..n]);
            be.layernorm_forward(
                &mut s.ln[..n],
                &mut s.mean,
                &mut s.rstd,
                &s.x[..n],
                w(Tensor::Ln2W, l),
                w(Tensor::Ln2B, l),
                rows,
                c,
            );
            be.matmul_forward(
                &mut s.fch[..4 * n],
                &s.ln[..n],
                w(Tensor::FcW, l),
                Some(w(Tensor::FcB, l)),
                WeightLayout::InOut,
                rows,
                c,
                4 * c,
            );
            be.gelu_forward(&mut s.fchg[..4 * n], &s.fch[..4 * n], 4 * n);
            be.matmul_forward(
                &mut s.proj[..n],
                &s.fchg[..4 * n],
                w(Tensor::FcProjW, l),
                Some(w(Tensor::FcProjB, l)),
                WeightLayout::InOut,
                rows,
                4 * c,
                c,
            );
            add_into(&mut s.x[..n], &s.proj[..n]);
        }
        let last = &s.x[(rows - 1) * c..n];
        be.layernorm_forward(
            &mut s.ln[..c],
            &mut s.mean,
            &mut s.rstd,
            last,
            w(Tensor::LnfW, 0),
            w(Tensor::LnfB, 0),
            1,
            c,
        );
        be.matmul_forward(
            &mut s.logits,
            &s.ln[..c],
            w(Tensor::Wte, 0),
            None,
            WeightLayout::OutIn,
            1,
            c,
            vp,
        );
        self.pos = p0 + rows;
    }

    /// Generates up to `max_tokens` after `prompt`; `on_token` sees each token as it comes
    /// and returns false to stop (a stop sequence, a closed client).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        params: &SamplingParams,
        mut on_token: impl FnMut(Sampled) -> bool,
    ) -> Result<Vec<Sampled>, ModelError> {
        params.validate()?;
        self.reset();
        let mut out = Vec::with_capacity(max_tokens);
        self.feed(prompt)?;
        for i in 0..max_tokens {
            let position = (prompt.len() + i) as u64;
            let mut dist = std::mem::take(&mut self.s.dist);
            let logits = &self.s.logits[..self.cfg.vocab_size];
            let next = sample(logits, params, position, &mut dist);
            self.s.dist = dist;
            out.push(next);
            if !on_token(next) || i + 1 == max_tokens {
                break;
            }
            self.feed(&[next.token])?;
        }
        Ok(out)
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
