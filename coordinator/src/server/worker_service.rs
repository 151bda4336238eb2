//! `ferrite.v1.WorkerService`: registration, then one `Attach` stream per worker that carries
//! heartbeats and reports up (rank 0's NCCL unique id among them) and assignments,
//! rendezvous and cancellations down. The stream's handlers
//! only convert between the wire and [`crate::control`]'s domain messages.

use std::pin::Pin;
use std::sync::Arc;

use ferrite_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::control::{heartbeat_interval, Controller, FromWorker, StepReport, TaskRef, ToWorker};
use crate::error::Error;
use crate::job::{Checkpoint, JobId, WorkerId};
use crate::members::WorkerCapabilities;
use crate::rpc::convert::required;

type Reply<T> = Result<Response<T>, Status>;
type AttachStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

/// Messages buffered towards one worker.
const OUT_BUFFER: usize = 64;

/// The `WorkerService` handlers.
pub struct WorkerApi {
    control: Arc<Controller>,
    stopping: watch::Receiver<bool>,
}

impl WorkerApi {
    pub fn new(control: Arc<Controller>, stopping: watch::Receiver<bool>) -> Self {
        WorkerApi { control, stopping }
    }
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerApi {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Reply<pb::RegisterWorkerResponse> {
        let caps = required("capabilities", req.into_inner().capabilities)?;
        let caps = WorkerCapabilities::try_from(caps)?;
        let registry = self.control.workers();
        let info = registry.register(caps).await?;
        tracing::info!(
            worker = %info.id,
            device = %info.capabilities.device,
            threads = info.capabilities.threads,
            collective = %info.capabilities.collective_addr,
            "worker registered"
        );
        let ttl = registry.ttl();
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: info.id.to_string(),
            heartbeat_interval_ms: heartbeat_interval(ttl).as_millis() as u32,
            lease_ttl_ms: ttl.as_millis().min(u32::MAX as u128) as u32,
        }))
    }

    type AttachStream = AttachStream;

    async fn attach(&self, req: Request<Streaming<pb::WorkerMessage>>) -> Reply<AttachStream> {
        let mut inbound = req.into_inner();
        let first = inbound.message().await?;
        let Some(pb::WorkerMessage { body: Some(pb::worker_message::Body::Hello(hello)) }) = first
        else {
            return Err(Error::invalid("body", "the first message must be `hello`").into());
        };
        let worker = parse_worker_id(&hello.worker_id)?;
        let running = if hello.job_id.is_empty() {
            None
        } else {
            let job = JobId::parse(&hello.job_id)?;
            Some(TaskRef { job, attempt: hello.attempt, rank: hello.rank })
        };
        let attached = self.control.attach(&worker, running).await?;
        let (tx, rx) = mpsc::channel(OUT_BUFFER);
        let session = Session {
            control: self.control.clone(),
            worker,
            serial: attached.serial,
            stopping: self.stopping.clone(),
        };
        tokio::spawn(session.run(inbound, attached.rx, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One attached worker's stream.
struct Session {
    control: Arc<Controller>,
    worker: WorkerId,
    serial: u64,
    stopping: watch::Receiver<bool>,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<pb::WorkerMessage>,
        mut to_worker: mpsc::UnboundedReceiver<ToWorker>,
        tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    ) {
        let end: Option<Status> = loop {
            let stopping = async {
                let _ = self.stopping.wait_for(|s| *s).await.map(drop);
            };
            tokio::select! {
                out = to_worker.recv() => match out {
                    Some(msg) => {
                        if tx.send(Ok(to_wire(msg))).await.is_err() {
                            break None;
                        }
                    }
                    None => break None,
                },
                msg = inbound.next() => match msg {
                    Some(Ok(msg)) => {
                        let result = match from_wire(msg) {
                            Ok(msg) => self.control.handle(&self.worker, msg).await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = result {
                            tracing::warn!(worker = %self.worker, error = %e, "worker stream");
                            break Some(e.into());
                        }
                    }
                    Some(Err(status)) => {
                        tracing::info!(worker = %self.worker, %status, "worker stream broke");
                        break None;
                    }
                    None => break None,
                },
                _ = stopping => break Some(Status::unavailable("coordinator stopping")),
            }
        };
        if let Some(status) = end {
            let _ = tx.send(Err(status)).await;
        }
        // Coordinator shutdown is not the worker's failure: it reattaches to the next one.
        if !*self.stopping.borrow() {
            self.control.detach(&self.worker, self.serial).await;
        }
    }
}

fn parse_worker_id(s: &str) -> Result<WorkerId, Error> {
    let digits = s.strip_prefix("w-").unwrap_or("");
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid("worker_id", format!("`{s}` is not a worker id (w-NNNNNN)")));
    }
    Ok(WorkerId::new(s))
}

fn task(job_id: &str, attempt: u32, rank: u32) -> Result<TaskRef, Error> {
    Ok(TaskRef { job: JobId::parse(job_id)?, attempt, rank })
}

/// A worker's message in domain terms; malformed ones name the field.
fn from_wire(msg: pb::WorkerMessage) -> Result<FromWorker, Error> {
    use pb::worker_message::Body;
    Ok(match required("body", msg.body)? {
        Body::Hello(_) => return Err(Error::invalid("body", "`hello` was already sent")),
        Body::Heartbeat(h) => FromWorker::Heartbeat { sent_unix_ms: h.sent_unix_ms },
        Body::Running(r) => FromWorker::Running(task(&r.job_id, r.attempt, r.rank)?),
        Body::Progress(p) => {
            let m = required("progress.metrics", p.metrics)?;
            let report = StepReport {
                step: m.step,
                train_loss: m.train_loss,
                val_loss: m.val_loss,
                learning_rate: m.learning_rate,
                grad_norm: m.grad_norm,
                tokens_per_second: m.tokens_per_second,
                step_ms: m.step_ms,
            };
            FromWorker::Progress(task(&p.job_id, p.attempt, p.rank)?, report)
        }
        Body::NcclId(n) => {
            if n.id.len() != pb::NCCL_UNIQUE_ID_BYTES {
                let why = format!(
                    "an NCCL unique id is {} bytes, got {}",
                    pb::NCCL_UNIQUE_ID_BYTES,
                    n.id.len()
                );
                return Err(Error::invalid("nccl_id.id", why));
            }
            FromWorker::NcclId { job: JobId::parse(&n.job_id)?, attempt: n.attempt, id: n.id }
        }
        Body::Checkpoint(c) => {
            let checkpoint = Checkpoint::try_from(required("checkpoint", c.checkpoint)?)?;
            FromWorker::CheckpointWritten { attempt: c.attempt, checkpoint }
        }
        Body::Result(r) => FromWorker::Finished {
            task: task(&r.job_id, r.attempt, r.rank)?,
            succeeded: r.succeeded,
            message: r.message,
            final_step: r.final_step,
        },
    })
}

fn to_wire(msg: ToWorker) -> pb::CoordinatorMessage {
    use pb::coordinator_message::Body;
    let body = match msg {
        ToWorker::Assign(a) => Body::Assignment(pb::Assignment {
            job_id: a.task.job.to_string(),
            attempt: a.task.attempt,
            rank: a.task.rank,
            world_size: a.world_size,
            spec: Some((&a.spec).into()),
            peer_addrs: a.peer_addrs,
            data_seed: a.data_seed,
            resume: a.resume.map(|c| pb::ResumeFrom { step: c.step, checkpoint_path: c.path }),
        }),
        ToWorker::Cancel { job, attempt, reason } => {
            Body::Cancellation(pb::Cancellation { job_id: job.to_string(), attempt, reason })
        }
        ToWorker::HeartbeatAck { sent_unix_ms } => {
            Body::HeartbeatAck(pb::HeartbeatAck { sent_unix_ms })
        }
        ToWorker::Rendezvous { job, attempt, nccl_id } => Body::Rendezvous(pb::Rendezvous {
            job_id: job.to_string(),
            attempt,
            nccl_unique_id: nccl_id,
        }),
    };
    pb::CoordinatorMessage { body: Some(body) }
}
