//! The job registry: jobs and their state machine, kept in a [`Store`].
//!
//! Every change is a compare-and-swap on the job's record, so concurrent writers (two
//! coordinators, or a cancel racing a completion) never lose an update: the loser re-reads
//! and finds its transition either still legal or illegal. Callers store a transition here
//! *before* acting on it (send assignments only after [`JobRegistry::start`] returned), so a
//! restarted coordinator finds every decision it acted on.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::job::{now_unix_ms, Job, JobId, JobSpec, JobState, StateChange, WorkerId};
use crate::keys;
use crate::scheduler::PendingJob;
use crate::store::MAX_CAS_ATTEMPTS;
use crate::store::{decode_json, increment, CasOutcome, Expect, Store, StoreExt, WatchEvent};

/// A stream of a job's stored record, once per change.
pub type JobUpdates = Pin<Box<dyn Stream<Item = Result<Job>> + Send>>;

/// Jobs over a store.
#[derive(Clone)]
pub struct JobRegistry {
    store: Arc<dyn Store>,
}

impl JobRegistry {
    pub fn new(store: Arc<dyn Store>) -> Self {
        JobRegistry { store }
    }

    /// Validates and stores a new job as Queued; returns it with its id.
    pub async fn submit(&self, spec: JobSpec) -> Result<Job> {
        let spec = spec.validated()?;
        let seq = increment(self.store.as_ref(), keys::JOB_SEQ).await?;
        let id = JobId::from_seq(seq);
        let now = now_unix_ms();
        let reason = format!("submitted; waiting for {} workers", spec.workers);
        let job = Job {
            id: id.clone(),
            seq,
            spec,
            state: JobState::Queued,
            reason: reason.clone(),
            attempt: 0,
            workers: Vec::new(),
            submitted_unix_ms: now,
            updated_unix_ms: now,
            history: vec![StateChange {
                from: None,
                to: JobState::Queued,
                reason,
                at_unix_ms: now,
            }],
        };
        match self.store.cas_json(&keys::job(&id), Expect::Absent, &job).await? {
            CasOutcome::Swapped(_) => Ok(job),
            // The sequence is unique, so only a hand-edited store gets here.
            CasOutcome::Conflict { .. } => {
                Err(Error::AlreadyExists { kind: "job", id: id.to_string() })
            }
        }
    }

    pub async fn get(&self, id: &JobId) -> Result<Job> {
        Ok(self.get_versioned(id).await?.0)
    }

    /// Every job, oldest submission first.
    pub async fn list(&self) -> Result<Vec<Job>> {
        let mut jobs = Vec::new();
        for (key, job, _) in self.store.list_json::<Job>(keys::JOBS).await? {
            jobs.push(checked(&key, job)?);
        }
        jobs.sort_by_key(|j| j.seq);
        Ok(jobs)
    }

    /// Moves a job to `to`, recording `reason`. [`Error::IllegalTransition`] if the state
    /// machine has no such edge. Use [`JobRegistry::start`] to enter Starting.
    pub async fn transition(&self, id: &JobId, to: JobState, reason: &str) -> Result<Job> {
        if to == JobState::Starting {
            return Err(Error::invalid("to", "use start() to assign workers"));
        }
        self.update(id, |job, now| {
            apply(job, to, reason, now)?;
            if to == JobState::Recovering {
                job.workers.clear();
            }
            Ok(true)
        })
        .await
    }

    /// Like [`JobRegistry::transition`], but only while the job is still on `attempt`: a
    /// report about an attempt that ended meanwhile changes nothing (returns `None`).
    pub async fn transition_attempt(
        &self,
        id: &JobId,
        attempt: u32,
        to: JobState,
        reason: &str,
    ) -> Result<Option<Job>> {
        let mut stale = false;
        let job = self
            .update(id, |job, now| {
                stale = job.attempt != attempt;
                if stale {
                    return Ok(false);
                }
                apply(job, to, reason, now)?;
                if to == JobState::Recovering {
                    job.workers.clear();
                }
                Ok(true)
            })
            .await?;
        Ok((!stale).then_some(job))
    }

