//! The worker's Prometheus metrics (`ferrite worker --http-listen`): step time, tokens/s,
//! all-reduce time and bytes, checkpoint write time and size.
//!
//! Kept in atomics and written in the text exposition format by hand, as the serving role
//! does (`ferrite-inference`'s `metrics`): a dozen series need no client library. The rank's
//! thread feeds [`WorkerMetrics::record`] from the trainer's events, and [`Timed`] wraps the
//! rank's [`Collective`] to time every gradient all-reduce.

use std::fmt::Write;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::header;
use axum::routing::get;
use axum::Router;
use ferrite_kernels::Backend;

use crate::collective::Collective;
use crate::trainer::Event;
use crate::WorkerError;

/// Upper bounds (seconds) of the duration histograms' buckets.
const BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A cumulative histogram of durations.
#[derive(Debug)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (bound, c) in BUCKETS.iter().zip(&self.counts) {
            if s <= *bound {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", c.load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ =
            writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}\n{name}_sum {sum}\n{name}_count {n}");
    }
}

/// An f64 gauge in an atomic.
#[derive(Debug, Default)]
struct Gauge(AtomicU64);

impl Gauge {
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// The rank this worker runs (or ran last), for the gauges' labels.
#[derive(Clone, Debug)]
struct Task {
    job: String,
    rank: u32,
    world: u32,
    step: u64,
}

/// Everything the worker's `/metrics` shows; one per process, shared by its ranks' threads.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    task: Mutex<Option<Task>>,
    /// When the last step's event came; a checkpoint's event follows its write, which
    /// follows that step's event at once, so the difference is the write time.
    last_step_at: Mutex<Option<Instant>>,
    steps: AtomicU64,
    step_seconds: Histogram,
    last_step_seconds: Gauge,
    tokens_per_second: Gauge,
    allreduce_seconds: Histogram,
    allreduce_bytes: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_write_seconds: Histogram,
    last_checkpoint_seconds: Gauge,
    last_checkpoint_bytes: AtomicU64,
}

impl WorkerMetrics {
    /// A rank of `world` starts on this worker; the gauges now describe it.
    pub fn rank_started(&self, job: &str, rank: u32, world: u32) {
        let task = Task { job: job.to_owned(), rank, world: world.max(1), step: 0 };
        *self.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        *self.last_step_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Takes in one of the trainer's events.
    pub fn record(&self, event: &Event) {
        match event {
            Event::Step(m) => {
                *self.last_step_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                let world = {
                    let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
                    task.as_mut().map_or(1, |t| {
                        t.step = m.step;
                        t.world
                    })
                };
                self.steps.fetch_add(1, Ordering::Relaxed);
                let secs = m.step_ms / 1e3;
                self.step_seconds.observe(Duration::from_secs_f64(secs.max(0.0)));
                self.last_step_seconds.set(secs);
                // The trainer reports the whole job's tokens; this rank did its share.
                self.tokens_per_second.set(m.tokens_per_s / world as f64);
            }
            Event::Checkpoint { step, path, .. } => {
                let since = *self.last_step_at.lock().unwrap_or_else(|e| e.into_inner());
                let took = since.map_or(Duration::ZERO, |t| t.elapsed());
                let bytes = dir_bytes(path);
                self.checkpoints.fetch_add(1, Ordering::Relaxed);
                self.checkpoint_write_seconds.observe(took);
                self.last_checkpoint_seconds.set(took.as_secs_f64());
                self.last_checkpoint_bytes.store(bytes, Ordering::Relaxed);
                tracing::info!(
                    step,
                    bytes,
                    write_ms = took.as_secs_f64() * 1e3,
                    path = %path.display(),
                    "checkpoint written"
                );
            }
        }
    }

    fn observe_allreduce(&self, took: Duration, bytes: u64) {
        self.allreduce_seconds.observe(took);
        self.allreduce_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let labels = task.as_ref().map_or(String::new(), |t| {
            format!("{{job=\"{}\",rank=\"{}\"}}", escape(&t.job), t.rank)
        });
        let one = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let labelled = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            if task.is_some() {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        labelled(
            &mut out,
            "ferrite_worker_step",
            "Optimizer steps completed by the rank this worker runs or ran last.",
            task.as_ref().map_or(0.0, |t| t.step as f64),
        );
        labelled(
            &mut out,
            "ferrite_worker_step_seconds_last",
            "Duration of the rank's last optimizer step (forward, backward, all-reduce, AdamW).",
            self.last_step_seconds.get(),
        );
        labelled(
            &mut out,
            "ferrite_worker_tokens_per_second",
            "Training tokens per second this rank processed in its last step.",
            self.tokens_per_second.get(),
        );
        self.step_seconds.write(
            &mut out,
            "ferrite_worker_step_seconds",
            "Duration of optimizer steps on this worker.",
        );
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        one(
            &mut out,
            "ferrite_worker_steps_total",
            "counter",
            "Optimizer steps run.",
            ld(&self.steps),
        );
        self.allreduce_seconds.write(
            &mut out,
            "ferrite_worker_allreduce_seconds",
            "Duration of gradient all-reduces (waiting for peers included).",
        );
        one(
            &mut out,
            "ferrite_worker_allreduce_bytes_total",
            "counter",
            "Gradient bytes all-reduced (buffer size, f32; a ring sends about 2(n-1)/n of it).",
            ld(&self.allreduce_bytes),
        );
        one(
            &mut out,
            "ferrite_worker_checkpoints_written_total",
            "counter",
            "Checkpoints this worker wrote (rank 0 writes them).",
            ld(&self.checkpoints),
        );
        self.checkpoint_write_seconds.write(
            &mut out,
            "ferrite_worker_checkpoint_write_seconds",
            "Duration of checkpoint writes (temporary folder, fsync, rename, pruning).",
        );
        one(
            &mut out,
            "ferrite_worker_checkpoint_write_seconds_last",
            "gauge",
            "Duration of the last checkpoint write.",
            self.last_checkpoint_seconds.get().to_string(),
        );
        one(
            &mut out,
            "ferrite_worker_checkpoint_bytes_last",
            "gauge",
            "Size on disk of the last checkpoint written.",
            ld(&self.last_checkpoint_bytes),
        );
        out
    }
}

/// A [`Collective`] that times every gradient all-reduce of the one it wraps.
pub struct Timed<B: Backend> {
    inner: Box<dyn Collective<B>>,
    metrics: Arc<WorkerMetrics>,
}

impl<B: Backend> Timed<B> {
    pub fn new(inner: Box<dyn Collective<B>>, metrics: Arc<WorkerMetrics>) -> Self {
        Timed { inner, metrics }
    }

    /// Runs `f` on the inner collective, recorded as an all-reduce of `len` gradients.
    fn timed<R>(&mut self, len: usize, f: impl FnOnce(&mut dyn Collective<B>) -> R) -> R {
        let started = Instant::now();
        let result = f(self.inner.as_mut());
        // Gradients are f32 on every backend.
        let bytes = (len * std::mem::size_of::<f32>()) as u64;
        self.metrics.observe_allreduce(started.elapsed(), bytes);
        result
    }
}

impl<B: Backend> Collective<B> for Timed<B> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world(&self) -> usize {
        self.inner.world()
    }

    fn all_reduce_mean(&mut self, be: &B, buf: &mut B::Buf, len: usize) -> Result<(), WorkerError> {
        self.timed(len, |c| c.all_reduce_mean(be, buf, len))
    }

    fn mean_scalar(&mut self, x: f64) -> Result<f64, WorkerError> {
        self.inner.mean_scalar(x)
    }

    // Buckets pass through, so the ring overlaps them with backward; what is timed is the
    // wait after backward (the all-reduce time the step actually pays).
    fn start_bucket(
        &mut self,
        be: &B,
        buf: &B::Buf,
        ranges: &[std::ops::Range<usize>],
    ) -> Result<(), WorkerError> {
        self.inner.start_bucket(be, buf, ranges)
    }

    fn finish_buckets(&mut self, be: &B, buf: &mut B::Buf, len: usize) -> Result<(), WorkerError> {
        self.timed(len, |c| c.finish_buckets(be, buf, len))
    }
}

/// Serves `GET /metrics` until `shutdown` completes, with TLS and tokens as `security` says.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<WorkerMetrics>,
    security: ferrite_security::ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let body = metrics.render();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
        }),
    );
    ferrite_security::http::serve(listener, app, &security, shutdown).await
}

