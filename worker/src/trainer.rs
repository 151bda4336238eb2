//! The step loop: sample, forward, backward, all-reduce, clip, AdamW; eval, metrics and
//! checkpoints around it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_data::Dataset;
use ferrite_kernels::{AdamW, Backend, CpuBackend};
use ferrite_model::checkpoint::{self, TrainerState};
use ferrite_model::job::TrainSection;
use ferrite_model::schedule::lr_at;
use ferrite_model::{Gpt, JobSpec};
use serde::{Deserialize, Serialize};

use crate::batch::{Sampler, Split};
use crate::collective::{Bucketer, Collective};
use crate::WorkerError;

/// The CPU backend of a job: its threads, and its matmul precision where the CPU has it (bf16
/// needs AMX-BF16; elsewhere the job runs in f32, and logs a warning).
pub fn cpu_backend(train: &TrainSection) -> Result<CpuBackend, WorkerError> {
    let mut be = CpuBackend::new(train.threads)?;
    let got = be.set_matmul_precision(train.matmul_precision);
    if got != train.matmul_precision {
        tracing::warn!(asked = %train.matmul_precision, running = %got, "no AMX-BF16 on this CPU");
    }
    Ok(be)
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps completed.
    pub step: u64,
    pub loss: f32,
    pub lr: f32,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub grad_norm: f32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f32>,
}

/// What the caller hears about besides steps.
#[derive(Clone, Debug)]
pub enum Event {
    Step(StepMetrics),
    Checkpoint { step: u64, path: PathBuf, val_loss: Option<f32> },
}

/// How long a write waits for the worker's lease to be confirmed before the rank gives up.
pub const FENCE_WAIT: Duration = Duration::from_secs(30);

/// Default size of a gradient bucket: large enough that per-bucket costs vanish, small
/// enough that the first buckets travel while backward is still deep in the layers.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Where one step's time went, in milliseconds (logged for every step at debug level, target
/// `ferrite_worker::trainer`).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepPhases {
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Waiting for the gradient buckets after backward (communication not hidden by it).
    pub allreduce_wait_ms: f64,
    /// Gradient norm and clipping, then AdamW.
    pub optimizer_ms: f64,
}

pub struct Trainer<B: Backend> {
    pub be: Arc<B>,
    pub spec: JobSpec,
    pub gpt: Gpt<B>,
    data: Dataset,
    collective: Box<dyn Collective<B>>,
    /// Optimizer steps completed.
    pub step: u64,
    tokens: Vec<i32>,
    targets: Vec<i32>,
    last_val: Option<f32>,
    /// Checked before every step; set from another thread to stop the run.
    stop: Arc<AtomicBool>,
    /// Asked before every write to the shared output (see [`Trainer::fence_writes`]).
    write_fence: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// Cuts the gradients into buckets for the collective as backward completes them.
    buckets: Bucketer,
    /// Timings of the last step.
    pub phases: StepPhases,
}

