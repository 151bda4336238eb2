//! The scheduler: a pure function from a view of the cluster to the actions to take.
//!
//! Policy:
//! - Order: higher `priority` first; within a priority, submission order (`submit_seq`).
//! - Gang placement: a job starts on all the workers it needs at once, all of one device
//!   kind (NCCL and the TCP ring do not mix). A fresh job needs its full `workers`; a job
//!   resuming after a failure may start on as few as `min_workers`, taking up to `workers`.
//!   A job that accepts any kind gets CUDA workers when enough are free, else CPU workers.
//! - Rank order: rank 0 is the free worker with the most threads (ties by id), and so on.
//! - Queueing: [`QueueingStrategy::StrictFifo`] (the default, like Kueue's `StrictFIFO`):
//!   the first job that does not fit blocks every job after it, so large gang jobs are never
//!   starved by a stream of small ones. [`QueueingStrategy::BestEffortFifo`] lets later jobs
//!   that fit start around it (backfill without reservations; big jobs can starve).
//! - A worker is assigned at most once, even if the view lists it twice.

use std::collections::{BTreeMap, HashSet};

use crate::job::{DeviceKind, JobId, WorkerId};

/// A job waiting for workers (state Queued or Recovering).
#[derive(Clone, Debug, PartialEq)]
pub struct PendingJob {
    pub id: JobId,
    pub priority: i32,
    /// Submission order; lower was submitted earlier.
    pub submit_seq: u64,
    /// World size wanted.
    pub workers: u32,
    /// Fewest workers it may resume on.
    pub min_workers: u32,
    /// `None`: any device kind.
    pub device: Option<DeviceKind>,
    /// Restarting after a failure (may shrink to `min_workers`).
    pub resuming: bool,
}

/// A registered, live worker with no job.
#[derive(Clone, Debug, PartialEq)]
pub struct FreeWorker {
    pub id: WorkerId,
    pub device: DeviceKind,
    pub threads: u32,
}

/// How a job that does not fit affects the jobs behind it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueingStrategy {
    /// Nothing behind the first job that does not fit may start.
    #[default]
    StrictFifo,
    /// Jobs behind it that fit start anyway.
    BestEffortFifo,
}

/// What the scheduler sees.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    pub pending: Vec<PendingJob>,
    pub free_workers: Vec<FreeWorker>,
    pub strategy: QueueingStrategy,
}

/// What the scheduler decided for one pending job.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start the job; `workers[r]` runs rank `r`.
    Start { job: JobId, workers: Vec<WorkerId> },
    /// The job keeps waiting, for this reason.
    Wait { job: JobId, reason: String },
}

impl Action {
    pub fn job(&self) -> &JobId {
        match self {
            Action::Start { job, .. } | Action::Wait { job, .. } => job,
        }
    }
}

/// Decides which pending jobs start on which free workers. Returns one action per pending
/// job, in scheduling order.
pub fn schedule(view: &ClusterView) -> Vec<Action> {
    let mut pool = FreePool::new(&view.free_workers);
    let mut queue: Vec<&PendingJob> = view.pending.iter().collect();
    queue.sort_by(|a, b| {
        b.priority.cmp(&a.priority).then(a.submit_seq.cmp(&b.submit_seq)).then(a.id.cmp(&b.id))
    });
    let mut blocked_by: Option<&JobId> = None;
    let mut actions = Vec::with_capacity(queue.len());
    for job in queue {
        if let Some(head) = blocked_by {
            let reason = format!("queued behind {head}, which does not fit yet");
            actions.push(Action::Wait { job: job.id.clone(), reason });
            continue;
        }
        match place(job, &mut pool) {
            Ok(workers) => actions.push(Action::Start { job: job.id.clone(), workers }),
            Err(reason) => {
                if view.strategy == QueueingStrategy::StrictFifo {
                    blocked_by = Some(&job.id);
                }
                actions.push(Action::Wait { job: job.id.clone(), reason });
            }
        }
    }
    actions
}

/// Takes workers for `job` from the pool, or says why it cannot.
fn place(job: &PendingJob, pool: &mut FreePool) -> Result<Vec<WorkerId>, String> {
    if job.workers == 0 {
        return Err("the job asks for 0 workers".into());
    }
    let need = if job.resuming { job.min_workers.clamp(1, job.workers) } else { job.workers };
    let kinds: &[DeviceKind] = match &job.device {
        Some(kind) => std::slice::from_ref(kind),
        None => &[DeviceKind::Cuda, DeviceKind::Cpu],
    };
    for &kind in kinds {
        if pool.free(kind) >= need as usize {
            return Ok(pool.take(kind, job.workers as usize));
        }
    }
    let kind = job.device.map_or("".to_owned(), |k| format!("{k} "));
    let free: Vec<String> = kinds.iter().map(|&k| format!("{} {k}", pool.free(k))).collect();
    Err(format!("needs {need} {kind}workers; free: {}", free.join(", ")))
}

/// Free workers by device kind, best first (most threads, then id).
struct FreePool {
    by_kind: BTreeMap<DeviceKind, Vec<WorkerId>>,
}

impl FreePool {
    fn new(free: &[FreeWorker]) -> Self {
        let mut seen = HashSet::new();
        let mut sorted: Vec<&FreeWorker> = free.iter().filter(|w| seen.insert(&w.id)).collect();
        sorted.sort_by(|a, b| b.threads.cmp(&a.threads).then(a.id.cmp(&b.id)));
        let mut by_kind: BTreeMap<DeviceKind, Vec<WorkerId>> = BTreeMap::new();
        for w in sorted {
            by_kind.entry(w.device).or_default().push(w.id.clone());
        }
        FreePool { by_kind }
    }

    fn free(&self, kind: DeviceKind) -> usize {
        self.by_kind.get(&kind).map_or(0, Vec::len)
    }

    /// Removes up to `n` of the best workers of `kind`.
    fn take(&mut self, kind: DeviceKind, n: usize) -> Vec<WorkerId> {
        let list = self.by_kind.entry(kind).or_default();
        let n = n.min(list.len());
        list.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests;
