//! Decoding with a KV cache on the CPU, batched: one step runs the new tokens of any number of
//! sequences (a prompt chunk for some, one sampled token for others) through the model as one
//! set of rows, so each weight matrix is read once per step for all of them.
//!
//! Every kernel on this path computes a row from that row alone, in a fixed order (the
//! `matvec` kernels, per-row layernorm, per-row cached attention), so a sequence's logits
//! have the same bits whether it runs alone or batched, and however its prompt is chunked.
//!
//! - [`DecodeModel`]: the weights, shared (read-only) by every sequence.
//! - [`KvCache`]: one sequence's keys and values, sized at creation.
//! - [`BatchDecoder`]: the scratch buffers and thread pool; [`BatchDecoder::step`].
//! - [`Sequence`]: one generation (prompt, context overflow, sampling positions), used by the
//!   local [`Generator`] and by the server's scheduler alike.

use std::path::Path;
use std::sync::Arc;

use ferrite_kernels::cpu::{attention_cached, matvec, HugePageBuf};
use ferrite_kernels::{Backend, CpuBackend};
use rayon::prelude::*;

use crate::checkpoint;
use crate::layout::{ParamLayout, Tensor};
use crate::sample::{sample, Sampled, SamplingParams};
use crate::{GptConfig, ModelError};

/// Weights for decoding: the parameter buffer with each linear layer's (in, out) matrix
/// rearranged in place into the panels of [`matvec::forward_packed`] (same ranges), on huge
/// pages (every decode step streams all of it from memory).
pub struct DecodeModel {
    pub cfg: GptConfig,
    layout: ParamLayout,
    params: HugePageBuf,
}

impl DecodeModel {
    /// A model over `params` in this crate's layout.
    pub fn new(cfg: GptConfig, params: Vec<f32>) -> Result<Self, ModelError> {
        cfg.validate()?;
        let layout = ParamLayout::new(&cfg);
        if params.len() != layout.len() {
            return Err(ModelError::Shape(format!(
                "{} parameters for a model of {}",
                params.len(),
                layout.len()
            )));
        }
        let mut params = HugePageBuf::from_slice(&params);
        pack_linear_weights(&cfg, &layout, &mut params);
        Ok(DecodeModel { cfg, layout, params })
    }

    /// Loads the weights of a checkpoint folder (ours or `transformers`').
    pub fn from_checkpoint(dir: &Path) -> Result<Self, ModelError> {
        let w = checkpoint::load_weights(dir)?;
        Self::new(w.config, w.params)
    }

    /// Bytes of a KV cache of `cap` positions.
    pub fn kv_bytes(&self, cap: usize) -> usize {
        2 * self.cfg.n_layer * cap * self.cfg.n_embd * std::mem::size_of::<f32>()
    }
}

/// The linear layers' (in, out) weights, rearranged in place for [`matvec::forward_packed`]
/// (each layer's matrix keeps its range of the buffer).
fn pack_linear_weights(cfg: &GptConfig, layout: &ParamLayout, params: &mut [f32]) {
    let c = cfg.n_embd;
    let mut tmp = Vec::new();
    for (tensor, (inp, out)) in [
        (Tensor::QkvW, (c, 3 * c)),
        (Tensor::AttProjW, (c, c)),
        (Tensor::FcW, (c, 4 * c)),
        (Tensor::FcProjW, (4 * c, c)),
    ] {
        for l in 0..cfg.n_layer {
            let w = &mut params[layout.at(tensor, l)];
            tmp.clear();
            tmp.extend_from_slice(w);
            matvec::pack_in_out(w, &tmp, inp, out);
        }
    }
}

/// One sequence's keys and values, (L, cap, C) each; positions 0..len are filled.
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    cap: usize,
    len: usize,
}