    /// Moves a pending job to Starting on `workers` (index = rank) as a new attempt.
    pub async fn start(&self, id: &JobId, workers: Vec<WorkerId>, reason: &str) -> Result<Job> {
        if workers.is_empty() {
            return Err(Error::invalid("workers", "a job starts on at least one worker"));
        }
        let mut seen = HashSet::new();
        if let Some(dup) = workers.iter().find(|w| !seen.insert(*w)) {
            return Err(Error::invalid("workers", format!("{dup} listed twice")));
        }
        self.update(id, |job, now| {
            if workers.len() > job.spec.workers as usize {
                let why = format!("{} workers; the job wants {}", workers.len(), job.spec.workers);
                return Err(Error::invalid("workers", why));
            }
            apply(job, JobState::Starting, reason, now)?;
            job.attempt += 1;
            job.workers = workers.clone();
            Ok(true)
        })
        .await
    }

    /// Cancels a job that has not finished.
    pub async fn cancel(&self, id: &JobId, reason: &str) -> Result<Job> {
        self.transition(id, JobState::Cancelled, reason).await
    }

    /// Updates the job's reason without a state change (e.g. why it still waits). Writes
    /// nothing if the reason is unchanged.
    pub async fn note(&self, id: &JobId, reason: &str) -> Result<Job> {
        self.update(id, |job, now| {
            if job.reason == reason {
                return Ok(false);
            }
            job.reason = reason.to_owned();
            job.updated_unix_ms = now;
            Ok(true)
        })
        .await
    }

    /// Jobs waiting for workers, as the scheduler sees them.
    pub async fn pending(&self) -> Result<Vec<PendingJob>> {
        let jobs = self.list().await?;
        Ok(jobs.iter().filter(|j| j.state.is_pending()).map(pending_view).collect())
    }

    /// The job's record after each change from now on. Subscribe before reading the
    /// current state (with [`JobRegistry::get`]) to miss nothing.
    pub async fn watch(&self, id: &JobId) -> Result<JobUpdates> {
        let key = keys::job(id);
        let events = self.store.watch(&key).await?;
        let stream = events.filter_map(move |event| match event {
            Ok(WatchEvent::Put(entry)) if entry.key == key => {
                Some(decode_json::<Job>(&entry.key, &entry.value).and_then(|j| checked(&key, j)))
            }
            Ok(WatchEvent::Put(_)) | Ok(WatchEvent::Delete { .. }) => None,
            Err(e) => Some(Err(e)),
        });
        Ok(Box::pin(stream))
    }

    async fn get_versioned(&self, id: &JobId) -> Result<(Job, u64)> {
        let key = keys::job(id);
        match self.store.get_json::<Job>(&key).await? {
            None => Err(Error::NotFound { kind: "job", id: id.to_string() }),
            Some((job, rev)) => Ok((checked(&key, job)?, rev)),
        }
    }

    /// Read-modify-write of one job under compare-and-swap. `f` returns whether it changed
    /// anything; an error from `f` aborts without writing.
    async fn update(
        &self,
        id: &JobId,
        mut f: impl FnMut(&mut Job, i64) -> Result<bool> + Send,
    ) -> Result<Job> {
        let key = keys::job(id);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut job, rev) = self.get_versioned(id).await?;
            if !f(&mut job, now_unix_ms())? {
                return Ok(job);
            }
            match self.store.cas_json(&key, Expect::Revision(rev), &job).await? {
                CasOutcome::Swapped(_) => return Ok(job),
                CasOutcome::Conflict { .. } => continue,
            }
        }
        Err(Error::Contended { key, attempts: MAX_CAS_ATTEMPTS })
    }
}

/// A pending job as the scheduler sees it.
pub(crate) fn pending_view(j: &Job) -> PendingJob {
    PendingJob {
        resuming: j.state == JobState::Recovering,
        priority: j.spec.priority,
        submit_seq: j.seq,
        workers: j.spec.workers,
        min_workers: j.spec.min_workers,
        device: j.spec.device,
        id: j.id.clone(),
    }
}

/// Applies a legal state change and records it.
fn apply(job: &mut Job, to: JobState, reason: &str, now: i64) -> Result<()> {
    if !job.state.can_become(to) {
        return Err(Error::IllegalTransition { job: job.id.clone(), from: job.state, to });
    }
    let change =
        StateChange { from: Some(job.state), to, reason: reason.to_owned(), at_unix_ms: now };
    job.history.push(change);
    job.state = to;
    job.reason = reason.to_owned();
    job.updated_unix_ms = now;
    Ok(())
}

/// A decoded job must be the one its key names.
fn checked(key: &str, job: Job) -> Result<Job> {
    if keys::job(&job.id) != key {
        return Err(Error::corrupt(key, format!("holds job `{}`", job.id)));
    }
    Ok(job)
}

#[cfg(test)]
mod tests;
