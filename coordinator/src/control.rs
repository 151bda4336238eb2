//! The control loop: turns the stored cluster state into assignments and cancellations, and
//! workers' reports into stored state.
//!
//! Every decision is stored before it is acted on: a job is moved to Starting (with its
//! workers and a new attempt number) before any assignment is sent, and to Recovering or
//! Cancelled before its ranks are told to stop. The attempt number fences stale workers:
//! reports about any other attempt than the job's current one are ignored.
//!
//! What lives only in memory (rebuilt as workers attach): the open worker sessions, which
//! rank each worker runs, which ranks of an attempt are up, the NCCL unique id of each
//! attempt on GPUs (rank 0's worker repeats it when it reattaches), and the per-step metrics
//! (broadcast to `WatchJob` followers and kept for `job logs`).
//!
//! A worker is live while its store lease is; a worker whose stream ends is deregistered at
//! once, so a killed process is noticed as soon as its socket closes and a silent one when
//! its lease expires.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch, Notify};

use crate::error::{Error, Result};
use crate::job::{now_unix_ms, Checkpoint, Job, JobId, JobSpec, JobState, WorkerId};
use crate::leader::Role;
use crate::scheduler::{schedule, Action, ClusterView, FreeWorker, QueueingStrategy};
use crate::{CheckpointRegistry, JobRegistry, WorkerInfo, WorkerRegistry};

/// How often the loop looks at the store even when nothing woke it.
const TICK: Duration = Duration::from_millis(200);
/// Metrics kept per job for late readers (`job logs`); older steps are dropped.
const KEPT_STEPS: usize = 100_000;
/// Events buffered for slow `WatchJob` followers.
const EVENT_BUFFER: usize = 1024;

/// One rank of one attempt of a job.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TaskRef {
    pub job: JobId,
    pub attempt: u32,
    pub rank: u32,
}

/// Run one rank of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub task: TaskRef,
    pub world_size: u32,
    pub spec: JobSpec,
    /// Collective addresses of all ranks, index = rank.
    pub peer_addrs: Vec<String>,
    pub data_seed: u64,
    /// The newest published checkpoint, when the job restarts after a failure.
    pub resume: Option<Checkpoint>,
}

/// What the coordinator tells a worker.
#[derive(Clone, Debug, PartialEq)]
pub enum ToWorker {
    Assign(Assignment),
    Cancel {
        job: JobId,
        attempt: u32,
        reason: String,
    },
    /// The heartbeat sent at `sent_unix_ms` (the worker's clock) renewed the lease.
    HeartbeatAck {
        sent_unix_ms: i64,
    },
    /// Rank 0's NCCL unique id, for a rank > 0 of the same attempt to join the communicator.
    Rendezvous {
        job: JobId,
        attempt: u32,
        nccl_id: Vec<u8>,
    },
}

/// Metrics of one optimizer step, from rank 0.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    pub step: u64,
    pub train_loss: f32,
    pub val_loss: Option<f32>,
    pub learning_rate: f32,
    pub grad_norm: f32,
    pub tokens_per_second: f64,
    pub step_ms: f64,
}

/// What a worker reports.
#[derive(Clone, Debug, PartialEq)]
pub enum FromWorker {
    /// Stamped with the worker's clock, echoed in the acknowledgement.
    Heartbeat {
        sent_unix_ms: i64,
    },
    /// Rendezvous done, training loop entered.
    Running(TaskRef),
    /// Rank 0 of a GPU job made the attempt's NCCL unique id; the other ranks wait for it.
    NcclId {
        job: JobId,
        attempt: u32,
        id: Vec<u8>,
    },
    Progress(TaskRef, StepReport),
    /// Rank 0 wrote a checkpoint whole.
    CheckpointWritten {
        attempt: u32,
        checkpoint: Checkpoint,
    },
    /// The rank ended; `message` says why when it failed.
    Finished {
        task: TaskRef,
        succeeded: bool,
        message: String,
        final_step: u64,
    },
}

