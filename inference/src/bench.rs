//! The decode benchmark behind `ferrite bench decode`: the serving engine on a GPT-2-124M
//! shaped model (random weights, or a checkpoint), measured the way `bench/hf_decode.py`
//! measures Hugging Face transformers:
//!
//! - batch 1: one request of `new_tokens`; tokens/s after the first token;
//! - `streams` requests submitted at once (continuous batching): all their tokens over the
//!   wall time from submission to the last one, prefill included;
//! - time to first token: one request of one token per prompt length.
//!
//! Sampling is plain temperature 1 over the whole vocabulary (HF's `do_sample=True,
//! top_k=0`). Each measurement is repeated `reps` times; the report keeps every run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_data::Tokenizer;
use ferrite_model::generate::{DecodeModel, LongPrompt, WeightDtype};
use ferrite_model::layout::ParamLayout;
use ferrite_model::sample::SamplingParams;
use ferrite_model::GptConfig;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{Engine, EngineConfig, EngineHandle, ServedModel};
use crate::error::{InferenceError, Result};
use crate::metrics::Metrics;
use crate::request::{Event, GenerateRequest, ModelVersion, Prompt};

/// What to measure.
#[derive(Clone, Debug)]
pub struct DecodeBench {
    /// Decode threads.
    pub threads: usize,
    /// Concurrent requests of the aggregate measurement.
    pub streams: usize,
    /// Tokens each request of the batch-1 and aggregate measurements generates.
    pub new_tokens: usize,
    /// Prompt length of the batch-1 and aggregate requests.
    pub prompt: usize,
    /// Prompt lengths of the time-to-first-token measurement (at most the context).
    pub ttft_prompts: Vec<usize>,
    /// Runs of each measurement.
    pub reps: usize,
    /// A checkpoint folder to serve instead of random GPT-2-124M weights.
    pub checkpoint: Option<PathBuf>,
    /// The number format of the served matrices.
    pub dtype: WeightDtype,
}

impl Default for DecodeBench {
    fn default() -> Self {
        DecodeBench {
            threads: 2,
            streams: 8,
            new_tokens: 128,
            prompt: 16,
            ttft_prompts: vec![16, 64, 256, 512, 1024],
            reps: 3,
            checkpoint: None,
            dtype: WeightDtype::F32,
        }
    }
}

/// Every run of every measurement.
#[derive(Clone, Debug)]
pub struct DecodeReport {
    pub model: String,
    pub dtype: WeightDtype,
    pub threads: usize,
    pub streams: usize,
    pub new_tokens: usize,
    pub batch1_tokens_per_s: Vec<f64>,
    pub aggregate_tokens_per_s: Vec<f64>,
    /// (prompt length, milliseconds of each run).
    pub ttft_ms: Vec<(usize, Vec<f64>)>,
}

/// The middle value (the upper one of an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl DecodeReport {
    /// One JSON object: medians, and every run.
    pub fn json(&self) -> serde_json::Value {
        let ttft: Vec<_> = self
            .ttft_ms
            .iter()
            .map(|(n, ms)| serde_json::json!({"prompt": n, "ms": median(ms), "runs": ms}))
            .collect();
        serde_json::json!({
            "peer": "ferrite", "bench": "decode", "model": self.model, "threads": self.threads,
            "dtype": self.dtype.to_string(),
            "new_tokens": self.new_tokens,
            "batch1_tokens_per_s": median(&self.batch1_tokens_per_s),
            "batch1_runs": self.batch1_tokens_per_s,
            "streams": self.streams,
            "aggregate_tokens_per_s": median(&self.aggregate_tokens_per_s),
            "aggregate_runs": self.aggregate_tokens_per_s,
            "ttft": ttft,
        })
    }

    /// A Markdown table of the medians (min–max of the runs beside them).
    pub fn table(&self) -> String {
        let span = |xs: &[f64], digits: usize| {
            let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{:.digits$} ({lo:.digits$}–{hi:.digits$})", median(xs))
        };
        let mut t = format!(
            "{}, {} weights, {} threads, {} new tokens\n\n| measurement | median (min–max of {} runs) |\n|---|---|\n",
            self.model,
            self.dtype,
            self.threads,
            self.new_tokens,
            self.batch1_tokens_per_s.len()
        );
        t += &format!("| batch 1, tokens/s | {} |\n", span(&self.batch1_tokens_per_s, 1));
        t += &format!(
            "| {} streams, aggregate tokens/s | {} |\n",
            self.streams,
            span(&self.aggregate_tokens_per_s, 1)
        );
        for (n, ms) in &self.ttft_ms {
            t += &format!("| time to first token, {n}-token prompt, ms | {} |\n", span(ms, 0));
        }
        t
    }
}

