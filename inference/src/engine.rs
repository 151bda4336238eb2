//! The scheduler: a bounded queue in front of a running batch (continuous batching).
//!
//! One thread runs steps. Before each step it drops sequences whose client went away or
//! whose deadline passed, and admits queued requests while the batch has room and their KV
//! caches fit the memory budget. A step feeds every decoding sequence its last token and
//! gives prefilling sequences at most `prefill_chunk` prompt tokens in all (chunked prefill,
//! so a long prompt delays the others by at most one step's worth); when no sequence is
//! decoding, nobody waits on the step and prefill takes up to [`IDLE_PREFILL_CHUNK`] tokens
//! (fewer steps, each reading every weight once). Sequences sampled on
//! different checkpoints (during a switch) run in one step per checkpoint: each request
//! finishes on the weights it started with.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferrite_data::Tokenizer;
use ferrite_model::checkpoint::TOKENIZER_FILE;
use ferrite_model::generate::{
    BatchDecoder, DecodeModel, KvCache, LongPrompt, Sequence, WeightDtype,
};
use ferrite_model::sample::Sampled;
use ferrite_model::GptConfig;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::{InferenceError, Result};
use crate::metrics::Metrics;
use crate::request::{
    Completion, Event, FailReason, FinishReason, GenerateRequest, ModelVersion, Prompt,
};
use crate::text::TextStream;

/// Prompt tokens per step when no sequence is decoding.
pub const IDLE_PREFILL_CHUNK: usize = 512;

/// KV caches are sized in multiples of this many positions (up to the context), so that a
/// finished sequence's cache fits the next requests of similar length ([`KvPool`]).
const KV_GRANULE: usize = 64;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Most requests waiting for a slot; beyond, `ResourceExhausted`.
    pub max_queue: usize,
    /// Memory for every running sequence's KV cache together.
    pub kv_cache_bytes: usize,
    /// Most prompt tokens prefilled per step, over all sequences, while any sequence is
    /// decoding (else up to [`IDLE_PREFILL_CHUNK`] if that is more).
    pub prefill_chunk: usize,
    /// Decode threads (0: one per core).
    pub threads: usize,
    /// The number format the served checkpoints' matrices are kept in.
    pub dtype: WeightDtype,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 16,
            max_queue: 64,
            kv_cache_bytes: 2 << 30,
            prefill_chunk: 64,
            threads: 0,
            dtype: WeightDtype::F32,
        }
    }
}

/// A checkpoint loaded and ready to serve.
pub struct ServedModel {
    pub version: ModelVersion,
    pub model: DecodeModel,
    pub tokenizer: Tokenizer,
}

impl ServedModel {
    /// Loads the weights (matrices as `dtype`) and the `tokenizer.json` of a checkpoint
    /// folder.
    pub fn load(dir: &Path, version: ModelVersion, dtype: WeightDtype) -> Result<Self> {
        let model = DecodeModel::from_checkpoint(dir, dtype)?;
        let tokenizer = Tokenizer::load(&dir.join(TOKENIZER_FILE))?;
        Ok(ServedModel { version, model, tokenizer })
    }

    /// The prompt's token ids (an empty text starts from end-of-text, or token 0).
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Tokens(t) => Ok(t.clone()),
            Prompt::Text(text) => {
                let mut ids = self.tokenizer.encode(text)?;
                if ids.is_empty() {
                    ids.push(self.tokenizer.eot().unwrap_or(0));
                }
                Ok(ids)
            }
        }
    }
}

/// Runs the scheduler thread until dropped.
pub struct Engine {
    handle: EngineHandle,
    thread: Option<JoinHandle<()>>,
}

/// Submits requests and switches checkpoints; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

struct Shared {
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    queue: VecDeque<Queued>,
    model: Option<Arc<ServedModel>>,
    stop: bool,
}

struct Queued {
    req: GenerateRequest,
    prompt: Vec<u32>,
    kv_positions: usize,
    events: UnboundedSender<Event>,
    arrived: Instant,
}