/// A job's events besides state changes, for `WatchJob` followers.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEvent {
    Step(JobId, StepReport),
    Checkpoint(Checkpoint),
}

impl JobEvent {
    pub fn job(&self) -> &JobId {
        match self {
            JobEvent::Step(id, _) => id,
            JobEvent::Checkpoint(c) => &c.job_id,
        }
    }
}

/// An attached worker's stream.
struct Session {
    /// Distinguishes a reattached worker's new stream from its old one.
    serial: u64,
    info: WorkerInfo,
    tx: mpsc::UnboundedSender<ToWorker>,
    /// The rank it runs, until it reports the rank ended.
    task: Option<TaskRef>,
    /// A cancellation for `task` went out.
    cancel_sent: bool,
    /// When the worker's last message (a heartbeat or a report) arrived.
    heard: Instant,
}

/// An attached worker as the control loop sees it, for metrics and the dashboard.
#[derive(Clone, Debug)]
pub struct SessionView {
    pub info: WorkerInfo,
    /// The rank it runs.
    pub task: Option<TaskRef>,
    /// Since its last message (heartbeat or report).
    pub silent_for: Duration,
}

/// What `attach` hands the stream: its serial and the messages for the worker.
pub struct Attached {
    pub serial: u64,
    pub rx: mpsc::UnboundedReceiver<ToWorker>,
}

/// The coordinator's control loop and its in-memory view of attached workers.
pub struct Controller {
    jobs: JobRegistry,
    checkpoints: CheckpointRegistry,
    workers: WorkerRegistry,
    strategy: QueueingStrategy,
    sessions: Mutex<HashMap<WorkerId, Session>>,
    /// Ranks up, per (job, attempt).
    ranks_up: Mutex<HashMap<(JobId, u32), HashSet<u32>>>,
    /// Rank 0's NCCL unique id, per (job, attempt) still active.
    nccl_ids: Mutex<HashMap<(JobId, u32), Vec<u8>>>,
    /// Recent step metrics per job.
    steps: Mutex<HashMap<JobId, VecDeque<StepReport>>>,
    events: broadcast::Sender<JobEvent>,
    wake: Notify,
    serials: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves them consistent enough to go on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_active(state: JobState) -> bool {
    matches!(state, JobState::Starting | JobState::Running)
}

impl Controller {
    pub fn new(
        jobs: JobRegistry,
        checkpoints: CheckpointRegistry,
        workers: WorkerRegistry,
    ) -> Self {
        Controller {
            jobs,
            checkpoints,
            workers,
            strategy: QueueingStrategy::default(),
            sessions: Mutex::new(HashMap::new()),
            ranks_up: Mutex::new(HashMap::new()),
            nccl_ids: Mutex::new(HashMap::new()),
            steps: Mutex::new(HashMap::new()),
            events: broadcast::channel(EVENT_BUFFER).0,
            wake: Notify::new(),
            serials: AtomicU64::new(1),
        }
    }

    pub fn workers(&self) -> &WorkerRegistry {
        &self.workers
    }