impl<B: Backend> Trainer<B> {
    /// Opens the data, builds the model and starts it from scratch, from `init_from` or from
    /// `resume`, as the job says.
    pub fn new(
        be: Arc<B>,
        spec: JobSpec,
        collective: Box<dyn Collective<B>>,
    ) -> Result<Self, WorkerError> {
        spec.validate()?;
        let data = Dataset::open(&spec.data.dir)?;
        let mut cfg = spec.gpt_config(data.tokenizer.vocab_size());
        let (b, t) = (spec.train.batch_size, spec.model.block_size);
        let mut step = 0;
        let mut start: Option<(PathBuf, bool)> = None;
        if let Some(dir) = &spec.train.resume {
            start = Some((dir.clone(), true));
        } else if let Some(dir) = &spec.train.init_from {
            start = Some((dir.clone(), false));
        }
        let loaded = match &start {
            Some((dir, _)) => {
                let ck = checkpoint::load_weights(dir)?;
                check_same_shape(&ck.config, &cfg, dir)?;
                cfg = ck.config.clone();
                Some(ck)
            }
            None => None,
        };
        if cfg.vocab_size < data.tokenizer.vocab_size() {
            return Err(WorkerError::Dataset(format!(
                "the data's tokenizer has {} tokens but the model only {}",
                data.tokenizer.vocab_size(),
                cfg.vocab_size
            )));
        }
        let mut gpt = Gpt::new(&*be, cfg, b, t)?;
        match (&start, loaded) {
            (Some((dir, resume)), Some(ck)) => {
                be.upload(&mut gpt.params, &ck.params)?;
                if *resume {
                    let state = checkpoint::load_state(dir)?;
                    let (m, v) = checkpoint::load_optimizer(dir, &gpt.layout)?;
                    be.upload(&mut gpt.m, &m)?;
                    be.upload(&mut gpt.v, &v)?;
                    step = state.step;
                }
            }
            _ => gpt.init_gpt2(&*be, spec.train.seed)?,
        }
        let n = b * t;
        Ok(Trainer {
            be,
            spec,
            gpt,
            data,
            collective,
            step,
            tokens: vec![0; n],
            targets: vec![0; n],
            last_val: None,
            stop: Arc::new(AtomicBool::new(false)),
            write_fence: None,
            buckets: Bucketer::new(BUCKET_BYTES / 4),
            phases: StepPhases::default(),
        })
    }

    /// Sets the size of the gradient buckets (default [`BUCKET_BYTES`]).
    pub fn set_bucket_bytes(&mut self, bytes: usize) {
        self.buckets = Bucketer::new(bytes / 4);
    }

    /// Makes [`Trainer::run`] return [`WorkerError::Stopped`] before its next step or its
    /// next write to the output, whichever comes first, once `flag` is set (from any
    /// thread).
    pub fn stop_when_set(&mut self, flag: Arc<AtomicBool>) {
        self.stop = flag;
    }

    /// A lease check before every write to the shared output (metrics line, checkpoint):
    /// `holds` says whether this worker's membership is known to be alive. While it is not
    /// (the coordinator is restarting, or this process was stalled long enough to have
    /// been declared lost and replaced), the write waits; if the lease is not renewed
    /// within [`FENCE_WAIT`], [`Trainer::run`] returns [`WorkerError::Fenced`] and writes
    /// nothing. A rank that was stopped (fenced by the coordinator) writes nothing even if
    /// `holds` says yes.
    pub fn fence_writes(&mut self, holds: impl Fn() -> bool + Send + Sync + 'static) {
        self.write_fence = Some(Box::new(holds));
    }

