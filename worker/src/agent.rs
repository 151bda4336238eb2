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
//!   Before that answer arrives, a rank resuming from a stall could still write: so a rank
//!   writes metrics and checkpoints only while the worker's lease is confirmed, i.e. a
//!   heartbeat sent less than 3/5 of the lease ago was acknowledged ([`Lease`]).
//! - A cancellation stops the rank before its next step and breaks its ring connections (a
//!   GPU rank's NCCL communicator is aborted by its watchdog), so neither it nor its peers
//!   wait for an I/O timeout or a collective that cannot finish.
//!
//! GPU ranks of a job of several workers meet through NCCL: rank 0 makes the unique id and
//! reports it (`NcclUniqueId`, repeated on every reattach while the rank runs), the
//! coordinator relays it to the other ranks (`Rendezvous`), whose threads wait for it in
//! their [`IdSlot`] and then all join the communicator.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrite_kernels::cuda::Device;
use ferrite_kernels::Backend;
use ferrite_model::JobSpec;
use ferrite_proto::v1 as pb;
use ferrite_security::{connect, AuthChannel, Credentials};
use pb::worker_service_client::WorkerServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use tonic::Code;

use crate::collective::{IdSlot, RingAbort, RingCollective, RingConfig};

use crate::metrics::{Timed, WorkerMetrics};
use crate::trainer::Event;
use crate::{Trainer, WorkerError};