impl KvCache {
    /// A cache for up to `cap` positions (at most the model's context).
    pub fn new(cfg: &GptConfig, cap: usize) -> Self {
        let cap = cap.clamp(1, cfg.block_size);
        let n = cfg.n_layer * cap * cfg.n_embd;
        KvCache { k: vec![0.0; n], v: vec![0.0; n], cap, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Forgets every position (the memory is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// One sequence's share of a step: `tokens` go in at positions `kv.len()..`.
pub struct StepInput<'a> {
    pub kv: &'a mut KvCache,
    pub tokens: &'a [u32],
    /// Whether to compute the next-token logits after the last of `tokens`.
    pub logits: bool,
}

/// Scratch for a step of up to `rows` rows, grown on demand.
#[derive(Default)]
struct Scratch {
    rows: usize,
    x: Vec<f32>,      // (R, C) residual stream
    ln: Vec<f32>,     // (R, C)
    mean: Vec<f32>,   // (R)
    rstd: Vec<f32>,   // (R)
    qkv: Vec<f32>,    // (R, 3C)
    q: Vec<f32>,      // (R, C)
    att: Vec<f32>,    // (R, C)
    proj: Vec<f32>,   // (R, C)
    fch: Vec<f32>,    // (R, 4C)
    fchg: Vec<f32>,   // (R, 4C)
    last: Vec<f32>,   // (S, C) final rows of sequences that want logits
    logits: Vec<f32>, // (S, Vp)
}

impl Scratch {
    fn ensure(&mut self, rows: usize, c: usize, vp: usize) {
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0)
            }
        };
        grow(&mut self.x, rows * c);
        grow(&mut self.ln, rows * c);
        grow(&mut self.mean, rows);
        grow(&mut self.rstd, rows);
        grow(&mut self.qkv, rows * 3 * c);
        grow(&mut self.q, rows * c);
        grow(&mut self.att, rows * c);
        grow(&mut self.proj, rows * c);
        grow(&mut self.fch, rows * 4 * c);
        grow(&mut self.fchg, rows * 4 * c);
        grow(&mut self.last, rows * c);
        grow(&mut self.logits, rows * vp);
        self.rows = self.rows.max(rows);
    }
}

/// Runs batched steps on its own thread pool.
pub struct BatchDecoder {
    be: Arc<CpuBackend>,
    s: Scratch,
}

impl BatchDecoder {
    /// A decoder with `threads` threads (0: one per core).
    pub fn new(threads: usize) -> Result<Self, ModelError> {
        Ok(BatchDecoder { be: Arc::new(CpuBackend::new(threads)?), s: Scratch::default() })
    }

    /// Runs every sequence's tokens through `model` as one batch and appends them to the
    /// caches. Returns the logits (vocab_size each) of the sequences with `logits` set, in
    /// order. Checks everything before touching a cache.
    pub fn step(
        &mut self,
        model: &DecodeModel,
        seqs: &mut [StepInput<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &model.cfg;
        let vocab = cfg.vocab_size as u32;
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::Shape("nothing to feed".into()));
            }
            if let Some(bad) = s.tokens.iter().find(|&&t| t >= vocab) {
                return Err(ModelError::Shape(format!(
                    "token id {bad} outside vocabulary of {vocab}"
                )));
            }
            if s.kv.len + s.tokens.len() > s.kv.cap {
                return Err(ModelError::Shape(format!(
                    "{} tokens after {} do not fit a KV cache of {}",
                    s.tokens.len(),
                    s.kv.len,
                    s.kv.cap
                )));
            }
            if s.kv.k.len() != cfg.n_layer * s.kv.cap * cfg.n_embd {
                return Err(ModelError::Shape("KV cache made for another model shape".into()));
            }
        }
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let (c, vp, v) = (cfg.n_embd, cfg.padded_vocab(), cfg.vocab_size);
        self.s.ensure(rows, c, vp);
        let be = self.be.clone();
        let want = be.run(|| forward(&be, model, &mut self.s, seqs, rows));
        Ok((0..want).map(|i| self.s.logits[i * vp..i * vp + v].to_vec()).collect())
    }
}

impl BatchDecoder {
    /// Samples the next token of each of `seqs` from its row of `logits` (as
    /// [`Sequence::sample`]), the sequences in parallel on the decoder's threads.
    pub fn sample(&self, seqs: &mut [&mut Sequence], logits: &[Vec<f32>]) -> Vec<Sampled> {
        assert_eq!(seqs.len(), logits.len(), "one row of logits per sequence");
        self.be.run(|| seqs.par_iter_mut().zip(logits).map(|(s, l)| s.sample(l)).collect())
    }
}