/// GPT-2-124M-shaped weights, uniform in ±0.02 from a fixed seed (the speed does not depend
/// on the values).
pub fn random_gpt2_small(seed: u64, dtype: WeightDtype) -> Result<DecodeModel> {
    let cfg = GptConfig::gpt2_small(50_257);
    let n = ParamLayout::new(&cfg).len();
    let mut state = seed | 1;
    let params: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect();
    Ok(DecodeModel::new(cfg, params, dtype)?)
}

/// Runs every measurement of `b`.
pub fn run(b: &DecodeBench) -> Result<DecodeReport> {
    let (model, name) = match &b.checkpoint {
        Some(dir) => {
            let m = ServedModel::load(dir, ModelVersion::default(), b.dtype)?;
            (m, format!("checkpoint {}", dir.display()))
        }
        None => {
            let model = random_gpt2_small(0x9e37_79b9_7f4a_7c15, b.dtype)?;
            let tokenizer = Tokenizer::gpt2();
            let m = ServedModel { version: ModelVersion::default(), model, tokenizer };
            (m, "GPT-2-124M shape (random weights)".to_string())
        }
    };
    let cfg = model.model.cfg.clone();
    if let Some(&n) = b.ttft_prompts.iter().find(|&&n| n == 0 || n > cfg.block_size) {
        return Err(InferenceError::invalid(
            "ttft_prompts",
            format!("a prompt of {n} tokens for a context of {}", cfg.block_size),
        ));
    }
    let ecfg = EngineConfig {
        max_batch: b.streams.max(1),
        threads: b.threads,
        dtype: b.dtype,
        ..EngineConfig::default()
    };
    let engine = Engine::start(ecfg, Some(Arc::new(model)), Arc::new(Metrics::default()))?;
    let h = engine.handle();
    let vocab = cfg.vocab_size as u32;

    let warm = h.submit(request(vocab, b.prompt, 8, 0))?;
    token_times(warm)?;
    let mut report = DecodeReport {
        model: name,
        dtype: b.dtype,
        threads: b.threads,
        streams: b.streams,
        new_tokens: b.new_tokens,
        batch1_tokens_per_s: Vec::new(),
        aggregate_tokens_per_s: Vec::new(),
        ttft_ms: b.ttft_prompts.iter().map(|&n| (n, Vec::new())).collect(),
    };
    for rep in 0..b.reps.max(1) {
        let seed = rep as u64 + 1;
        // Batch 1: the time between the first and the last token.
        let times = token_times(h.submit(request(vocab, b.prompt, b.new_tokens, seed))?)?;
        if let (Some(first), Some(last)) = (times.first(), times.last()) {
            let span = (*last - *first).as_secs_f64();
            report.batch1_tokens_per_s.push((times.len() - 1) as f64 / span.max(1e-9));
        }
        report.aggregate_tokens_per_s.push(aggregate(&h, b, vocab, seed)?);
        for (n, runs) in report.ttft_ms.iter_mut() {
            let t0 = Instant::now();
            let times = token_times(h.submit(request(vocab, *n, 1, seed))?)?;
            let first = times.first().map_or(Duration::ZERO, |t| *t - t0);
            runs.push(first.as_secs_f64() * 1e3);
        }
    }
    Ok(report)
}

/// `b.streams` requests submitted together: their tokens over the time until the last is done.
fn aggregate(h: &EngineHandle, b: &DecodeBench, vocab: u32, seed: u64) -> Result<f64> {
    let t0 = Instant::now();
    let rxs = (0..b.streams)
        .map(|i| h.submit(request(vocab, b.prompt, b.new_tokens, seed * 1000 + i as u64)))
        .collect::<Result<Vec<_>>>()?;
    let mut tokens = 0;
    for rx in rxs {
        tokens += token_times(rx)?.len();
    }
    Ok(tokens as f64 / t0.elapsed().as_secs_f64())
}

/// Waits for a request to finish; the time each of its tokens arrived.
fn token_times(mut rx: UnboundedReceiver<Event>) -> Result<Vec<Instant>> {
    let mut times = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Piece { tokens, .. } => {
                let now = Instant::now();
                times.extend(tokens.iter().map(|_| now));
            }
            Event::Done { .. } => return Ok(times),
            Event::Failed(f) => return Err(f.into()),
            Event::Started { .. } => {}
        }
    }
    Err(InferenceError::ShuttingDown)
}

/// A request of `len` prompt tokens spread over the vocabulary, sampled at temperature 1.
fn request(vocab: u32, len: usize, max_tokens: usize, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Tokens((0..len as u32).map(|i| (i * 7919 + 13) % vocab).collect()),
        max_tokens,
        sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed },
        stop: Vec::new(),
        logprobs: false,
        long_prompt: LongPrompt::Refuse,
        deadline: None,
    }
}