/// How a worker joins the cluster.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `http://HOST:PORT` of the coordinator, or several comma-separated (the leader is
    /// followed).
    pub coordinator: String,
    /// CPU threads for the step loop.
    pub threads: usize,
    /// Where the collective (TCP ring) listens.
    pub listen: SocketAddr,
    /// `host:port` peers use to reach the collective listener; defaults to the bound
    /// address when that is not a wildcard.
    pub advertise: Option<String>,
    pub hostname: String,
    /// What the ranks train on: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    pub device: Device,
    /// Step, all-reduce and checkpoint metrics of the ranks this worker runs.
    pub metrics: Arc<WorkerMetrics>,
    /// TLS trust and the worker join token presented to the coordinator.
    pub credentials: Credentials,
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
    /// Rank 0's NCCL unique id, as the coordinator relays it (GPU ranks > 0).
    nccl_id: Arc<IdSlot>,
    /// The NCCL unique id this rank made (GPU rank 0), repeated on every reattach so a
    /// restarted coordinator can still relay it.
    announced: Option<pb::NcclUniqueId>,
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
    let urls = connect::parse_urls(&cfg.coordinator, &cfg.credentials)
        .map_err(|e| AgentError::Config(format!("--coordinator: {e}")))?;
    let mut agent = Agent {
        cfg,
        urls,
        advertise,
        listener: Arc::new(listener),
        client: None,
        worker_id: None,
        running: None,
        undelivered: None,
        events: mpsc::unbounded_channel(),
        heartbeat: Duration::from_millis(500),
        lease_ttl: Duration::ZERO,
        lease: Arc::new(Lease::new()),
        beats: Beats::default(),
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

/// This worker's membership as last confirmed by the coordinator. A heartbeat sent at `t`
/// and acknowledged proves the coordinator kept the lease alive at or after `t`, so the
/// lease holds until `t` plus part of its TTL (3/5, leaving room for a late heartbeat) on
/// this process's monotonic clock. A process stalled for longer (SIGSTOP) finds it expired
/// when it resumes, and stays unconfirmed: the coordinator has dropped it.
struct Lease {
    origin: Instant,
    /// Milliseconds after `origin` until which the lease holds.
    until_ms: AtomicU64,
}

impl Lease {
    fn new() -> Self {
        Lease { origin: Instant::now(), until_ms: AtomicU64::new(0) }
    }

    fn renew(&self, sent: Instant, ttl: Duration) {
        let until = sent.saturating_duration_since(self.origin) + ttl * 3 / 5;
        self.until_ms.fetch_max(until.as_millis() as u64, Ordering::SeqCst);
    }

    fn revoke(&self) {
        self.until_ms.store(0, Ordering::SeqCst);
    }

    fn holds(&self) -> bool {
        (self.origin.elapsed().as_millis() as u64) < self.until_ms.load(Ordering::SeqCst)
    }
}

/// The last heartbeats sent: their ids (the worker's clock, strictly increasing) and when.
#[derive(Default)]
struct Beats(std::collections::VecDeque<(i64, Instant)>);

impl Beats {
    /// Records a heartbeat going out now; returns its id.
    fn sent(&mut self) -> i64 {
        let last = self.0.back().map_or(i64::MIN, |b| b.0);
        let id = now_unix_ms().max(last.saturating_add(1));
        if self.0.len() == 32 {
            self.0.pop_front();
        }
        self.0.push_back((id, Instant::now()));
        id
    }

    /// When the acknowledged heartbeat went out, if it is one of ours.
    fn acked(&self, id: i64) -> Option<Instant> {
        self.0.iter().find(|b| b.0 == id).map(|b| b.1)
    }
}

/// A report from the rank's thread.
type Report = pb::worker_message::Body;

struct Agent {
    cfg: AgentConfig,
    /// The coordinators to follow (`--coordinator`, comma-separated).
    urls: Vec<String>,
    advertise: String,
    listener: Arc<TcpListener>,
    client: Option<WorkerServiceClient<AuthChannel>>,
    worker_id: Option<String>,
    running: Option<Running>,
    /// The last rank result, repeated on every attach until a stream takes it.
    undelivered: Option<pb::TaskResult>,
    events: (mpsc::UnboundedSender<Report>, mpsc::UnboundedReceiver<Report>),
    /// As the coordinator asked at registration.
    heartbeat: Duration,
    /// How long the coordinator keeps this worker without a heartbeat.
    lease_ttl: Duration,
    /// The membership as last confirmed by the coordinator; ranks write only while it holds.
    lease: Arc<Lease>,
    /// Heartbeats sent, to time their acknowledgements.
    beats: Beats,
}

/// How long a GPU rank > 0 waits for rank 0's NCCL id (rank 0 loads NCCL and makes it in
/// well under a second; a rank 0 that fails is cancelled, and so are the waiting ranks).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const NCCL_ID_TIMEOUT: Duration = Duration::from_secs(300);

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

    /// A client of the leading coordinator (`Unavailable` while none can be found).
    async fn client(&mut self) -> Result<WorkerServiceClient<AuthChannel>, tonic::Status> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let creds = &self.cfg.credentials;
        let channel = if let [url] = self.urls.as_slice() {
            // One URL (perhaps a load balancer): connect lazily, calls retry while it is down.
            connect::open_lazy(url, creds)
                .map_err(|e| tonic::Status::invalid_argument(format!("--coordinator {url}: {e}")))?
        } else {
            let (url, channel) =
                connect::connect(&self.urls, connect::WORKER_SERVICE, Duration::ZERO, creds)
                    .await
                    .map_err(tonic::Status::unavailable)?;
            tracing::info!(coordinator = %url, "following the leading coordinator");
            channel
        };
        let client = WorkerServiceClient::new(creds.authed(channel));
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Registers, retrying while the coordinator is unreachable.
    async fn register(&mut self) -> Result<(), AgentError> {
        let caps = pb::WorkerCapabilities {
            device_kind: match self.cfg.device {
                Device::Cpu => pb::DeviceKind::Cpu as i32,
                Device::Cuda(_) => pb::DeviceKind::Cuda as i32,
            },
            device_count: u32::from(matches!(self.cfg.device, Device::Cuda(_))),
            memory_bytes: host_memory_bytes(),
            threads: self.cfg.threads as u32,
            collective_addr: self.advertise.clone(),
            hostname: self.cfg.hostname.clone(),
        };
        let mut delay = RETRY_MIN;
        loop {
            let req = pb::RegisterWorkerRequest { capabilities: Some(caps.clone()) };
            let answer = match self.client().await {
                Ok(mut client) => client.register_worker(req).await,
                Err(s) => Err(s),
            };
            match answer {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    tracing::info!(worker = %resp.worker_id, "registered");
                    self.worker_id = Some(resp.worker_id);
                    self.heartbeat =
                        Duration::from_millis(resp.heartbeat_interval_ms.max(50).into());
                    self.lease_ttl = Duration::from_millis(resp.lease_ttl_ms.into());
                    return Ok(());
                }
                Err(s) if s.code() == Code::Unavailable => {
                    // Said at warning level: a TLS mismatch or a wrong address looks just like
                    // a coordinator that is still starting, and must not retry in silence.
                    let why =
                        connect::with_hint(&self.urls.join(","), s.message().to_owned()).await;
                    tracing::warn!(status = %why, "coordinator unavailable; retrying");
                    self.client = None;
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
                    // The stopped rank keeps the old lease, revoked for good; the next
                    // registration's heartbeats confirm a new one.
                    self.lease.revoke();
                    self.lease = Arc::new(Lease::new());
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
                    self.client = None;
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
        if let Some(announced) = self.running.as_ref().and_then(|r| r.announced.clone()) {
            send(Report::NcclId(announced));
        }
        if let Some(result) = self.undelivered.clone() {
            send(Report::Result(result));
        }
        let mut client = self.client().await?;
        let mut inbound = client.attach(UnboundedReceiverStream::new(rx)).await?.into_inner();
        self.undelivered = None;
        let mut beat = tokio::time::interval(self.heartbeat);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    let sent_unix_ms = self.beats.sent();
                    send(Report::Heartbeat(pb::Heartbeat { sent_unix_ms }));
                }
                report = self.events.1.recv() => {
                    let Some(report) = report else { continue };
                    if let (Report::NcclId(n), Some(run)) = (&report, self.running.as_mut()) {
                        if run.task.job_id == n.job_id && run.task.attempt == n.attempt {
                            run.announced = Some(n.clone());
                        }
                    }
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
            Some(Body::HeartbeatAck(ack)) => {
                if let Some(sent) = self.beats.acked(ack.sent_unix_ms) {
                    self.lease.renew(sent, self.lease_ttl);
                }
            }
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
            Some(Body::Rendezvous(r)) => {
                let target = self
                    .running
                    .as_ref()
                    .filter(|run| run.task.job_id == r.job_id && run.task.attempt == r.attempt);
                match target {
                    Some(run) => run.nccl_id.deliver(r.nccl_unique_id),
                    None => {
                        tracing::debug!(job = %r.job_id, attempt = r.attempt, "stale rendezvous ignored")
                    }
                }
            }
            None => {}
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
            nccl_id: Arc::new(IdSlot::new()),
            announced: None,
        };
        let rank = RankRun {
            assignment: a,
            threads: self.cfg.threads,
            device: self.cfg.device,
            listener: self.listener.clone(),
            stop: running.stop.clone(),
            ring: running.ring.clone(),
            nccl_id: running.nccl_id.clone(),
            events: self.events.0.clone(),
            metrics: self.cfg.metrics.clone(),
            lease: self.lease.clone(),
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
    device: Device,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    ring: Arc<Mutex<Option<RingAbort>>>,
    /// Where a GPU rank > 0 waits for rank 0's NCCL id (read only by the CUDA path).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    nccl_id: Arc<IdSlot>,
    events: mpsc::UnboundedSender<Report>,
    metrics: Arc<WorkerMetrics>,
    lease: Arc<Lease>,
}

impl RankRun {
    fn run(self) {
        let a = &self.assignment;
        let task = TaskRef { job_id: a.job_id.clone(), attempt: a.attempt, rank: a.rank };
        // The trainer's per-step spans nest in this one, so every log line of the rank
        // names its job, attempt, rank and step.
        let span = tracing::info_span!("rank", job = %task.job_id, attempt = task.attempt, rank = task.rank);
        let _entered = span.enter();
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
        if let Device::Cuda(ordinal) = self.device {
            return self.train_cuda(ordinal, spec, final_step);
        }
        let peers = a
            .peer_addrs
            .iter()
            .map(|p| resolve(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(WorkerError::Collective)?;
        let listener = self.listener.try_clone().map_err(WorkerError::io("collective listener"))?;
        let token = ring_token(&a.job_id, a.attempt);
        let be = Arc::new(crate::trainer::cpu_backend(&spec.train)?);
        if self.stop.load(Ordering::Relaxed) {
            return Err(WorkerError::Stopped { step: 0 });
        }
        // FERRITE_RING_SHM=0 keeps every link on TCP even between ranks of one host.
        let cfg = RingConfig {
            shared_memory: std::env::var("FERRITE_RING_SHM").map_or(true, |v| v != "0"),
            ..RingConfig::new(a.rank as usize, peers, token)
        };
        let ring = RingCollective::connect(listener, cfg)?;
        tracing::info!(job = %a.job_id, rank = a.rank, transport = ring.transport(), "ring connected");
        *self.ring.lock().unwrap_or_else(|e| e.into_inner()) = Some(ring.abort_handle()?);
        self.metrics.rank_started(&a.job_id, a.rank, a.world_size);
        let timed = Timed::new(Box::new(ring), self.metrics.clone());
        let trainer = Trainer::new(be, spec, Box::new(timed))?;
        self.drive(trainer, final_step)
    }

    /// A rank on a GPU; the ranks of a job of several workers all-reduce through NCCL.
    #[cfg(feature = "cuda")]
    fn train_cuda(
        &self,
        ordinal: usize,
        spec: JobSpec,
        final_step: &mut u64,
    ) -> Result<(), WorkerError> {
        use crate::Collective;
        use ferrite_kernels::cuda::CudaBackend;
        let a = &self.assignment;
        let be = Arc::new(CudaBackend::new(ordinal)?);
        if self.stop.load(Ordering::Relaxed) {
            return Err(WorkerError::Stopped { step: 0 });
        }
        let collective: Box<dyn Collective<CudaBackend>> =
            if a.world_size > 1 { Box::new(self.join_nccl(&be)?) } else { Box::new(crate::Single) };
        self.metrics.rank_started(&a.job_id, a.rank, a.world_size);
        let timed = Timed::new(collective, self.metrics.clone());
        let trainer = Trainer::new(be, spec, Box::new(timed))?;
        self.drive(trainer, final_step)
    }

    /// Joins the job's NCCL communicator: rank 0 makes the unique id and reports it, the
    /// others wait for the coordinator to relay it. Returns once every rank has joined.
    #[cfg(feature = "cuda")]
    fn join_nccl(
        &self,
        be: &ferrite_kernels::cuda::CudaBackend,
    ) -> Result<crate::collective::nccl::NcclCollective, WorkerError> {
        use crate::collective::nccl::{NcclCollective, NcclId};
        let a = &self.assignment;
        let (rank, world) = (a.rank as usize, a.world_size as usize);
        let id = if rank == 0 {
            let id = NcclId::new()?;
            let _ = self.events.send(Report::NcclId(pb::NcclUniqueId {
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                id: id.to_bytes(),
            }));
            id
        } else {
            NcclId::from_bytes(&self.nccl_id.wait(&self.stop, NCCL_ID_TIMEOUT)?)?
        };
        tracing::info!(job = %a.job_id, rank, world, "joining the NCCL communicator");
        let nccl = NcclCollective::new(be, rank, world, &id, self.stop.clone())?;
        tracing::info!(job = %a.job_id, rank, world, "NCCL connected");
        Ok(nccl)
    }

    #[cfg(not(feature = "cuda"))]
    fn train_cuda(&self, ordinal: usize, _: JobSpec, _: &mut u64) -> Result<(), WorkerError> {
        ferrite_kernels::cuda::probe(ordinal)?;
        Err(WorkerError::Kernel(ferrite_kernels::KernelError::NoCuda(format!(
            "cuda:{ordinal}: this build has no CUDA backend"
        ))))
    }

    /// Runs `trainer` to its last step, reporting progress and checkpoints.
    fn drive<B: Backend>(
        &self,
        mut trainer: Trainer<B>,
        final_step: &mut u64,
    ) -> Result<(), WorkerError> {
        let a = &self.assignment;
        trainer.stop_when_set(self.stop.clone());
        let lease = self.lease.clone();
        trainer.fence_writes(move || lease.holds());
        *final_step = trainer.step;
        let (job_id, attempt, rank) = (a.job_id.clone(), a.attempt, a.rank);
        let send = |body: Report| {
            let _ = self.events.send(body);
        };
        send(Report::Running(pb::RankRunning { job_id: job_id.clone(), attempt, rank }));
        let report = |ev: &Event| match ev {
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
        };
        let result = trainer.run(|ev| {
            self.metrics.record(ev);
            report(ev)
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
    fn the_lease_holds_only_for_part_of_a_ttl_after_an_acknowledged_heartbeat() {
        let lease = Lease::new();
        assert!(!lease.holds(), "unconfirmed at start");
        let mut beats = Beats::default();
        let (a, b) = (beats.sent(), beats.sent());
        assert!(b > a, "heartbeat ids increase");
        assert!(beats.acked(a + 100).is_none());
        lease.renew(beats.acked(b).unwrap(), Duration::from_millis(500));
        assert!(lease.holds());
        std::thread::sleep(Duration::from_millis(350)); // past 3/5 of 500 ms
        assert!(!lease.holds(), "a stalled process finds its lease expired");
        // An old acknowledgement never shortens a newer one.
        lease.renew(Instant::now(), Duration::from_secs(10));
        lease.renew(beats.acked(a).unwrap(), Duration::from_millis(500));
        assert!(lease.holds());
        lease.revoke();
        assert!(!lease.holds());
    }

    #[test]
    fn ring_tokens_differ_between_attempts_and_jobs() {
        let a = ring_token("job-000001", 1);
        assert_eq!(a, ring_token("job-000001", 1));
        assert_ne!(a, ring_token("job-000001", 2));
        assert_ne!(a, ring_token("job-000002", 1));
    }
}