/// The batched forward; returns how many logit rows it wrote.
fn forward(
    be: &CpuBackend,
    model: &DecodeModel,
    s: &mut Scratch,
    seqs: &mut [StepInput<'_>],
    rows: usize,
) -> usize {
    let cfg = &model.cfg;
    let (c, nh, vp) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab());
    let (lay, p) = (&model.layout, &model.params[..]);
    let w = |tensor: Tensor, l: usize| &p[lay.at(tensor, l)];
    let n = rows * c;
    let mut r = 0;
    for sq in seqs.iter() {
        for (i, &tok) in sq.tokens.iter().enumerate() {
            let e = &w(Tensor::Wte, 0)[tok as usize * c..][..c];
            let pe = &w(Tensor::Wpe, 0)[(sq.kv.len + i) * c..][..c];
            for j in 0..c {
                s.x[r * c + j] = e[j] + pe[j];
            }
            r += 1;
        }
    }
    for l in 0..cfg.n_layer {
        let (ln, mean, rstd) = (&mut s.ln[..n], &mut s.mean[..rows], &mut s.rstd[..rows]);
        be.layernorm_forward(
            ln,
            mean,
            rstd,
            &s.x[..n],
            w(Tensor::Ln1W, l),
            w(Tensor::Ln1B, l),
            rows,
            c,
        );
        let qkv = &mut s.qkv[..3 * n];
        matvec::forward_packed(
            qkv,
            &s.ln[..n],
            w(Tensor::QkvW, l),
            Some(w(Tensor::QkvB, l)),
            rows,
            c,
            3 * c,
        );
        let mut r0 = 0;
        for sq in seqs.iter_mut() {
            let (kv, t) = (&mut *sq.kv, sq.tokens.len());
            let base = l * kv.cap * c;
            for i in 0..t {
                let src = &s.qkv[(r0 + i) * 3 * c..(r0 + i + 1) * 3 * c];
                let at = base + (kv.len + i) * c;
                s.q[(r0 + i) * c..(r0 + i + 1) * c].copy_from_slice(&src[..c]);
                kv.k[at..at + c].copy_from_slice(&src[c..2 * c]);
                kv.v[at..at + c].copy_from_slice(&src[2 * c..]);
            }
            let cache = base..base + kv.cap * c;
            let rows_of = r0 * c..(r0 + t) * c;
            attention_cached(
                &mut s.att[rows_of.clone()],
                &s.q[rows_of],
                &kv.k[cache.clone()],
                &kv.v[cache],
                kv.len,
                t,
                c,
                nh,
            );
            r0 += t;
        }
        let proj = &mut s.proj[..n];
        matvec::forward_packed(
            proj,
            &s.att[..n],
            w(Tensor::AttProjW, l),
            Some(w(Tensor::AttProjB, l)),
            rows,
            c,
            c,
        );
        add_into(&mut s.x[..n], &s.proj[..n]);
        let (ln, mean, rstd) = (&mut s.ln[..n], &mut s.mean[..rows], &mut s.rstd[..rows]);
        be.layernorm_forward(
            ln,
            mean,
            rstd,
            &s.x[..n],
            w(Tensor::Ln2W, l),
            w(Tensor::Ln2B, l),
            rows,
            c,
        );
        let fch = &mut s.fch[..4 * n];
        matvec::forward_packed(
            fch,
            &s.ln[..n],
            w(Tensor::FcW, l),
            Some(w(Tensor::FcB, l)),
            rows,
            c,
            4 * c,
        );
        be.gelu_forward(&mut s.fchg[..4 * n], &s.fch[..4 * n], 4 * n);
        let proj = &mut s.proj[..n];
        matvec::forward_packed(
            proj,
            &s.fchg[..4 * n],
            w(Tensor::FcProjW, l),
            Some(w(Tensor::FcProjB, l)),
            rows,
            4 * c,
            c,
        );
        add_into(&mut s.x[..n], &s.proj[..n]);
    }
    // Only the last row of each sequence that wants logits goes through the LM head.
    let (mut r0, mut want) = (0, 0);
    for sq in seqs.iter_mut() {
        let t = sq.tokens.len();
        if sq.logits {
            let last = (r0 + t - 1) * c;
            s.last[want * c..(want + 1) * c].copy_from_slice(&s.x[last..last + c]);
            want += 1;
        }
        sq.kv.len += t;
        r0 += t;
    }
    if want > 0 {
        let m = want * c;
        let (ln, mean, rstd) = (&mut s.ln[..m], &mut s.mean[..want], &mut s.rstd[..want]);
        be.layernorm_forward(
            ln,
            mean,
            rstd,
            &s.last[..m],
            w(Tensor::LnfW, 0),
            w(Tensor::LnfB, 0),
            want,
            c,
        );
        matvec::forward_out_in(
            &mut s.logits[..want * vp],
            &s.ln[..m],
            w(Tensor::Wte, 0),
            want,
            c,
            vp,
        );
    }
    want
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// What to do with a prompt longer than the model's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LongPrompt {
    /// Keep its newest `block_size` tokens (what the local command does).
    Truncate,
    /// Refuse the request.
    Refuse,
}

