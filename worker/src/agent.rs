//! The worker process's side of the cluster (`ferrite worker`): register with the
//! coordinator, hold the `Attach` stream, and run the ranks it assigns.
//!
//! One rank runs at a time, on its own thread (the step loop is CPU-bound and blocking);
//! the async side only moves messages. The collective listener is bound once at start and
//! reused by every rank this worker runs; each ring's handshake carries a token derived from
//! (job, attempt), so a peer of an older attempt can never join a newer ring.
//!
//! Failures:
//! - The stream breaks (coordinator restarting): the rank keeps training, the agent
//!   reattaches with backoff and names the rank in its hello, and repeats the last result it
//!   could not deliver.
//! - The coordinator no longer knows this worker (its lease expired while it was stalled or
//!   cut off): the worker has been fenced; it stops its rank at once and registers again.
//! - A cancellation stops the rank before its next step and breaks its ring connections, so
//!   neither it nor its peers wait for an I/O timeout.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrite_kernels::CpuBackend;
use ferrite_model::JobSpec;
use ferrite_proto::v1 as pb;
use pb::worker_service_client::WorkerServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

use crate::collective::{RingAbort, RingCollective, RingConfig};
use crate::trainer::Event;
use crate::{Trainer, WorkerError};

/// How a worker joins the cluster.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `http://HOST:PORT` of the coordinator.
    pub coordinator: String,
    /// CPU threads for the step loop.
    pub threads: usize,
    /// Where the collective (TCP ring) listens.
    pub listen: SocketAddr,
    /// `host:port` peers use to reach the collective listener; defaults to the bound
    /// address when that is not a wildcard.
    pub advertise: Option<String>,
    pub hostname: String,
}

/// What the worker knows once it is up.
#[derive(Clone, Debug)]
pub struct Ready {
    pub worker_id: String,
    pub collective_addr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("coordinator {url}: {why}")]
    Coordinator { url: String, why: String },
    #[error("collective listener {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// The rank this worker runs, shared with its thread.
struct Running {
    task: TaskRef,
    stop: Arc<AtomicBool>,
    ring: Arc<Mutex<Option<RingAbort>>>,
}

impl Running {
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(ring) = self.ring.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            ring.abort();
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct TaskRef {
    job_id: String,
    attempt: u32,
    rank: u32,
}

/// Runs the worker until `shutdown` completes; calls `ready` once registered.
pub async fn run(
    cfg: AgentConfig,
    ready: impl FnOnce(&Ready),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    if cfg.threads == 0 {
        return Err(AgentError::Config("--threads must be at least 1".into()));
    }
    let listener = TcpListener::bind(cfg.listen)
        .map_err(|source| AgentError::Listen { addr: cfg.listen, source })?;
    let bound =
        listener.local_addr().map_err(|source| AgentError::Listen { addr: cfg.listen, source })?;
    let advertise = match &cfg.advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            return Err(AgentError::Config(format!(
            "the collective listens on {bound}; say with --advertise HOST:PORT how peers reach it"
        )))
        }
        None => bound.to_string(),
    };
    let mut agent = Agent {
        cfg,
        advertise,
        listener: Arc::new(listener),
        client: None,
        worker_id: None,
        running: None,
        undelivered: None,
        events: mpsc::unbounded_channel(),
        heartbeat: Duration::from_millis(500),
    };
    agent.register().await?;
    ready(&Ready {
        worker_id: agent.worker_id.clone().unwrap_or_default(),
        collective_addr: agent.advertise.clone(),
    });
    tokio::select! {
        r = agent.serve() => r,
        _ = shutdown => {
            if let Some(r) = &agent.running {
                r.stop();
            }
            Ok(())
        }
    }
}

/// A report from the rank's thread.
type Report = pb::worker_message::Body;

