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

use ferrite_kernels::cpu::{
    amx, attention_cached, f16, key_cache_len, matvec, store_keys, CachedSeq, HugePageBuf, Weight,
};
use ferrite_kernels::{Backend, CpuBackend, WeightLayout};
use rayon::prelude::*;

use crate::checkpoint;
use crate::layout::{ParamLayout, Tensor};
use crate::sample::{sample, Sampled, SamplingParams};
use crate::{GptConfig, ModelError};

/// The number format the decode weights' matrices are kept in. Decoding streams every
/// matrix from memory once per step, so f16 (half the bytes) decodes up to twice as fast
/// where memory is the limit; each weight is rounded once to the nearest f16, and all
/// arithmetic stays f32. Biases, LayerNorm and the position table stay f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// The checkpoint's own values.
    #[default]
    F32,
    F16,
    /// Rounded once to bf16, and the linear layers' inputs rounded to bf16 too, summed in
    /// f32 on AMX tiles (Intel Xeon from Sapphire Rapids on): the bytes of f16, with the
    /// arithmetic of several sequences nearly free. Needs AMX-BF16.
    Bf16,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(WeightDtype::F32),
            "f16" | "float16" | "half" => Ok(WeightDtype::F16),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            _ => Err(format!("`{s}` is not a weight dtype (f32, f16 or bf16)")),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        })
    }
}

/// Weights for decoding, shared (read-only) by every sequence: the matrices (the four linear
/// layers of each block and the tied embedding / LM head, all rearranged into the panels of
/// [`matvec::forward_packed`], the embedding as the (C, vocabulary) matrix of the LM head) in
/// one buffer of the chosen [`WeightDtype`] on huge pages (every decode step streams all of
/// it), every other tensor in an f32 buffer.
pub struct DecodeModel {
    pub cfg: GptConfig,
    places: [Place; Tensor::ALL.len()],
    small: Vec<f32>,
    mats: Mats,
}

enum Mats {
    F32(HugePageBuf<f32>),
    F16(HugePageBuf<f16>),
    /// bf16 bit patterns in `amx::pack_weight`'s tiles (held as f16, the same 16 bits), and
    /// the scratch of the packed inputs.
    Bf16(HugePageBuf<f16>, amx::Scratch),
}

/// The bits of bf16 values kept in an f16 buffer.
fn bits(s: &[f16]) -> &[u16] {
    // SAFETY: f16 is a transparent u16; same length and lifetime.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
}

fn bits_mut(s: &mut [f16]) -> &mut [u16] {
    // SAFETY: as `bits`, borrowed mutably.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
}

/// Where a tensor lives: in the matrices' buffer or the small one, from `start`, `per`
/// elements per layer (the whole tensor for those that are not per layer).
#[derive(Clone, Copy, Debug, Default)]
struct Place {
    mat: bool,
    start: usize,
    per: usize,
}

impl Place {
    fn at(self, layer: usize) -> std::ops::Range<usize> {
        self.start + layer * self.per..self.start + (layer + 1) * self.per
    }
}

/// The matrices, with the (in, out) shape they are packed as for `forward_packed`; the
/// embedding (vocabulary, C) is the LM head's (C, vocabulary).
fn matrix_shape(t: Tensor, cfg: &GptConfig) -> Option<(usize, usize)> {
    let c = cfg.n_embd;
    match t {
        Tensor::Wte => Some((c, cfg.padded_vocab())),
        Tensor::QkvW => Some((c, 3 * c)),
        Tensor::AttProjW => Some((c, c)),
        Tensor::FcW => Some((c, 4 * c)),
        Tensor::FcProjW => Some((4 * c, c)),
        _ => None,
    }
}