    /// Asks the loop to look at the cluster now (a job was submitted or cancelled).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Steps and checkpoints of every job from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    /// The step metrics of a job seen since this coordinator started.
    pub fn recent_steps(&self, job: &JobId) -> Vec<StepReport> {
        lock(&self.steps).get(job).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// The newest step metrics of a job seen since this coordinator started.
    pub fn last_step(&self, job: &JobId) -> Option<StepReport> {
        lock(&self.steps).get(job).and_then(|s| s.back().cloned())
    }

    /// The attached workers, by id.
    pub fn sessions(&self) -> Vec<SessionView> {
        let mut views: Vec<SessionView> = lock(&self.sessions)
            .values()
            .map(|s| SessionView {
                info: s.info.clone(),
                task: s.task.clone(),
                silent_for: s.heard.elapsed(),
            })
            .collect();
        views.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        views
    }

    /// Runs the loop until `stopping` becomes true, from the moment `role` says this
    /// coordinator leads.
    pub async fn run(
        self: Arc<Self>,
        mut stopping: watch::Receiver<bool>,
        mut role: watch::Receiver<Role>,
    ) {
        if !role.borrow().is_leader() {
            tokio::select! {
                led = role.wait_for(Role::is_leader) => if led.is_err() { return },
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
        self.extend_leases().await;
        loop {
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "control loop");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }

    /// A coordinator that just started (or was just elected) cannot tell which workers
    /// lived through its absence: each registered one gets a full lease period from now to
    /// reattach, so a running job survives a coordinator restart without a restart of its
    /// own.
    async fn extend_leases(&self) {
        let workers = match self.workers.list().await {
            Ok(workers) => workers,
            Err(e) => return tracing::warn!(error = %e, "listing workers to extend their leases"),
        };
        for w in workers {
            if let Err(e) = self.workers.heartbeat(&w).await {
                tracing::debug!(worker = %w.id, error = %e, "extending lease");
            }
        }
    }

    /// Opens a session for a registered worker; `running` is the rank it still runs (a
    /// reattach after a coordinator restart).
    pub async fn attach(&self, worker: &WorkerId, running: Option<TaskRef>) -> Result<Attached> {
        let info = self.workers.get(worker).await?;
        self.workers.heartbeat(&info).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        if let Some(task) = &running {
            tracing::info!(worker = %worker, job = %task.job, rank = task.rank, "worker reattached");
        }
        // A rank that reattaches may have missed its attempt's NCCL id on the old stream.
        if let Some(rendezvous) = running.as_ref().and_then(|t| self.rendezvous_for(t)) {
            let _ = tx.send(rendezvous);
        }
        let session =
            Session { serial, info, tx, task: running, cancel_sent: false, heard: Instant::now() };
        lock(&self.sessions).insert(worker.clone(), session);
        self.wake();
        Ok(Attached { serial, rx })
    }

    /// The stream `serial` of `worker` ended: the worker is gone (its lease is revoked, so
    /// its job recovers now rather than when the lease would have expired).
    pub async fn detach(&self, worker: &WorkerId, serial: u64) {
        let gone = {
            let mut sessions = lock(&self.sessions);
            match sessions.get(worker) {
                Some(s) if s.serial == serial => sessions.remove(worker),
                _ => None,
            }
        };
        if let Some(session) = gone {
            tracing::info!(worker = %worker, "worker detached");
            if let Err(e) = self.workers.deregister(&session.info).await {
                tracing::debug!(worker = %worker, error = %e, "deregistering");
            }
            self.wake();
        }
    }

    /// Acts on one report from `worker`. An error ends the worker's stream (its lease
    /// expired: it must register again).
    pub async fn handle(&self, worker: &WorkerId, msg: FromWorker) -> Result<()> {
        if let Some(s) = lock(&self.sessions).get_mut(worker) {
            s.heard = Instant::now();
        }
        match msg {
            FromWorker::Heartbeat { sent_unix_ms } => {
                let info = lock(&self.sessions).get(worker).map(|s| s.info.clone());
                let Some(info) = info else {
                    return Err(Error::NotFound { kind: "worker session", id: worker.to_string() });
                };
                self.workers.heartbeat(&info).await?;
                if let Some(s) = lock(&self.sessions).get(worker) {
                    let _ = s.tx.send(ToWorker::HeartbeatAck { sent_unix_ms });
                }
                Ok(())
            }
            FromWorker::Running(task) => {
                let Some(job) = self.current(&task).await? else { return Ok(()) };
                let up = {
                    let mut ranks = lock(&self.ranks_up);
                    let set = ranks.entry((task.job.clone(), task.attempt)).or_default();
                    set.insert(task.rank);
                    set.len()
                };
                // A resumed attempt counts as running from its first step, whose reason
                // reports how long the recovery took.
                if job.state == JobState::Starting && up == job.workers.len() && job.attempt <= 1 {
                    let reason = format!("all {up} ranks running");
                    self.advance(&job, JobState::Running, &reason).await?;
                }
                Ok(())
            }
            FromWorker::NcclId { job, attempt, id } => {
                self.relay_nccl_id(worker, job, attempt, id).await
            }
            FromWorker::Progress(task, report) => {
                let Some(job) = self.current(&task).await? else { return Ok(()) };
                if job.state == JobState::Starting {
                    let reason = match noticed_failure_at(&job) {
                        Some(at) => format!(
                            "resumed: step {} done {:.1} s after the failure was noticed",
                            report.step,
                            (now_unix_ms() - at) as f64 / 1000.0
                        ),
                        None => "training".to_owned(),
                    };
                    tracing::info!(job = %job.id, attempt = job.attempt, reason, "first step");
                    self.advance(&job, JobState::Running, &reason).await?;
                }
                {
                    let mut steps = lock(&self.steps);
                    let kept = steps.entry(job.id.clone()).or_default();
                    // A resume repeats the steps after its checkpoint: drop the old ones.
                    while kept.back().is_some_and(|r| r.step >= report.step) {
                        kept.pop_back();
                    }
                    if kept.len() >= KEPT_STEPS {
                        kept.pop_front();
                    }
                    kept.push_back(report.clone());
                }
                let _ = self.events.send(JobEvent::Step(job.id, report));
                Ok(())
            }
            FromWorker::CheckpointWritten { attempt, checkpoint } => {
                let task = TaskRef { job: checkpoint.job_id.clone(), attempt, rank: 0 };
                let Some(current) = self.current(&task).await? else { return Ok(()) };
                let job = checkpoint.job_id.clone();
                let published = self.checkpoints.record(checkpoint).await?;
                let keep = job_file(&current.spec).map_or(0, |f| f.output.keep_checkpoints);
                if let Err(e) = self.checkpoints.prune(&job, keep).await {
                    // Not the worker's fault: the next publish prunes again.
                    tracing::warn!(job = %job, error = %e, "pruning the checkpoint registry");
                }
                tracing::info!(job = %published.job_id, step = published.step, "checkpoint published");
                let _ = self.events.send(JobEvent::Checkpoint(published));
                Ok(())
            }
            FromWorker::Finished { task, succeeded, message, final_step } => {
                {
                    let mut sessions = lock(&self.sessions);
                    if let Some(s) = sessions.get_mut(worker) {
                        if s.task.as_ref() == Some(&task) {
                            s.task = None;
                        }
                    }
                }
                self.wake();
                let Some(job) = self.current(&task).await? else { return Ok(()) };
                if succeeded {
                    if task.rank == 0 {
                        if job.state == JobState::Starting {
                            // Resumed from its final checkpoint: no step was left to run.
                            self.advance(&job, JobState::Running, "resumed at the end").await?;
                        }
                        let reason = format!("finished at step {final_step}");
                        self.advance(&job, JobState::Succeeded, &reason).await?;
                        tracing::info!(job = %job.id, step = final_step, "job succeeded");
                    }
                    return Ok(());
                }
                let why = format!("rank {} on {worker} failed: {message}", task.rank);
                self.recover_or_fail(&job, &why).await
            }
        }
    }

    /// Hands rank 0's NCCL unique id to every other rank of its attempt, and keeps it for a
    /// rank that reattaches. Only the worker running rank 0 of the current attempt may set it;
    /// from any other (a stale rank, a confused worker) it is ignored.
    async fn relay_nccl_id(
        &self,
        worker: &WorkerId,
        job: JobId,
        attempt: u32,
        id: Vec<u8>,
    ) -> Result<()> {
        let rank0 = TaskRef { job, attempt, rank: 0 };
        if self.current(&rank0).await?.is_none() {
            return Ok(());
        }
        let runs_rank0 =
            lock(&self.sessions).get(worker).is_some_and(|s| s.task.as_ref() == Some(&rank0));
        if !runs_rank0 {
            tracing::warn!(worker = %worker, job = %rank0.job, attempt, "NCCL id from a worker not running rank 0; ignored");
            return Ok(());
        }
        lock(&self.nccl_ids).insert((rank0.job.clone(), attempt), id);
        let mut relayed = 0;
        for s in lock(&self.sessions).values() {
            let Some(task) = &s.task else { continue };
            if let Some(rendezvous) = self.rendezvous_for(task) {
                relayed += usize::from(s.tx.send(rendezvous).is_ok());
            }
        }
        tracing::info!(job = %rank0.job, attempt, ranks = relayed, "NCCL unique id relayed");
        Ok(())
    }

    /// Drops the NCCL ids of attempts no longer active (most clusters hold none: CPU jobs).
    fn forget_ended_nccl_ids(&self, jobs: &[Job]) {
        let mut ids = lock(&self.nccl_ids);
        if ids.is_empty() {
            return;
        }
        let active: HashSet<(&JobId, u32)> =
            jobs.iter().filter(|j| is_active(j.state)).map(|j| (&j.id, j.attempt)).collect();
        ids.retain(|(job, attempt), _| active.contains(&(job, *attempt)));
    }

    /// The rendezvous message for `task`, when it is a rank > 0 whose attempt's id is known.
    fn rendezvous_for(&self, task: &TaskRef) -> Option<ToWorker> {
        if task.rank == 0 {
            return None;
        }
        let ids = lock(&self.nccl_ids);
        let id = ids.get(&(task.job.clone(), task.attempt))?;
        Some(ToWorker::Rendezvous {
            job: task.job.clone(),
            attempt: task.attempt,
            nccl_id: id.clone(),
        })
    }

    /// Moves a job on, unless another report (another rank's, a cancel) moved it first: two
    /// ranks race to report a job running, and losing that race is no error of the worker's.
    async fn advance(&self, job: &Job, to: JobState, reason: &str) -> Result<()> {
        match self.jobs.transition_attempt(&job.id, job.attempt, to, reason).await {
            Ok(_) | Err(Error::IllegalTransition { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The job, if `task` belongs to its current, active attempt.
    async fn current(&self, task: &TaskRef) -> Result<Option<Job>> {
        let job = match self.jobs.get(&task.job).await {
            Ok(job) => job,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let current = is_active(job.state) && job.attempt == task.attempt;
        if !current {
            tracing::debug!(job = %task.job, attempt = task.attempt, "stale report ignored");
        }
        Ok(current.then_some(job))
    }

    /// After a failure: Recovering (the scheduler restarts it from its newest checkpoint),
    /// or Failed once `max_restarts` restarts were spent.
    async fn recover_or_fail(&self, job: &Job, why: &str) -> Result<()> {
        let restarts = job.attempt.saturating_sub(1);
        let max = job.spec.max_restarts;
        let (to, reason) = if restarts >= max {
            (JobState::Failed, format!("{why}; no restarts left (max_restarts = {max})"))
        } else {
            (JobState::Recovering, format!("{why}; restart {} of {max}", restarts + 1))
        };
        match self.jobs.transition_attempt(&job.id, job.attempt, to, &reason).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => {
                tracing::warn!(job = %job.id, state = %to, reason, "job interrupted");
                self.wake();
                Ok(())
            }
            // Someone else (a cancel, another rank's report) moved it first.
            Err(Error::IllegalTransition { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One pass: notice lost workers, stop ranks of jobs that moved on, start what fits.
    async fn tick(&self) -> Result<()> {
        let live: HashMap<WorkerId, WorkerInfo> =
            self.workers.list().await?.into_iter().map(|w| (w.id.clone(), w)).collect();
        for job in self.jobs.list().await? {
            if !is_active(job.state) {
                continue;
            }
            if let Some(lost) = job.workers.iter().find(|w| !live.contains_key(*w)) {
                let why = format!("worker {lost} lost");
                self.recover_or_fail(&job, &why).await?;
            }
        }
        let jobs = self.jobs.list().await?;
        self.stop_stale_ranks(&jobs);
        self.forget_ended_nccl_ids(&jobs);
        let mut busy: HashSet<WorkerId> = HashSet::new();
        for job in jobs.iter().filter(|j| is_active(j.state)) {
            busy.extend(job.workers.iter().cloned());
        }
        let free: Vec<FreeWorker> = {
            let sessions = lock(&self.sessions);
            sessions
                .iter()
                .filter(|(id, s)| s.task.is_none() && !busy.contains(*id) && live.contains_key(*id))
                .map(|(id, s)| FreeWorker {
                    id: id.clone(),
                    device: s.info.capabilities.device,
                    threads: s.info.capabilities.threads,
                })
                .collect()
        };
        // A recovering job waits one heartbeat timeout for its full world size (the lost
        // worker's peers are finishing their stale ranks, a restarted worker is registering)
        // before it may shrink towards `min_workers`: the same world size resumes bit for bit.
        let (now, grace) = (now_unix_ms(), self.workers.ttl().as_millis() as i64);
        let pending: Vec<_> = jobs
            .iter()
            .filter(|j| j.state.is_pending())
            .map(|j| {
                let mut view = crate::jobs::pending_view(j);
                if view.resuming {
                    let since = j.history.last().map_or(0, |c| c.at_unix_ms);
                    view.resuming = now - since >= grace;
                }
                view
            })
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let view = ClusterView { pending, free_workers: free, strategy: self.strategy };
        for action in schedule(&view) {
            let result = match action {
                Action::Start { job, workers } => self.start(&job, workers, &live).await,
                Action::Wait { job, reason } => self.jobs.note(&job, &reason).await.map(drop),
            };
            match result {
                // Cancelled between the listing and now.
                Ok(()) | Err(Error::IllegalTransition { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends a cancellation to every worker still running a rank of an attempt that is no
    /// longer current (job ended, cancelled, or recovering).
    fn stop_stale_ranks(&self, jobs: &[Job]) {
        let by_id: HashMap<&JobId, &Job> = jobs.iter().map(|j| (&j.id, j)).collect();
        let mut sessions = lock(&self.sessions);
        for (id, s) in sessions.iter_mut() {
            let Some(task) = &s.task else { continue };
            let job = by_id.get(&task.job);
            let current = job.is_some_and(|j| is_active(j.state) && j.attempt == task.attempt);
            if current || s.cancel_sent {
                continue;
            }
            let reason = match job {
                Some(j) => format!("job is {}: {}", j.state, j.reason),
                None => "job no longer exists".into(),
            };
            tracing::info!(worker = %id, job = %task.job, rank = task.rank, reason, "stopping rank");
            let cancel = ToWorker::Cancel { job: task.job.clone(), attempt: task.attempt, reason };
            s.cancel_sent = true;
            if s.tx.send(cancel).is_err() {
                // The stream is gone; detach will clean up.
                s.task = None;
            }
        }
    }

    /// Stores the start, then sends every rank its assignment.
    async fn start(
        &self,
        id: &JobId,
        workers: Vec<WorkerId>,
        live: &HashMap<WorkerId, WorkerInfo>,
    ) -> Result<()> {
        let before = self.jobs.get(id).await?;
        let resume = if before.attempt > 0 { self.checkpoints.latest(id).await? } else { None };
        let n = workers.len();
        let reason = match &resume {
            Some(c) => format!("resuming from step {} on {n} workers", c.step),
            None if before.attempt > 0 => format!("restarting from scratch on {n} workers"),
            None => format!("starting on {n} workers"),
        };
        let peer_addrs: Vec<String> =
            workers.iter().map(|w| live[w].capabilities.collective_addr.clone()).collect();
        let job = self.jobs.start(id, workers.clone(), &reason).await?;
        tracing::info!(job = %id, attempt = job.attempt, workers = ?workers, reason, "job starting");
        let data_seed = data_seed(&job.spec);
        let mut sessions = lock(&self.sessions);
        for (rank, w) in workers.iter().enumerate() {
            let task = TaskRef { job: id.clone(), attempt: job.attempt, rank: rank as u32 };
            let assignment = Assignment {
                task: task.clone(),
                world_size: n as u32,
                spec: job.spec.clone(),
                peer_addrs: peer_addrs.clone(),
                data_seed,
                resume: resume.clone(),
            };
            // A session that vanished since the listing: the worker is lost, and the next
            // pass recovers the job.
            if let Some(s) = sessions.get_mut(w) {
                s.task = Some(task);
                s.cancel_sent = false;
                let _ = s.tx.send(ToWorker::Assign(assignment));
            }
        }
        Ok(())
    }
}

/// When the job's newest failure moved it to Recovering, if it did.
fn noticed_failure_at(job: &Job) -> Option<i64> {
    let last = job.history.iter().rev().find(|c| c.to == JobState::Recovering)?;
    (job.attempt > 1).then_some(last.at_unix_ms)
}

/// Heartbeats go out five times per lease, so one lost or late beat never drops a worker.
pub fn heartbeat_interval(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(50))
}

/// The job file the spec carries (checked at submission, so it parses).
fn job_file(spec: &JobSpec) -> Option<ferrite_model::JobSpec> {
    ferrite_model::JobSpec::parse(&spec.toml).ok()
}

/// The job file's `[train] seed` (every rank samples from it with its own rank).
fn data_seed(spec: &JobSpec) -> u64 {
    job_file(spec).map_or(0, |f| f.train.seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobKind;
    use crate::{EmbeddedStore, Store};

    #[tokio::test]
    async fn a_job_fails_with_the_reason_once_its_restarts_are_spent() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("s")).unwrap());
        let jobs = JobRegistry::new(store.clone());
        let control = Controller::new(
            jobs.clone(),
            CheckpointRegistry::new(store.clone()),
            WorkerRegistry::new(store, Duration::from_secs(5)),
        );
        let spec = JobSpec {
            toml: "[train]\nmax_steps = 10\n".into(),
            name: "flaky".into(),
            kind: JobKind::Pretrain,
            workers: 1,
            min_workers: 1,
            priority: 0,
            device: None,
            max_restarts: 1,
        };
        let id = jobs.submit(spec).await.unwrap().id;
        let w = WorkerId::new("w-000001");
        let fail = |attempt| FromWorker::Finished {
            task: TaskRef { job: id.clone(), attempt, rank: 0 },
            succeeded: false,
            message: "out of memory".into(),
            final_step: 3,
        };
        jobs.start(&id, vec![w.clone()], "first").await.unwrap();
        control.handle(&w, fail(1)).await.unwrap();
        let job = jobs.get(&id).await.unwrap();
        assert_eq!(job.state, JobState::Recovering);
        assert!(job.reason.contains("restart 1 of 1"), "{}", job.reason);
        // A late report about the ended attempt changes nothing.
        control.handle(&w, fail(1)).await.unwrap();
        assert_eq!(jobs.get(&id).await.unwrap().state, JobState::Recovering);
        jobs.start(&id, vec![w.clone()], "second").await.unwrap();
        control.handle(&w, fail(2)).await.unwrap();
        let job = jobs.get(&id).await.unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.reason.contains("out of memory"), "{}", job.reason);
        assert!(job.reason.contains("no restarts left (max_restarts = 1)"), "{}", job.reason);
    }
}