struct Agent {
    cfg: AgentConfig,
    advertise: String,
    listener: Arc<TcpListener>,
    client: Option<WorkerServiceClient<Channel>>,
    worker_id: Option<String>,
    running: Option<Running>,
    /// The last rank result, repeated on every attach until a stream takes it.
    undelivered: Option<pb::TaskResult>,
    events: (mpsc::UnboundedSender<Report>, mpsc::UnboundedReceiver<Report>),
    /// As the coordinator asked at registration.
    heartbeat: Duration,
}

/// Backoff while the coordinator is unreachable.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl Agent {
    fn url(&self) -> String {
        self.cfg.coordinator.clone()
    }

    fn coordinator_error(&self, why: impl std::fmt::Display) -> AgentError {
        AgentError::Coordinator { url: self.url(), why: why.to_string() }
    }

    async fn client(&mut self) -> Result<WorkerServiceClient<Channel>, AgentError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let endpoint = Channel::from_shared(self.url())
            .map_err(|e| AgentError::Config(format!("--coordinator {}: {e}", self.url())))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_lazy();
        let client = WorkerServiceClient::new(channel);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Registers, retrying while the coordinator is unreachable.
    async fn register(&mut self) -> Result<(), AgentError> {
        let caps = pb::WorkerCapabilities {
            device_kind: pb::DeviceKind::Cpu as i32,
            device_count: 0,
            memory_bytes: host_memory_bytes(),
            threads: self.cfg.threads as u32,
            collective_addr: self.advertise.clone(),
            hostname: self.cfg.hostname.clone(),
        };
        let mut delay = RETRY_MIN;
        loop {
            let mut client = self.client().await?;
            let req = pb::RegisterWorkerRequest { capabilities: Some(caps.clone()) };
            match client.register_worker(req).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    tracing::info!(worker = %resp.worker_id, "registered");
                    self.worker_id = Some(resp.worker_id);
                    self.heartbeat =
                        Duration::from_millis(resp.heartbeat_interval_ms.max(50).into());
                    return Ok(());
                }
                Err(s) if s.code() == Code::Unavailable => {
                    tracing::debug!(status = %s.message(), "coordinator unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
                Err(s) => return Err(self.coordinator_error(s.message())),
            }
        }
    }

    /// Attaches and serves assignments, reattaching or re-registering as needed.
    async fn serve(&mut self) -> Result<(), AgentError> {
        let mut delay = RETRY_MIN;
        loop {
            match self.attached().await {
                Ok(()) => delay = RETRY_MIN,
                Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {
                    tracing::warn!(status = %s.message(), "fenced by the coordinator; stopping the rank and registering again");
                    if let Some(r) = self.running.take() {
                        r.stop();
                    }
                    self.undelivered = None;
                    self.register().await?;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated
                    ) =>
                {
                    return Err(self.coordinator_error(s.message()));
                }
                Err(s) => {
                    tracing::info!(status = %s.message(), "coordinator stream lost; reattaching");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One `Attach` stream, until it ends.
    async fn attached(&mut self) -> Result<(), tonic::Status> {
        let worker_id = self.worker_id.clone().unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel::<pb::WorkerMessage>();
        let send = |body: Report| tx.send(pb::WorkerMessage { body: Some(body) }).is_ok();
        let mut hello = pb::AttachHello { worker_id, ..Default::default() };
        if let Some(r) = &self.running {
            hello.job_id = r.task.job_id.clone();
            hello.attempt = r.task.attempt;
            hello.rank = r.task.rank;
        }
        send(Report::Hello(hello));
        if let Some(result) = self.undelivered.clone() {
            send(Report::Result(result));
        }
        let mut client =
            self.client().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut inbound = client.attach(UnboundedReceiverStream::new(rx)).await?.into_inner();
        self.undelivered = None;
        let mut beat = tokio::time::interval(self.heartbeat);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    send(Report::Heartbeat(pb::Heartbeat { sent_unix_ms: now_unix_ms() }));
                }
                report = self.events.1.recv() => {
                    let Some(report) = report else { continue };
                    if let Report::Result(r) = &report {
                        let task = TaskRef { job_id: r.job_id.clone(), attempt: r.attempt, rank: r.rank };
                        if self.running.as_ref().is_some_and(|run| run.task == task) {
                            self.running = None;
                        }
                        self.undelivered = Some(r.clone());
                    }
                    send(report);
                }
                msg = inbound.next() => match msg {
                    Some(Ok(msg)) => self.on_message(msg),
                    Some(Err(s)) => return Err(s),
                    None => return Err(tonic::Status::unavailable("the coordinator closed the stream")),
                },
            }
        }
    }

    fn on_message(&mut self, msg: pb::CoordinatorMessage) {
        use pb::coordinator_message::Body;
        match msg.body {
            Some(Body::Assignment(a)) => self.start(a),
            Some(Body::Cancellation(c)) => {
                let target = self
                    .running
                    .as_ref()
                    .filter(|r| r.task.job_id == c.job_id && r.task.attempt == c.attempt);
                if let Some(r) = target {
                    tracing::info!(job = %c.job_id, reason = %c.reason, "stopping the rank");
                    r.stop();
                }
            }
            Some(Body::Rendezvous(_)) | None => {}
        }
    }

    fn start(&mut self, a: pb::Assignment) {
        let task = TaskRef { job_id: a.job_id.clone(), attempt: a.attempt, rank: a.rank };
        if let Some(r) = &self.running {
            let why = format!("this worker still runs rank {} of {}", r.task.rank, r.task.job_id);
            let _ = self.events.0.send(failed(&task, &why));
            return;
        }
        tracing::info!(job = %a.job_id, attempt = a.attempt, rank = a.rank, world = a.world_size, "assignment");
        let running = Running {
            task: task.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            ring: Arc::new(Mutex::new(None)),
        };
        let rank = RankRun {
            assignment: a,
            threads: self.cfg.threads,
            listener: self.listener.clone(),
            stop: running.stop.clone(),
            ring: running.ring.clone(),
            events: self.events.0.clone(),
        };
        self.running = Some(running);
        let name = format!("rank-{}-{}", task.job_id, task.rank);
        let spawned = std::thread::Builder::new().name(name).spawn(move || rank.run());
        if let Err(e) = spawned {
            let _ = self.events.0.send(failed(&task, &format!("starting the rank's thread: {e}")));
        }
    }
}