/// One generation: its tokens, its KV cache, and where it stands. When the context fills,
/// the cache is rebuilt from the newest half context (then prefilled again).
pub struct Sequence {
    params: SamplingParams,
    max_tokens: usize,
    /// Length of the prompt as given (sampling positions count from it).
    prompt_len: usize,
    /// Every token of the context: `history[..kv.len()]` is in the cache, the rest pending.
    history: Vec<u32>,
    generated: usize,
    block_size: usize,
    kv: KvCache,
    dist: Vec<(u32, f32)>,
}

impl Sequence {
    /// Positions the KV cache of a request needs: the whole prompt (up to the context) plus
    /// the tokens it may generate, less the last one (never fed back).
    pub fn kv_positions(cfg: &GptConfig, prompt_len: usize, max_tokens: usize) -> usize {
        (prompt_len + max_tokens.saturating_sub(1)).clamp(1, cfg.block_size)
    }

    /// Validates the request and takes `kv` (sized by [`Sequence::kv_positions`] or larger).
    pub fn new(
        cfg: &GptConfig,
        prompt: &[u32],
        max_tokens: usize,
        params: SamplingParams,
        long: LongPrompt,
        mut kv: KvCache,
    ) -> Result<Self, ModelError> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(ModelError::Sampling("prompt is empty".into()));
        }
        let vocab = cfg.vocab_size as u32;
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(ModelError::Sampling(format!(
                "prompt token id {bad} outside vocabulary of {vocab}"
            )));
        }
        let t = cfg.block_size;
        if prompt.len() > t && long == LongPrompt::Refuse {
            return Err(ModelError::Sampling(format!(
                "prompt of {} tokens is longer than the model's context of {t}",
                prompt.len()
            )));
        }
        let keep = prompt.len().min(t);
        let need = Self::kv_positions(cfg, prompt.len(), max_tokens);
        if kv.cap < need {
            return Err(ModelError::Shape(format!("KV cache of {} for {need} positions", kv.cap)));
        }
        kv.clear();
        Ok(Sequence {
            params,
            max_tokens,
            prompt_len: prompt.len(),
            history: prompt[prompt.len() - keep..].to_vec(),
            generated: 0,
            block_size: t,
            kv,
            dist: Vec::new(),
        })
    }

    /// Whether every token it may generate has been sampled.
    pub fn finished(&self) -> bool {
        self.generated >= self.max_tokens
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Tokens waiting to go through the model.
    pub fn pending(&self) -> usize {
        self.history.len() - self.kv.len
    }

    /// The next chunk of at most `budget` pending tokens for a step; logits are wanted when
    /// the chunk ends the pending tokens. Rebuilds the cache first if the context is full.
    pub fn input(&mut self, budget: usize) -> StepInput<'_> {
        if self.kv.len + self.pending() > self.kv.cap {
            // The context is full: keep the newest half (as the local generator always has).
            let keep = (self.block_size / 2).max(1).min(self.history.len());
            self.history.drain(..self.history.len() - keep);
            self.kv.clear();
        }
        let n = self.pending().min(budget.max(1));
        let start = self.kv.len;
        StepInput {
            logits: start + n == self.history.len(),
            tokens: &self.history[start..start + n],
            kv: &mut self.kv,
        }
    }

    /// Samples the next token from `logits` (after a step whose input wanted them); the
    /// token joins the context unless it is the last one.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let position = (self.prompt_len + self.generated) as u64;
        let next = sample(logits, &self.params, position, &mut self.dist);
        self.generated += 1;
        if !self.finished() {
            self.history.push(next.token);
        }
        next
    }

    /// Ends the generation early (a stop sequence, a closed client) and returns the cache.
    pub fn into_kv(self) -> KvCache {
        self.kv
    }
}