impl DecodeModel {
    /// A model over `params` in this crate's layout, its matrices kept as `dtype`.
    pub fn new(cfg: GptConfig, params: Vec<f32>, dtype: WeightDtype) -> Result<Self, ModelError> {
        cfg.validate()?;
        if dtype == WeightDtype::Bf16 && !amx::available() {
            return Err(ModelError::Config {
                field: "dtype",
                why: "bf16 weights need a CPU with AMX-BF16 (Intel Xeon from Sapphire Rapids \
                      on); use f16"
                    .into(),
            });
        }
        let layout = ParamLayout::new(&cfg);
        if params.len() != layout.len() {
            return Err(ModelError::Shape(format!(
                "{} parameters for a model of {}",
                params.len(),
                layout.len()
            )));
        }
        let mut places = [Place::default(); Tensor::ALL.len()];
        let (mut small, mut mats_len) = (Vec::new(), 0);
        let f16_max = f16::MAX.to_f32();
        for (k, &t) in Tensor::ALL.iter().enumerate() {
            let all = &params[layout.all(t)];
            let per = if t.per_layer() { all.len() / cfg.n_layer } else { all.len() };
            let mat = matrix_shape(t, &cfg).is_some();
            if !mat {
                places[k] = Place { mat, start: small.len(), per };
                small.extend_from_slice(all);
                continue;
            }
            if dtype == WeightDtype::F16 {
                if let Some(v) = all.iter().find(|v| v.abs() > f16_max) {
                    return Err(ModelError::Shape(format!(
                        "{t:?} holds {v}, outside f16's range (±{f16_max}): use f32 weights"
                    )));
                }
            }
            let per = match (dtype, matrix_shape(t, &cfg)) {
                (WeightDtype::Bf16, Some((c, oc))) => amx::weight_len(c, oc),
                _ => per,
            };
            places[k] = Place { mat, start: mats_len, per };
            mats_len += per * if t.per_layer() { cfg.n_layer } else { 1 };
        }
        let pack = Packer { cfg: &cfg, layout: &layout, places: &places, params: &params };
        let mats = match dtype {
            WeightDtype::F32 => Mats::F32(pack.matrices(mats_len)),
            WeightDtype::F16 => Mats::F16(pack.matrices(mats_len)),
            WeightDtype::Bf16 => Mats::Bf16(pack.tiles(mats_len), amx::Scratch::default()),
        };
        Ok(DecodeModel { cfg, places, small, mats })
    }

    /// Loads the weights of a checkpoint folder (ours or `transformers`').
    pub fn from_checkpoint(dir: &Path, dtype: WeightDtype) -> Result<Self, ModelError> {
        let w = checkpoint::load_weights(dir)?;
        Self::new(w.config, w.params, dtype)
    }

    pub fn dtype(&self) -> WeightDtype {
        match self.mats {
            Mats::F32(_) => WeightDtype::F32,
            Mats::F16(_) => WeightDtype::F16,
            Mats::Bf16(..) => WeightDtype::Bf16,
        }
    }

    /// Bytes of a KV cache of `cap` positions (the keys in whole blocks of positions).
    pub fn kv_bytes(&self, cap: usize) -> usize {
        let c = self.cfg.n_embd;
        self.cfg.n_layer * (key_cache_len(cap, c) + cap * c) * std::mem::size_of::<f32>()
    }

    fn place(&self, t: Tensor) -> Place {
        self.places[t as usize]
    }

    /// A tensor that is not a matrix (always f32), of layer `l`.
    fn small(&self, t: Tensor, l: usize) -> &[f32] {
        let p = self.place(t);
        debug_assert!(!p.mat, "{t:?} is a matrix");
        &self.small[p.at(l)]
    }

    /// out (rows, oc) = inp (rows, c) @ W + b for the linear layer `t` of layer `l`.
    fn linear(&self, t: Tensor, bias: Tensor, l: usize, out: &mut [f32], inp: &[f32], rows: usize) {
        let Some((c, oc)) = matrix_shape(t, &self.cfg).filter(|_| t != Tensor::Wte) else {
            unreachable!("{t:?} is not an (in, out) linear layer")
        };
        let (r, b) = (self.place(t).at(l), Some(self.small(bias, l)));
        match &self.mats {
            Mats::F32(m) => matvec::forward_packed(out, inp, &m[r], b, rows, c, oc),
            Mats::F16(m) => matvec::forward_packed(out, inp, &m[r], b, rows, c, oc),
            Mats::Bf16(m, s) => amx::forward_packed(s, out, inp, bits(&m[r]), b, rows, c, oc),
        }
    }

