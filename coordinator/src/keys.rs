//! Where each record lives in the store. Every prefix ends in `/`, so `job-1` never lists
//! `job-10`'s records.

use crate::job::{JobId, WorkerId};

pub(crate) const JOBS: &str = "jobs/";
pub(crate) const JOB_SEQ: &str = "meta/job_seq";
pub(crate) const WORKERS: &str = "workers/";
pub(crate) const WORKER_SEQ: &str = "meta/worker_seq";

pub(crate) fn job(id: &JobId) -> String {
    format!("{JOBS}{id}")
}

pub(crate) fn worker(id: &WorkerId) -> String {
    format!("{WORKERS}{id}")
}

pub(crate) fn checkpoints(job: &JobId) -> String {
    format!("checkpoints/{job}/")
}

/// Zero-padded so key order is step order.
pub(crate) fn checkpoint(job: &JobId, step: u64) -> String {
    format!("checkpoints/{job}/{step:020}")
}
