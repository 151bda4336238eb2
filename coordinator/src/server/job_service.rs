//! `ferrite.v1.JobService`: every handler validates its request (answering `InvalidArgument`
//! that names the field) before it touches the registries, so a rejected job stores nothing.

use std::pin::Pin;
use std::sync::Arc;

use ferrite_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::control::{JobEvent, StepReport};
use crate::error::Error;
use crate::job::{Job, JobId, JobKind, JobSpec, MAX_JOB_TOML_BYTES};
use crate::jobs::JobUpdates;
use crate::rpc::convert::{device_from_proto, required, state_from_proto};
use crate::server::job_file::{self, PathRoots};
use crate::server::Deps;
use crate::{CheckpointRegistry, Controller, JobRegistry};

const MAX_REASON_CHARS: usize = 1000;
/// Events buffered per `WatchJob` stream before the follower waits for the client.
const WATCH_BUFFER: usize = 16;

type Reply<T> = Result<Response<T>, Status>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchJobResponse, Status>> + Send>>;

/// The `JobService` handlers.
pub struct JobApi {
    jobs: JobRegistry,
    roots: PathRoots,
    checkpoints: CheckpointRegistry,
    control: Arc<Controller>,
    /// Becomes `true` when the server begins to shut down.
    stopping: watch::Receiver<bool>,
}