    /// Logits (rows, padded vocabulary) of `inp` (rows, C) against the tied embedding: the
    /// same kernel, tiles and chunks as the other linear layers.
    fn lm_head(&self, out: &mut [f32], inp: &[f32], rows: usize) {
        let (c, vp, r) = (self.cfg.n_embd, self.cfg.padded_vocab(), self.place(Tensor::Wte).at(0));
        match &self.mats {
            Mats::F32(m) => matvec::forward_packed(out, inp, &m[r], None, rows, c, vp),
            Mats::F16(m) => matvec::forward_packed(out, inp, &m[r], None, rows, c, vp),
            Mats::Bf16(m, s) => amx::forward_packed(s, out, inp, bits(&m[r]), None, rows, c, vp),
        }
    }

    /// `out` (C) = embedding of `token` (a column of the packed LM head) + position
    /// embedding of `pos`.
    fn embed(&self, token: u32, pos: usize, out: &mut [f32]) {
        let (c, vp) = (self.cfg.n_embd, self.cfg.padded_vocab());
        let r = self.place(Tensor::Wte).at(0);
        let pe = &self.small(Tensor::Wpe, 0)[pos * c..][..c];
        match &self.mats {
            Mats::F32(m) => embed_column(out, &m[r], c, vp, token as usize, pe),
            Mats::F16(m) => embed_column(out, &m[r], c, vp, token as usize, pe),
            Mats::Bf16(m, _) => {
                let head = bits(&m[r]);
                for (i, (o, &b)) in out.iter_mut().zip(pe).enumerate() {
                    *o = amx::weight_at(head, c, vp, i, token as usize) + b;
                }
            }
        }
    }
}

fn embed_column<W: Weight>(out: &mut [f32], head: &[W], c: usize, vp: usize, t: usize, pe: &[f32]) {
    for (i, (o, &b)) in out.iter_mut().zip(pe).enumerate() {
        *o = head[matvec::packed_index(c, vp, i, t)].to_f32() + b;
    }
}

/// Copies the matrices of a parameter buffer into their own buffer, packing the (in, out)
/// ones for [`matvec::forward_packed`].
struct Packer<'a> {
    cfg: &'a GptConfig,
    layout: &'a ParamLayout,
    places: &'a [Place],
    params: &'a [f32],
}

impl Packer<'_> {
    fn matrices<W: Weight>(&self, len: usize) -> HugePageBuf<W> {
        let mut buf = HugePageBuf::<W>::zeroed(len);
        for (k, &t) in Tensor::ALL.iter().enumerate() {
            let Some((inp, out)) = matrix_shape(t, self.cfg) else { continue };
            let layers = if t.per_layer() { self.cfg.n_layer } else { 1 };
            for l in 0..layers {
                let (dst, src) =
                    (&mut buf[self.places[k].at(l)], &self.params[self.layout.at(t, l)]);
                if t == Tensor::Wte {
                    matvec::pack_out_in(dst, src, inp, out);
                } else {
                    matvec::pack_in_out(dst, src, inp, out);
                }
            }
        }
        buf
    }

    /// The matrices in bf16 AMX tiles (`amx::pack_weight`), each `Place::per` long.
    fn tiles(&self, len: usize) -> HugePageBuf<f16> {
        let mut buf = HugePageBuf::<f16>::zeroed(len);
        for (k, &t) in Tensor::ALL.iter().enumerate() {
            let Some((inp, out)) = matrix_shape(t, self.cfg) else { continue };
            let layers = if t.per_layer() { self.cfg.n_layer } else { 1 };
            let layout = if t == Tensor::Wte { WeightLayout::OutIn } else { WeightLayout::InOut };
            for l in 0..layers {
                let (dst, src) =
                    (&mut buf[self.places[k].at(l)], &self.params[self.layout.at(t, l)]);
                amx::pack_weight(bits_mut(dst), src, layout, inp, out);
            }
        }
        buf
    }
}