    fn check_fence(&self) -> Result<(), WorkerError> {
        // A rank told to stop writes nothing more, whatever the lease says: the lease may
        // already be confirmed again for this worker's next registration.
        if self.stop.load(Ordering::Relaxed) {
            return Err(WorkerError::Stopped { step: self.step });
        }
        let Some(holds) = &self.write_fence else { return Ok(()) };
        let since = Instant::now();
        while !holds() {
            if self.stop.load(Ordering::Relaxed) || since.elapsed() > FENCE_WAIT {
                let waited_ms = since.elapsed().as_millis() as u64;
                return Err(WorkerError::Fenced { step: self.step, waited_ms });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn tokens_per_step(&self) -> usize {
        let t = &self.spec.train;
        t.batch_size * self.spec.model.block_size * t.grad_accum * self.collective.world()
    }

    /// Runs until `max_steps`, calling `on_event` after every step and checkpoint.
    pub fn run(&mut self, mut on_event: impl FnMut(&Event) + Send) -> Result<(), WorkerError>
    where
        Self: Send,
    {
        let be = self.be.clone();
        // The backend may run the loop on another thread: carry the caller's span there.
        let span = tracing::Span::current();
        be.run(|| span.in_scope(|| self.run_loop(&mut on_event)))
    }

    fn run_loop(&mut self, on_event: &mut (impl FnMut(&Event) + Send)) -> Result<(), WorkerError> {
        let out = self.spec.output.dir.clone();
        let rank0 = self.collective.rank() == 0;
        let mut metrics = if rank0 { Some(open_metrics(&out, self.step)?) } else { None };
        let tr = self.spec.train.clone();
        let total = tr.max_steps;
        while self.step < total {
            if self.stop.load(Ordering::Relaxed) {
                return Err(WorkerError::Stopped { step: self.step });
            }
            let _span = tracing::info_span!("step", step = self.step + 1).entered();
            let started = Instant::now();
            let (loss, lr, norm) = self.train_step()?;
            let step_ms = started.elapsed().as_secs_f64() * 1e3;
            self.step += 1;
            let last = self.step == total;
            let mut val_loss = None;
            if (tr.eval_interval > 0 && self.step.is_multiple_of(tr.eval_interval)) || last {
                val_loss = Some(self.eval()?);
                self.last_val = val_loss;
            }
            let m = StepMetrics {
                step: self.step,
                loss,
                lr,
                step_ms,
                tokens_per_s: self.tokens_per_step() as f64 / (step_ms / 1e3),
                grad_norm: norm,
                val_loss,
            };
            if let Some(f) = metrics.as_mut() {
                self.check_fence()?;
                let line = serde_json::to_string(&m).expect("metrics serialise");
                writeln!(f, "{line}").map_err(WorkerError::io("metrics.jsonl"))?;
            }
            on_event(&Event::Step(m));
            let every = self.spec.output.checkpoint_interval;
            if rank0 && ((every > 0 && self.step.is_multiple_of(every)) || last) {
                self.check_fence()?;
                let path = self.save_checkpoint()?;
                on_event(&Event::Checkpoint { step: self.step, path, val_loss: self.last_val });
            }
        }
        Ok(())
    }

    /// One optimizer step; returns (mean loss over ranks and micro-batches, lr, grad norm).
    ///
    /// The last micro-batch's backward hands each bucket of final gradients to the
    /// collective as it completes, so averaging overlaps the rest of backward; the step
    /// waits for all of them before clipping.
    pub fn train_step(&mut self) -> Result<(f32, f32, f32), WorkerError> {
        let tr = &self.spec.train;
        let (b, t) = (tr.batch_size, self.spec.model.block_size);
        let (rank, world) = (self.collective.rank(), self.collective.world());
        let lr = lr_at(self.step, tr.learning_rate, tr.min_lr, tr.warmup_steps, tr.lr_decay_steps);
        let mut sampler = Sampler::new(
            &self.data.train,
            self.data.train_mask.as_ref(),
            tr.seed,
            Split::Train,
            t,
        )?;
        let be = &*self.be;
        let mut phases = StepPhases::default();
        let mut clock = Instant::now();
        let mut lap = |into: &mut f64| {
            *into += clock.elapsed().as_secs_f64() * 1e3;
            clock = Instant::now();
        };
        self.gpt.zero_grad(be);
        let mut loss_sum = 0.0f64;
        let mut bucket_err = None;
        for micro in 0..tr.grad_accum {
            sampler.fill(self.step, micro, rank, world, b, &mut self.tokens, &mut self.targets);
            let loss = self
                .gpt
                .forward(be, &self.tokens, Some(&self.targets), b, t)?
                .expect("targets given");
            lap(&mut phases.forward_ms);
            let scale = 1.0 / tr.grad_accum as f32;
            if micro + 1 < tr.grad_accum {
                self.gpt.backward(be, loss, scale)?;
            } else {
                let (coll, buckets) = (&mut self.collective, &mut self.buckets);
                let mut start = |g: &B::Buf, bucket: &[std::ops::Range<usize>]| {
                    if bucket_err.is_none() {
                        bucket_err = coll.start_bucket(be, g, bucket).err();
                    }
                };
                self.gpt.backward_with(be, loss, scale, &mut |g, ranges| {
                    for r in ranges {
                        buckets.push(r.clone(), &mut |bucket| start(g, bucket));
                    }
                })?;
                buckets.flush(&mut |bucket| start(&self.gpt.grads, bucket));
            }
            lap(&mut phases.backward_ms);
            loss_sum += loss.mean as f64;
        }
        if let Some(e) = bucket_err {
            return Err(e);
        }
        let n = self.gpt.layout.len();
        self.collective.finish_buckets(be, &mut self.gpt.grads, n)?;
        let loss = self.collective.mean_scalar(loss_sum / tr.grad_accum as f64)? as f32;
        lap(&mut phases.allreduce_wait_ms);
        let opt = AdamW {
            lr,
            beta1: tr.beta1,
            beta2: tr.beta2,
            eps: tr.eps,
            weight_decay: tr.weight_decay,
            grad_scale: 1.0,
            step: self.step + 1,
        };
        let norm = self.gpt.step(be, &opt, tr.grad_clip);
        lap(&mut phases.optimizer_ms);
        tracing::debug!(
            forward_ms = phases.forward_ms as u64,
            backward_ms = phases.backward_ms as u64,
            allreduce_wait_ms = phases.allreduce_wait_ms as u64,
            optimizer_ms = phases.optimizer_ms as u64,
            "step phases"
        );
        self.phases = phases;
        Ok((loss, lr, norm))
    }

    /// Mean validation loss over `eval_steps` fixed batches (the same ones every time).
    pub fn eval(&mut self) -> Result<f32, WorkerError> {
        let tr = &self.spec.train;
        let (b, t) = (tr.batch_size, self.spec.model.block_size);
        let (rank, world) = (self.collective.rank(), self.collective.world());
        let mut sampler =
            Sampler::new(&self.data.val, self.data.val_mask.as_ref(), tr.seed, Split::Val, t)?;
        let mut sum = 0.0f64;
        let steps = tr.eval_steps.max(1);
        for k in 0..steps {
            sampler.fill(k, 0, rank, world, b, &mut self.tokens, &mut self.targets);
            let loss = self
                .gpt
                .forward(&*self.be, &self.tokens, Some(&self.targets), b, t)?
                .expect("targets given");
            sum += loss.mean as f64;
        }
        Ok(self.collective.mean_scalar(sum / steps as f64)? as f32)
    }

    /// Writes a checkpoint of the current step under `<output>/checkpoints/` and prunes old
    /// ones; returns its folder.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf, WorkerError> {
        let state = TrainerState {
            step: self.step,
            data_position: self.step,
            seed: self.spec.train.seed,
            val_loss: self.last_val,
            job: self.spec.clone(),
        };
        let root = self.spec.output.dir.join("checkpoints");
        let path = checkpoint::save(
            &*self.be,
            &self.gpt,
            &state,
            &self.spec.data.dir.join("tokenizer.json"),
            &root,
        )?;
        checkpoint::prune(&root, self.spec.output.keep_checkpoints)?;
        Ok(path)
    }
}

fn check_same_shape(
    ck: &ferrite_model::GptConfig,
    job: &ferrite_model::GptConfig,
    dir: &Path,
) -> Result<(), WorkerError> {
    let same = ck.n_layer == job.n_layer
        && ck.n_head == job.n_head
        && ck.n_embd == job.n_embd
        && ck.block_size >= job.block_size;
    if same {
        Ok(())
    } else {
        Err(WorkerError::Dataset(format!(
            "checkpoint {} has shape {ck:?}, the job asks for {job:?}",
            dir.display()
        )))
    }
}

/// Opens `metrics.jsonl` for appending, first dropping lines past `step` (a resumed run
/// rewrites what the interrupted one logged after its checkpoint).
///
/// The kept lines go to a new file that is renamed over the old one, so a stale writer of an
/// earlier attempt (a process stalled past its lease that wakes up between its lease check
/// and its write) appends to the replaced file, which nobody reads, never into this one.
fn open_metrics(out: &Path, step: u64) -> Result<File, WorkerError> {
    std::fs::create_dir_all(out).map_err(WorkerError::io(out.display().to_string()))?;
    let path = out.join("metrics.jsonl");
    let kept: String = if step == 0 {
        String::new()
    } else {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= step))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let fresh = out.join(format!(".metrics.jsonl.{}", std::process::id()));
    let err = WorkerError::io(fresh.display().to_string());
    std::fs::write(&fresh, kept).map_err(err)?;
    std::fs::rename(&fresh, &path).map_err(WorkerError::io(path.display().to_string()))?;
    OpenOptions::new().append(true).open(&path).map_err(WorkerError::io(path.display().to_string()))
}