impl JobApi {
    pub fn new(deps: Deps, stopping: watch::Receiver<bool>) -> Self {
        let (jobs, roots) = (deps.jobs, deps.roots);
        JobApi { jobs, roots, checkpoints: deps.checkpoints, control: deps.control, stopping }
    }
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Reply<pb::SubmitJobResponse> {
        let wire = required("spec", req.into_inner().spec)?;
        let job = self.jobs.submit(spec_from_wire(wire, &self.roots)?).await?;
        tracing::info!(job = %job.id, name = %job.spec.name, "job submitted");
        self.control.wake();
        Ok(Response::new(pb::SubmitJobResponse { job: Some((&job).into()) }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Reply<pb::GetJobResponse> {
        let id = JobId::parse(&req.into_inner().job_id)?;
        let job = self.jobs.get(&id).await?;
        Ok(Response::new(pb::GetJobResponse { job: Some((&job).into()) }))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Reply<pb::ListJobsResponse> {
        let states = req
            .into_inner()
            .states
            .into_iter()
            .map(|s| state_from_proto("states", s))
            .collect::<Result<Vec<_>, _>>()?;
        let jobs = self.jobs.list().await?;
        let jobs = jobs
            .iter()
            .filter(|j| states.is_empty() || states.contains(&j.state))
            .map(pb::Job::from)
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Reply<pb::CancelJobResponse> {
        let req = req.into_inner();
        let id = JobId::parse(&req.job_id)?;
        if req.reason.chars().count() > MAX_REASON_CHARS {
            let why = format!("longer than {MAX_REASON_CHARS} characters");
            return Err(Error::invalid("reason", why).into());
        }
        let reason = match req.reason.trim() {
            "" => "cancelled by operator",
            r => r,
        };
        let job = self.jobs.cancel(&id, reason).await?;
        tracing::info!(job = %job.id, reason, "job cancelled");
        self.control.wake();
        Ok(Response::new(pb::CancelJobResponse { job: Some((&job).into()) }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(&self, req: Request<pb::WatchJobRequest>) -> Reply<WatchStream> {
        let req = req.into_inner();
        let id = JobId::parse(&req.job_id)?;
        // Subscribe before reading, so no change falls between the snapshot and the stream.
        let events = req.include_metrics.then(|| self.control.subscribe());
        let updates = self.jobs.watch(&id).await?;
        let snapshot = self.jobs.get(&id).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let replay = if events.is_some() { self.control.recent_steps(&id) } else { Vec::new() };
        let follower =
            Follower { jobs: self.jobs.clone(), tx, stopping: self.stopping.clone(), events };
        tokio::spawn(follower.run(snapshot, replay, updates));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Reply<pb::ListCheckpointsResponse> {
        let id = JobId::parse(&req.into_inner().job_id)?;
        // A job that never existed is NotFound, not an empty list.
        self.jobs.get(&id).await?;
        let checkpoints = self.checkpoints.list(&id).await?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: checkpoints.iter().map(Into::into).collect(),
        }))
    }
}

/// The domain spec of a submitted job. The job file is the source of truth for what it
/// says: `kind`, `workers` and `min_workers` on the wire may be left unset (taken from the
/// file) but must agree with it when set; `name` and `priority` on the wire override the
/// file's; `device` exists only on the wire.
fn spec_from_wire(wire: pb::JobSpec, roots: &PathRoots) -> Result<JobSpec, Status> {
    if wire.toml.len() > MAX_JOB_TOML_BYTES {
        let why = format!("{} bytes; at most {MAX_JOB_TOML_BYTES}", wire.toml.len());
        return Err(Error::invalid("spec.toml", why).into());
    }
    if wire.toml.trim().is_empty() {
        return Err(Error::invalid("spec.toml", "the job file is empty").into());
    }
    let file =
        job_file::check(&wire.toml, roots).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let kind = match pb::JobKind::try_from(wire.kind) {
        Ok(pb::JobKind::Unspecified) => file.kind,
        Ok(pb::JobKind::Pretrain) => JobKind::Pretrain,
        Ok(pb::JobKind::Finetune) => JobKind::Finetune,
        Err(_) => return Err(Error::invalid("spec.kind", format!("unknown {}", wire.kind)).into()),
    };
    if kind != file.kind {
        let why = format!("{kind:?}, but the job file says kind = {:?}", file.kind);
        return Err(Error::invalid("spec.kind", why.to_lowercase()).into());
    }
    let agree = |field: &'static str, wire: u32, file_field: &str, file: u32| {
        if wire == 0 || wire == file {
            Ok(file)
        } else {
            let why = format!("{wire}, but the job file says {file_field} = {file}");
            Err(Status::from(Error::invalid(field, why)))
        }
    };
    let workers = agree("spec.workers", wire.workers, "cluster.workers", file.workers)?;
    let min_workers =
        agree("spec.min_workers", wire.min_workers, "cluster.min_workers", file.min_workers)?;
    let name = match wire.name.trim() {
        "" => file.name.unwrap_or_default(),
        n => n.to_owned(),
    };
    Ok(JobSpec {
        device: device_from_proto("spec.device", wire.device)?,
        priority: if wire.priority != 0 { wire.priority } else { file.priority },
        toml: wire.toml,
        name,
        kind,
        workers,
        min_workers,
        max_restarts: file.max_restarts,
    })
}

/// Feeds one `WatchJob` stream: the snapshot, then one `StateChange` per new history entry,
/// or a fresh snapshot when the record changed without a state change (a new reason). Ends
/// after a terminal state, when the client goes away, or when the server stops.
struct Follower {
    jobs: JobRegistry,
    tx: mpsc::Sender<Result<pb::WatchJobResponse, Status>>,
    stopping: watch::Receiver<bool>,
    /// Steps and checkpoints of every job, when the client asked for metrics.
    events: Option<broadcast::Receiver<JobEvent>>,
}

impl Follower {
    async fn run(mut self, snapshot: Job, replay: Vec<StepReport>, mut updates: JobUpdates) {
        let mut last = snapshot;
        if !self.send(snapshot_event(&last)).await {
            return;
        }
        // Steps seen so far, then live ones; a step both replayed and broadcast goes once.
        let mut last_step = None;
        for report in replay {
            last_step = Some(report.step);
            if !self.send(job_event(JobEvent::Step(last.id.clone(), report))).await {
                return;
            }
        }
        if last.state.is_terminal() {
            return;
        }
        loop {
            let stopping = async {
                // Dropping the guard here keeps the future `Send`.
                let _ = self.stopping.wait_for(|s| *s).await.map(drop);
            };
            let event = async {
                match self.events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                next = updates.next() => next,
                event = event => {
                    match event {
                        Ok(JobEvent::Step(_, r)) if last_step.is_some_and(|s| r.step <= s) => {}
                        Ok(e) if *e.job() == last.id => {
                            last_step = None;
                            if !self.send(job_event(e)).await {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::debug!(job = %last.id, skipped = n, "watcher lagged");
                        }
                        Err(broadcast::error::RecvError::Closed) => self.events = None,
                    }
                    continue;
                }
                _ = self.tx.closed() => return,
                _ = stopping => None,
            };
            if *self.stopping.borrow() {
                let _ = self.tx.send(Err(Status::unavailable("coordinator stopping"))).await;
                return;
            }
            let job = match next {
                Some(Ok(job)) => job,
                // Fell behind: the record itself is still the truth.
                Some(Err(Error::WatchLagged(_))) => match self.jobs.get(&last.id).await {
                    Ok(job) => job,
                    Err(e) => return self.fail(e).await,
                },
                Some(Err(e)) => return self.fail(e).await,
                None => return self.fail(Error::Unavailable("store watch ended".into())).await,
            };
            if job == last {
                continue;
            }
            let events: Vec<_> = match job.history.get(last.history.len()..) {
                Some(new) if !new.is_empty() => new.iter().map(change_event).collect(),
                _ => vec![snapshot_event(&job)],
            };
            for event in events {
                if !self.send(event).await {
                    return;
                }
            }
            if job.state.is_terminal() {
                return;
            }
            last = job;
        }
    }

    /// Whether the client is still there.
    async fn send(&self, event: pb::watch_job_response::Event) -> bool {
        let msg = pb::WatchJobResponse { event: Some(event) };
        self.tx.send(Ok(msg)).await.is_ok()
    }

    async fn fail(&self, e: Error) {
        let _ = self.tx.send(Err(e.into())).await;
    }
}

fn job_event(e: JobEvent) -> pb::watch_job_response::Event {
    match e {
        JobEvent::Step(_, r) => pb::watch_job_response::Event::Metrics(pb::StepMetrics {
            step: r.step,
            train_loss: r.train_loss,
            val_loss: r.val_loss,
            learning_rate: r.learning_rate,
            grad_norm: r.grad_norm,
            tokens_per_second: r.tokens_per_second,
            step_ms: r.step_ms,
        }),
        JobEvent::Checkpoint(c) => pb::watch_job_response::Event::Checkpoint((&c).into()),
    }
}

fn snapshot_event(job: &Job) -> pb::watch_job_response::Event {
    pb::watch_job_response::Event::Snapshot(job.into())
}

fn change_event(change: &crate::job::StateChange) -> pb::watch_job_response::Event {
    pb::watch_job_response::Event::StateChange(change.into())
}