/// One sequence's keys and values; positions 0..len are filled.
pub struct KvCache {
    /// Keys (layers, then `cpu::store_keys`'s blocks) and values (layers, heads, cap, head
    /// size): each head's cache contiguous (see `ferrite_kernels::cpu::attention_cached`).
    k: Vec<f32>,
    v: Vec<f32>,
    cap: usize,
    len: usize,
}

impl KvCache {
    /// A cache for up to `cap` positions (at most the model's context).
    pub fn new(cfg: &GptConfig, cap: usize) -> Self {
        let cap = cap.clamp(1, cfg.block_size);
        let (c, l) = (cfg.n_embd, cfg.n_layer);
        KvCache { k: vec![0.0; l * key_cache_len(cap, c)], v: vec![0.0; l * cap * c], cap, len: 0 }
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

    /// Whether this is a cache of exactly `cap` positions for a model of `cfg`'s shape.
    pub fn fits(&self, cfg: &GptConfig, cap: usize) -> bool {
        self.cap == cap && self.shaped_for(cfg)
    }

    /// Whether the buffers are those of a model of `cfg`'s shape (for this cache's `cap`).
    fn shaped_for(&self, cfg: &GptConfig) -> bool {
        let (c, l) = (cfg.n_embd, cfg.n_layer);
        self.k.len() == l * key_cache_len(self.cap, c) && self.v.len() == l * self.cap * c
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
    /// Rows of logits the last step left in `s.logits`, their stride and their length.
    rows: usize,
    vp: usize,
    vocab: usize,
}

impl BatchDecoder {
    /// A decoder with `threads` threads (0: one per core).
    pub fn new(threads: usize) -> Result<Self, ModelError> {
        let be = Arc::new(CpuBackend::new(threads)?);
        Ok(BatchDecoder { be, s: Scratch::default(), rows: 0, vp: 0, vocab: 0 })
    }

    /// Runs every sequence's tokens through `model` as one batch and appends them to the
    /// caches. Returns the logits (vocab_size each) of the sequences with `logits` set, in
    /// order. Checks everything before touching a cache.
    pub fn step(
        &mut self,
        model: &DecodeModel,
        seqs: &mut [StepInput<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let want = self.step_rows(model, seqs)?;
        Ok((0..want).map(|i| self.logits(i).to_vec()).collect())
    }

    /// [`BatchDecoder::step`] that leaves the logits in the decoder (no copy, no allocation):
    /// returns how many rows [`BatchDecoder::logits`] and [`BatchDecoder::sample_rows`] see.
    pub fn step_rows(
        &mut self,
        model: &DecodeModel,
        seqs: &mut [StepInput<'_>],
    ) -> Result<usize, ModelError> {
        self.rows = 0;
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
            if !s.kv.shaped_for(cfg) {
                return Err(ModelError::Shape("KV cache made for another model shape".into()));
            }
        }
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let (c, vp, v) = (cfg.n_embd, cfg.padded_vocab(), cfg.vocab_size);
        self.s.ensure(rows, c, vp);
        let be = self.be.clone();
        let want = be.run(|| forward(&be, model, &mut self.s, seqs, rows));
        (self.rows, self.vp, self.vocab) = (want, vp, v);
        Ok(want)
    }

    /// Row `i` of the last step's logits (vocab_size).
    pub fn logits(&self, i: usize) -> &[f32] {
        assert!(i < self.rows, "row {i} of {} rows of logits", self.rows);
        &self.s.logits[i * self.vp..i * self.vp + self.vocab]
    }
}

impl BatchDecoder {
    /// Samples the next token of each of `seqs` (as [`Sequence::sample`]) from the rows of
    /// logits the last [`BatchDecoder::step_rows`] left, in order; the sequences in parallel
    /// on the decoder's threads.
    pub fn sample_rows(&self, seqs: &mut [&mut Sequence]) -> Vec<Sampled> {
        assert_eq!(seqs.len(), self.rows, "one row of logits per sequence");
        self.be.run(|| {
            seqs.par_iter_mut().enumerate().map(|(i, s)| s.sample(self.logits(i))).collect()
        })
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
    let w = |tensor: Tensor, l: usize| model.small(tensor, l);
    let n = rows * c;
    let mut r = 0;
    for sq in seqs.iter() {
        for (i, &tok) in sq.tokens.iter().enumerate() {
            model.embed(tok, sq.kv.len + i, &mut s.x[r * c..(r + 1) * c]);
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
        model.linear(Tensor::QkvW, Tensor::QkvB, l, qkv, &s.ln[..n], rows);
        let hs = c / nh;
        let mut r0 = 0;
        for sq in seqs.iter_mut() {
            let (kv, t) = (&mut *sq.kv, sq.tokens.len());
            let base = l * kv.cap * c;
            let kl = key_cache_len(kv.cap, c);
            for i in 0..t {
                let src = &s.qkv[(r0 + i) * 3 * c..(r0 + i + 1) * 3 * c];
                s.q[(r0 + i) * c..(r0 + i + 1) * c].copy_from_slice(&src[..c]);
                let pos = kv.len + i;
                store_keys(&mut kv.k[l * kl..(l + 1) * kl], kv.cap, nh, pos, &src[c..2 * c]);
                for h in 0..nh {
                    let at = base + (h * kv.cap + pos) * hs;
                    kv.v[at..at + hs].copy_from_slice(&src[2 * c + h * hs..][..hs]);
                }
            }
            r0 += t;
        }
        let mut row0 = 0;
        let caches: Vec<CachedSeq<'_>> = seqs
            .iter()
            .map(|sq| {
                let (kv, rows) = (&*sq.kv, sq.tokens.len());
                let kl = key_cache_len(kv.cap, c);
                let k = &kv.k[l * kl..(l + 1) * kl];
                let v = &kv.v[l * kv.cap * c..(l + 1) * kv.cap * c];
                let seq = CachedSeq { k, v, cap: kv.cap, past: kv.len, row0, rows };
                row0 += rows;
                seq
            })
            .collect();
        attention_cached(&mut s.att[..n], &s.q[..n], &caches, c, nh);
        let proj = &mut s.proj[..n];
        model.linear(Tensor::AttProjW, Tensor::AttProjB, l, proj, &s.att[..n], rows);
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
        model.linear(Tensor::FcW, Tensor::FcB, l, fch, &s.ln[..n], rows);
        be.gelu_forward(&mut s.fchg[..4 * n], &s.fch[..4 * n], 4 * n);
        let proj = &mut s.proj[..n];
        model.linear(Tensor::FcProjW, Tensor::FcProjB, l, proj, &s.fchg[..4 * n], rows);
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
        model.lm_head(&mut s.logits[..want * vp], &s.ln[..m], want);
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
}

impl Generator {
    /// A generator over `params` in this crate's layout, its matrices kept as `dtype`.
    pub fn new(
        cfg: GptConfig,
        params: Vec<f32>,
        threads: usize,
        dtype: WeightDtype,
    ) -> Result<Self, ModelError> {
        let model = DecodeModel::new(cfg.clone(), params, dtype)?;
        let kv = KvCache::new(&cfg, cfg.block_size);
        Ok(Generator {
            cfg,
            model,
            decoder: BatchDecoder::new(threads)?,
            kv: Some(kv),
            history: Vec::new(),
        })
    }

    /// Loads the weights of a checkpoint folder (ours or `transformers`').
    pub fn from_checkpoint(
        dir: &Path,
        threads: usize,
        dtype: WeightDtype,
    ) -> Result<Self, ModelError> {
        let w = checkpoint::load_weights(dir)?;
        Self::new(w.config, w.params, threads, dtype)
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
        let out = self.decoder.step_rows(&self.model, &mut input);
        if out.is_err() && kv == 0 {
            cache.clear();
        }
        self.kv = Some(cache);
        out.inspect_err(|_| self.history.truncate(start))?;
        Ok(self.decoder.logits(0))
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
            let rows = match self.decoder.step_rows(&self.model, &mut input) {
                Ok(rows) => rows,
                Err(e) => break Err(e),
            };
            if rows > 0 {
                let next = seq.sample(self.decoder.logits(0));
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