/// Bytes of the files under `dir` (0 where it cannot be read).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::StepMetrics;
    use crate::Single;
    use ferrite_kernels::CpuBackend;

    fn step(step: u64, step_ms: f64, tokens_per_s: f64) -> Event {
        Event::Step(StepMetrics {
            step,
            loss: 3.0,
            lr: 1e-3,
            step_ms,
            tokens_per_s,
            grad_norm: 1.0,
            val_loss: None,
        })
    }

    #[test]
    fn steps_and_checkpoints_show_with_the_rank_labels() {
        let m = WorkerMetrics::default();
        m.rank_started("job-000007", 1, 2);
        m.record(&step(1, 20.0, 1000.0));
        m.record(&step(2, 30.0, 800.0));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), vec![0u8; 1234]).unwrap();
        let path = dir.path().to_path_buf();
        m.record(&Event::Checkpoint { step: 2, path, val_loss: None });
        let text = m.render();
        let labels = "{job=\"job-000007\",rank=\"1\"}";
        assert!(text.contains(&format!("ferrite_worker_step{labels} 2\n")), "{text}");
        assert!(text.contains(&format!("ferrite_worker_step_seconds_last{labels} 0.03\n")));
        // Half of the job's 800 tokens/s: this rank is one of two.
        assert!(text.contains(&format!("ferrite_worker_tokens_per_second{labels} 400\n")));
        assert!(text.contains("ferrite_worker_step_seconds_bucket{le=\"0.025\"} 1\n"), "{text}");
        assert!(text.contains("ferrite_worker_step_seconds_count 2\n"));
        assert!(text.contains("ferrite_worker_steps_total 2\n"));
        assert!(text.contains("ferrite_worker_checkpoints_written_total 1\n"));
        assert!(text.contains("ferrite_worker_checkpoint_bytes_last 1234\n"), "{text}");
    }

    #[test]
    fn timed_collective_counts_all_reduce_bytes() {
        let metrics = Arc::new(WorkerMetrics::default());
        let be = CpuBackend::new(1).unwrap();
        let mut c: Timed<CpuBackend> = Timed::new(Box::new(Single), metrics.clone());
        let mut buf = vec![1.0f32; 100];
        c.all_reduce_mean(&be, &mut buf, 100).unwrap();
        c.all_reduce_mean(&be, &mut buf, 50).unwrap();
        let text = metrics.render();
        assert!(text.contains("ferrite_worker_allreduce_bytes_total 600\n"), "{text}");
        assert!(text.contains("ferrite_worker_allreduce_seconds_count 2\n"), "{text}");
        // No rank yet: the labelled gauges have no sample.
        assert!(!text.contains("ferrite_worker_step{"), "{text}");
    }
}