impl Engine {
    /// Starts the scheduler; `model` may come later through [`EngineHandle::set_model`].
    pub fn start(
        cfg: EngineConfig,
        model: Option<Arc<ServedModel>>,
        metrics: Arc<Metrics>,
    ) -> Result<Engine> {
        if cfg.max_batch == 0 || cfg.max_queue == 0 || cfg.prefill_chunk == 0 {
            return Err(InferenceError::invalid(
                "engine",
                "max_batch, max_queue and prefill_chunk must be at least 1",
            ));
        }
        let decoder = BatchDecoder::new(cfg.threads)?;
        let shared = Arc::new(Shared {
            cfg,
            metrics,
            state: Mutex::new(State { queue: VecDeque::new(), model, stop: false }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferrite-scheduler".into())
            .spawn(move || {
                let pool = KvPool::default();
                Scheduler { shared: s, decoder, active: Vec::new(), kv_used: 0, pool }.run()
            })
            .map_err(|e| InferenceError::Coordinator(format!("scheduler thread: {e}")))?;
        Ok(Engine { handle: EngineHandle { shared }, thread: Some(thread) })
    }

    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.handle.lock().stop = true;
        self.handle.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl EngineHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Serves `model` to every request admitted from now on.
    pub fn set_model(&self, model: Arc<ServedModel>) {
        tracing::info!(step = model.version.step, path = %model.version.path, "serving checkpoint");
        self.lock().model = Some(model);
        self.shared.wake.notify_all();
    }

    /// The number format checkpoints are loaded in for this engine.
    pub fn dtype(&self) -> WeightDtype {
        self.shared.cfg.dtype
    }

    /// The checkpoint new requests get, if any.
    pub fn model(&self) -> Option<Arc<ServedModel>> {
        self.lock().model.clone()
    }

    /// Validates and queues a request; its events arrive on the returned receiver. Dropping
    /// the receiver cancels the request (its slot is freed at the next step).
    pub fn submit(&self, req: GenerateRequest) -> Result<UnboundedReceiver<Event>> {
        let m = &self.shared.metrics;
        let r = self.try_submit(req);
        match &r {
            Ok(_) => m.requests.fetch_add(1, Ordering::Relaxed),
            Err(_) => m.rejected.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    fn try_submit(&self, req: GenerateRequest) -> Result<UnboundedReceiver<Event>> {
        req.validate()?;
        let model = self.model().ok_or_else(|| {
            InferenceError::NotFound("no checkpoint is published for this job yet".into())
        })?;
        let cfg = &model.model.cfg;
        let prompt = model.prompt_tokens(&req.prompt)?;
        let vocab = cfg.vocab_size as u32;
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(InferenceError::invalid(
                "prompt",
                format!("token id {bad} outside the vocabulary of {vocab}"),
            ));
        }
        if prompt.len() > cfg.block_size && req.long_prompt == LongPrompt::Refuse {
            return Err(InferenceError::invalid(
                "prompt",
                format!(
                    "{} tokens is longer than the model's context of {} (ask to truncate)",
                    prompt.len(),
                    cfg.block_size
                ),
            ));
        }
        let kv_positions = Sequence::kv_positions(cfg, prompt.len(), req.max_tokens)
            .next_multiple_of(KV_GRANULE)
            .min(cfg.block_size);
        let need = model.model.kv_bytes(kv_positions);
        if need > self.shared.cfg.kv_cache_bytes {
            return Err(InferenceError::ResourceExhausted(format!(
                "a KV cache of {need} bytes for {kv_positions} positions exceeds the budget of {}",
                self.shared.cfg.kv_cache_bytes
            )));
        }
        let (tx, rx) = unbounded_channel();
        let mut st = self.lock();
        if st.stop {
            return Err(InferenceError::ShuttingDown);
        }
        if st.queue.len() >= self.shared.cfg.max_queue {
            return Err(InferenceError::ResourceExhausted(format!(
                "the queue is full ({} requests waiting)",
                st.queue.len()
            )));
        }
        st.queue.push_back(Queued {
            req,
            prompt,
            kv_positions,
            events: tx,
            arrived: Instant::now(),
        });
        self.shared.metrics.queue_depth.store(st.queue.len() as u64, Ordering::Relaxed);
        drop(st);
        self.shared.wake.notify_all();
        Ok(rx)
    }

    /// Runs a request to the end and gathers its events.
    pub async fn generate(&self, req: GenerateRequest) -> Result<Completion> {
        let want_logprobs = req.logprobs;
        let mut rx = self.submit(req)?;
        let mut c = Completion {
            model: ModelVersion::default(),
            prompt_tokens: Vec::new(),
            text: String::new(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: FinishReason::Length,
        };
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Started { model, prompt_tokens } => {
                    (c.model, c.prompt_tokens) = (model, prompt_tokens)
                }
                Event::Piece { text, tokens, logprobs } => {
                    c.text.push_str(&text);
                    c.tokens.extend(tokens);
                    c.logprobs.extend(logprobs);
                }
                Event::Done { finish, kept_tokens } => {
                    c.finish = finish;
                    c.tokens.truncate(kept_tokens);
                    if want_logprobs {
                        c.logprobs.truncate(kept_tokens);
                    }
                    return Ok(c);
                }
                Event::Failed(f) => return Err(f.into()),
            }
        }
        Err(InferenceError::ShuttingDown)
    }
}

/// A request in the running batch.
struct Active {
    model: Arc<ServedModel>,
    seq: Sequence,
    events: UnboundedSender<Event>,
    text: TextStream,
    ids: Vec<u32>,
    logprobs: bool,
    deadline: Option<Instant>,
    kv_bytes: usize,
    arrived: Instant,
    last_token: Option<Instant>,
}

struct Scheduler {
    shared: Arc<Shared>,
    decoder: BatchDecoder,
    active: Vec<Active>,
    /// Bytes of the running sequences' caches.
    kv_used: usize,
    pool: KvPool,
}

/// Caches of finished sequences, kept for the next ones: a fresh cache costs a page fault
/// and the kernel's zeroing of each page on first touch (75 MB for a full GPT-2-124M
/// context), a reused one nothing. Spares count against `kv_cache_bytes` together with the running
/// caches; the oldest are freed first when room is needed.
#[derive(Default)]
struct KvPool {
    spares: std::collections::VecDeque<(KvCache, usize)>,
    bytes: usize,
}

impl KvPool {
    /// A spare of exactly `cap` positions for `cfg`'s shape, emptied.
    fn take(&mut self, cfg: &GptConfig, cap: usize) -> Option<KvCache> {
        let i = self.spares.iter().position(|(kv, _)| kv.fits(cfg, cap))?;
        let (mut kv, bytes) = self.spares.remove(i)?;
        self.bytes -= bytes;
        kv.clear();
        Some(kv)
    }

    fn put(&mut self, kv: KvCache, bytes: usize) {
        self.spares.push_back((kv, bytes));
        self.bytes += bytes;
    }

    /// Frees the oldest spares until at most `bytes` are kept.
    fn shrink_to(&mut self, bytes: usize) {
        while self.bytes > bytes {
            let Some((_, b)) = self.spares.pop_front() else { break };
            self.bytes -= b;
        }
    }
}

impl Scheduler {
    fn run(mut self) {
        while self.admit() {
            self.drop_gone();
            if self.active.is_empty() {
                continue;
            }
            let mut models: Vec<Arc<ServedModel>> = Vec::new();
            for a in &self.active {
                if !models.iter().any(|m| Arc::ptr_eq(m, &a.model)) {
                    models.push(a.model.clone());
                }
            }
            for m in models {
                self.step(&m);
            }
            self.publish_gauges();
        }
        for a in self.active.drain(..) {
            let _ = a.events.send(Event::Failed(FailReason::ShuttingDown));
        }
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        for q in st.queue.drain(..) {
            let _ = q.events.send(Event::Failed(FailReason::ShuttingDown));
        }
    }

    /// Waits for work and moves queued requests into the batch while they fit; false once
    /// the engine is stopping.
    fn admit(&mut self) -> bool {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.stop {
                return false;
            }
            if !self.active.is_empty() || !st.queue.is_empty() {
                break;
            }
            st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let now = Instant::now();
        while self.active.len() < cfg.max_batch {
            let Some(q) = st.queue.front() else { break };
            if q.events.is_closed() {
                st.queue.pop_front();
                continue;
            }
            if q.req.deadline.is_some_and(|d| d <= now) {
                let q = st.queue.pop_front().expect("front");
                let _ = q.events.send(Event::Failed(FailReason::DeadlineExceeded(0)));
                continue;
            }
            let Some(model) = st.model.clone() else { break };
            let bytes = model.model.kv_bytes(q.kv_positions);
            if self.kv_used + bytes > cfg.kv_cache_bytes {
                break; // waits for running sequences to free memory
            }
            let q = st.queue.pop_front().expect("front");
            self.start(model, q, bytes);
        }
        shared.metrics.queue_depth.store(st.queue.len() as u64, Ordering::Relaxed);
        if self.active.is_empty() && !st.queue.is_empty() {
            // Nothing runs and the head does not fit yet (no model): do not spin.
            let _ = shared.wake.wait_timeout(st, Duration::from_millis(50));
        }
        true
    }

    fn start(&mut self, model: Arc<ServedModel>, q: Queued, kv_bytes: usize) {
        let cfg = &model.model.cfg;
        let kv = match self.pool.take(cfg, q.kv_positions) {
            Some(kv) => kv,
            None => {
                // Room for the new cache beside the running ones, spares freed as needed.
                let budget = self.shared.cfg.kv_cache_bytes;
                self.pool.shrink_to(budget.saturating_sub(self.kv_used + kv_bytes));
                KvCache::new(cfg, q.kv_positions)
            }
        };
        let r = &q.req;
        match Sequence::new(cfg, &q.prompt, r.max_tokens, r.sampling, r.long_prompt, kv) {
            Ok(seq) => {
                let started = Event::Started {
                    model: model.version.clone(),
                    prompt_tokens: q.prompt.clone(),
                };
                if q.events.send(started).is_err() {
                    return;
                }
                self.shared
                    .metrics
                    .prompt_tokens
                    .fetch_add(q.prompt.len() as u64, Ordering::Relaxed);
                self.kv_used += kv_bytes;
                self.active.push(Active {
                    text: TextStream::new(&r.stop),
                    logprobs: r.logprobs,
                    deadline: r.deadline,
                    model,
                    seq,
                    events: q.events,
                    ids: Vec::new(),
                    kv_bytes,
                    arrived: q.arrived,
                    last_token: None,
                });
            }
            Err(e) => {
                let why = e.to_string();
                let _ = q.events.send(Event::Failed(FailReason::Invalid { field: "prompt", why }));
            }
        }
    }

    /// Frees the slots of cancelled requests and fails those past their deadline.
    fn drop_gone(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.active.len() {
            let a = &self.active[i];
            let expired = a.deadline.is_some_and(|d| d <= now);
            if a.events.is_closed() || expired {
                let a = self.active.swap_remove(i);
                if expired {
                    let n = a.seq.generated();
                    let _ = a.events.send(Event::Failed(FailReason::DeadlineExceeded(n)));
                }
                self.release(a);
            } else {
                i += 1;
            }
        }
    }

    /// One batched step of the sequences running on `model`.
    fn step(&mut self, model: &Arc<ServedModel>) {
        let chunk = self.shared.cfg.prefill_chunk;
        let decoding = self.active.iter().any(|a| a.seq.pending() <= 1);
        let mut budget = if decoding { chunk } else { chunk.max(IDLE_PREFILL_CHUNK) };
        let mut members = Vec::new();
        let mut inputs = Vec::new();
        // Decoding sequences first (one token each), then prefill in arrival order.
        let mut order: Vec<usize> =
            (0..self.active.len()).filter(|&i| Arc::ptr_eq(&self.active[i].model, model)).collect();
        order.sort_by_key(|&i| (self.active[i].seq.pending() > 1, self.active[i].arrived));
        let mut take: Vec<Option<usize>> = vec![None; self.active.len()];
        for &i in &order {
            let pending = self.active[i].seq.pending();
            if pending <= 1 {
                take[i] = Some(1);
            } else if budget > 0 {
                let n = pending.min(budget);
                budget -= n;
                take[i] = Some(n);
            }
        }
        for (i, a) in self.active.iter_mut().enumerate() {
            if let Some(n) = take[i] {
                let input = a.seq.input(n);
                members.push((i, input.logits));
                inputs.push(input);
            }
        }
        if inputs.is_empty() {
            return;
        }
        let result = self.decoder.step_rows(&model.model, &mut inputs);
        drop(inputs);
        if let Err(e) = result {
            tracing::error!(error = %e, "decode step failed");
            for &(i, _) in &members {
                let why = FailReason::Internal(e.to_string());
                let _ = self.active[i].events.send(Event::Failed(why));
            }
            let failed: Vec<usize> = members.iter().map(|m| m.0).collect();
            self.remove(&failed);
            return;
        }
        // Members are in increasing index order, as are their rows of logits.
        let wanting: Vec<usize> = members.iter().filter(|m| m.1).map(|m| m.0).collect();
        let mut seqs: Vec<&mut Sequence> = self
            .active
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| wanting.binary_search(i).is_ok())
            .map(|(_, a)| &mut a.seq)
            .collect();
        let sampled = self.decoder.sample_rows(&mut seqs);
        drop(seqs);
        let mut finished = Vec::new();
        for (&i, s) in wanting.iter().zip(sampled) {
            if self.emit(i, s) {
                finished.push(i);
            }
        }
        self.remove(&finished);
    }

    /// Sends request `i`'s newly sampled token; true when the request is done.
    fn emit(&mut self, i: usize, s: Sampled) -> bool {
        let metrics = self.shared.metrics.clone();
        let a = &mut self.active[i];
        let now = Instant::now();
        match a.last_token {
            None => metrics.time_to_first_token.observe(now - a.arrived),
            Some(t) => metrics.inter_token_latency.observe(now - t),
        }
        a.last_token = Some(now);
        metrics.add_generated(1);
        a.ids.push(s.token);
        let tok = &a.model.tokenizer;
        let text = match tok.decode_bytes(&a.ids) {
            Ok(bytes) => a.text.advance(&bytes).to_string(),
            Err(e) => {
                let _ = a.events.send(Event::Failed(FailReason::Internal(e.to_string())));
                return true;
            }
        };
        let logprobs = if a.logprobs { vec![s.logprob] } else { Vec::new() };
        let _ = a.events.send(Event::Piece { text, tokens: vec![s.token], logprobs });
        let stop = a.text.stopped() || Some(s.token) == tok.eot();
        if !stop && !a.seq.finished() {
            return false;
        }
        let rest = a.text.finish().to_string();
        if !rest.is_empty() {
            let piece = Event::Piece { text: rest, tokens: Vec::new(), logprobs: Vec::new() };
            let _ = a.events.send(piece);
        }
        let kept = a.text.kept_tokens(tok, &a.ids).unwrap_or(a.ids.len());
        let finish = if stop { FinishReason::Stop } else { FinishReason::Length };
        let _ = a.events.send(Event::Done { finish, kept_tokens: kept });
        true
    }

    fn remove(&mut self, idx: &[usize]) {
        let mut idx = idx.to_vec();
        idx.sort_unstable();
        for &i in idx.iter().rev() {
            let a = self.active.swap_remove(i);
            self.release(a);
        }
    }

    /// A sequence leaves: its cache goes to the pool.
    fn release(&mut self, a: Active) {
        self.kv_used -= a.kv_bytes;
        self.pool.put(a.seq.into_kv(), a.kv_bytes);
    }

    fn publish_gauges(&self) {
        let m = &self.shared.metrics;
        m.active_sequences.store(self.active.len() as u64, Ordering::Relaxed);
        m.kv_cache_bytes_used.store(self.kv_used as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_embd: usize) -> GptConfig {
        GptConfig { n_layer: 2, n_head: 2, n_embd, block_size: 256, vocab_size: 50 }
    }

    #[test]
    fn the_pool_hands_back_a_cache_of_the_same_shape_and_frees_the_oldest_first() {
        let mut pool = KvPool::default();
        let (a, b) = (cfg(16), cfg(32));
        pool.put(KvCache::new(&a, 64), 100);
        pool.put(KvCache::new(&a, 128), 200);
        pool.put(KvCache::new(&b, 64), 300);
        assert!(pool.take(&a, 192).is_none(), "no spare of 192 positions");
        let kv = pool.take(&a, 64).expect("the 64-position spare of shape a");
        assert!(kv.fits(&a, 64));
        assert_eq!(pool.bytes, 500);
        pool.shrink_to(350);
        assert_eq!(pool.bytes, 300, "the older spare went first");
        assert!(pool.take(&a, 128).is_none());
        assert!(pool.take(&b, 64).is_some());
        assert_eq!(pool.bytes, 0);
    }
}