/// Local, single-sequence generation (`ferrite generate`) over the same batched path.
pub struct Generator {
    pub cfg: GptConfig,
    model: DecodeModel,
    decoder: BatchDecoder,
    /// The cache of [`Generator::feed`]; taken by [`Generator::generate`] while it runs.
    kv: Option<KvCache>,
    /// Every token fed so far, to rebuild the cache when the context is full.
    history: Vec<u32>,
    logits: Vec<f32>,
}

impl Generator {
    /// A generator over `params` in this crate's layout.
    pub fn new(cfg: GptConfig, params: Vec<f32>, threads: usize) -> Result<Self, ModelError> {
        let model = DecodeModel::new(cfg.clone(), params)?;
        let kv = KvCache::new(&cfg, cfg.block_size);
        Ok(Generator {
            cfg,
            model,
            decoder: BatchDecoder::new(threads)?,
            kv: Some(kv),
            history: Vec::new(),
            logits: Vec::new(),
        })
    }

    /// Loads the weights of a checkpoint folder (ours or `transformers`').
    pub fn from_checkpoint(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        let w = checkpoint::load_weights(dir)?;
        Self::new(w.config, w.params, threads)
    }

    /// Forgets the context.
    pub fn reset(&mut self) {
        self.history.clear();
        if let Some(kv) = &mut self.kv {
            kv.clear();
        }
    }

    fn cache(&mut self) -> &mut KvCache {
        self.kv.get_or_insert_with(|| KvCache::new(&self.cfg, self.cfg.block_size))
    }

    /// Feeds tokens after the context and returns the logits (vocab_size) for the next one.
    /// When the context would overflow, the cache is rebuilt from the newest half-context.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<&[f32], ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Shape("nothing to feed".into()));
        }
        let t = self.cfg.block_size;
        let mut kv = self.cache().len();
        self.history.extend_from_slice(tokens);
        let mut fresh = tokens.len();
        if kv + tokens.len() > t {
            let keep = (t / 2).max(tokens.len().min(t)).min(self.history.len());
            self.history.drain(..self.history.len() - keep);
            self.cache().clear();
            (kv, fresh) = (0, keep);
        }
        let mut cache = self.kv.take().expect("cache");
        let start = self.history.len() - fresh;
        let mut input =
            [StepInput { kv: &mut cache, tokens: &self.history[start..], logits: true }];
        let out = self.decoder.step(&self.model, &mut input);
        if out.is_err() && kv == 0 {
            cache.clear();
        }
        self.kv = Some(cache);
        let out = out.inspect_err(|_| self.history.truncate(start))?;
        self.logits = out.into_iter().next().expect("one row of logits");
        Ok(&self.logits)
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
        self.reset();
        let kv = self.kv.take().expect("cache");
        let mut seq =
            Sequence::new(&self.cfg, prompt, max_tokens, *params, LongPrompt::Truncate, kv)?;
        let mut out = Vec::with_capacity(max_tokens);
        let result = loop {
            if seq.finished() {
                break Ok(());
            }
            let mut input = [seq.input(usize::MAX)];
            let logits = match self.decoder.step(&self.model, &mut input) {
                Ok(l) => l,
                Err(e) => break Err(e),
            };
            if let Some(logits) = logits.first() {
                let next = seq.sample(logits);
                out.push(next);
                if !on_token(next) {
                    break Ok(());
                }
            }
        };
        let mut kv = seq.into_kv();
        kv.clear();
        self.kv = Some(kv);
        result.map(|()| out)
    }
}