fn failed(task: &TaskRef, why: &str) -> Report {
    Report::Result(pb::TaskResult {
        job_id: task.job_id.clone(),
        attempt: task.attempt,
        rank: task.rank,
        succeeded: false,
        message: why.to_owned(),
        final_step: 0,
    })
}

/// Everything one rank's thread needs.
struct RankRun {
    assignment: pb::Assignment,
    threads: usize,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    ring: Arc<Mutex<Option<RingAbort>>>,
    events: mpsc::UnboundedSender<Report>,
}

impl RankRun {
    fn run(self) {
        let a = &self.assignment;
        let task = TaskRef { job_id: a.job_id.clone(), attempt: a.attempt, rank: a.rank };
        let mut final_step = 0;
        let result = self.train(&mut final_step);
        let (succeeded, message) = match &result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e.to_string()),
        };
        if let Err(e) = &result {
            tracing::warn!(job = %task.job_id, rank = task.rank, error = %e, "rank ended");
        }
        let _ = self.events.send(Report::Result(pb::TaskResult {
            job_id: task.job_id,
            attempt: task.attempt,
            rank: task.rank,
            succeeded,
            message,
            final_step,
        }));
    }

    fn train(&self, final_step: &mut u64) -> Result<(), WorkerError> {
        let a = &self.assignment;
        let spec = rank_spec(a, self.threads)?;
        let peers = a
            .peer_addrs
            .iter()
            .map(|p| resolve(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(WorkerError::Collective)?;
        let listener = self.listener.try_clone().map_err(WorkerError::io("collective listener"))?;
        let token = ring_token(&a.job_id, a.attempt);
        let be = Arc::new(CpuBackend::new(spec.train.threads)?);
        if self.stop.load(Ordering::Relaxed) {
            return Err(WorkerError::Stopped { step: 0 });
        }
        let ring =
            RingCollective::connect(listener, RingConfig::new(a.rank as usize, peers, token))?;
        *self.ring.lock().unwrap_or_else(|e| e.into_inner()) = Some(ring.abort_handle()?);
        let mut trainer = Trainer::new(be, spec, Box::new(ring))?;
        trainer.stop_when_set(self.stop.clone());
        *final_step = trainer.step;
        let (job_id, attempt, rank) = (a.job_id.clone(), a.attempt, a.rank);
        let send = |body: Report| {
            let _ = self.events.send(body);
        };
        send(Report::Running(pb::RankRunning { job_id: job_id.clone(), attempt, rank }));
        let result = trainer.run(|ev| match ev {
            Event::Step(m) if rank == 0 => send(Report::Progress(pb::Progress {
                job_id: job_id.clone(),
                attempt,
                rank,
                metrics: Some(pb::StepMetrics {
                    step: m.step,
                    train_loss: m.loss,
                    val_loss: m.val_loss,
                    learning_rate: m.lr,
                    grad_norm: m.grad_norm,
                    tokens_per_second: m.tokens_per_s,
                    step_ms: m.step_ms,
                }),
            })),
            Event::Step(_) => {}
            Event::Checkpoint { step, path, val_loss } => {
                send(Report::Checkpoint(pb::CheckpointWritten {
                    attempt,
                    checkpoint: Some(pb::Checkpoint {
                        job_id: job_id.clone(),
                        step: *step,
                        path: absolute(path).display().to_string(),
                        val_loss: *val_loss,
                        created_unix_ms: now_unix_ms(),
                    }),
                }))
            }
        });
        *final_step = trainer.step;
        result
    }
}

/// The job file as this rank runs it: the worker's threads, the checkpoint to resume from,
/// and, when the job runs on fewer workers than it asked for, gradient accumulation scaled
/// so the global batch (and the math) stays the same.
fn rank_spec(a: &pb::Assignment, threads: usize) -> Result<JobSpec, WorkerError> {
    let toml = a.spec.as_ref().map(|s| s.toml.as_str()).unwrap_or_default();
    let mut spec = JobSpec::parse(toml)?;
    spec.train.threads = threads;
    if let Some(r) = &a.resume {
        spec.train.resume = Some(PathBuf::from(&r.checkpoint_path));
    }
    let (wanted, world) = (spec.cluster.workers.max(1), a.world_size.max(1) as usize);
    if world != wanted {
        if !wanted.is_multiple_of(world) {
            return Err(WorkerError::Dataset(format!(
                "the job asks for {wanted} workers and runs on {world}; the global batch can \
                 only be kept by gradient accumulation when {world} divides {wanted}"
            )));
        }
        spec.train.grad_accum *= wanted / world;
    }
    Ok(spec)
}

/// Same on every rank of an attempt, different between attempts and jobs.
fn ring_token(job_id: &str, attempt: u32) -> u64 {
    // FNV-1a: stable across processes and builds (std's hasher is randomly keyed).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job_id.bytes().chain(attempt.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("peer address `{addr}`: {e}"))?
        .next()
        .ok_or_else(|| format!("peer address `{addr}` resolves to nothing"))
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn now_unix_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Total memory from `/proc/meminfo` (0 where unknown).
fn host_memory_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_tokens_differ_between_attempts_and_jobs() {
        let a = ring_token("job-000001", 1);
        assert_eq!(a, ring_token("job-000001", 1));
        assert_ne!(a, ring_token("job-000001", 2));
        assert_ne!(a, ring_token("job-000002", 1));
    }
}
