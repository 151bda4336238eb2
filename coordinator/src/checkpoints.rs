//! The checkpoint registry: which checkpoints of which job are published, newest last.
//!
//! A worker writes a checkpoint whole (temporary name, then rename) and only then is it
//! recorded here; serving and recovery read only what is recorded.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::job::{now_unix_ms, Checkpoint, JobId};
use crate::keys;
use crate::store::{CasOutcome, Expect, Store, StoreExt};

const MAX_PATH_BYTES: usize = 4096;

/// Published checkpoints over a store.
#[derive(Clone)]
pub struct CheckpointRegistry {
    store: Arc<dyn Store>,
}

impl CheckpointRegistry {
    pub fn new(store: Arc<dyn Store>) -> Self {
        CheckpointRegistry { store }
    }

    /// Publishes a checkpoint of an existing job. `created_unix_ms == 0` means now.
    /// Recording the same step again with the same path and loss is a no-op (a retried
    /// publish); with different contents it is [`Error::AlreadyExists`].
    pub async fn record(&self, mut ckpt: Checkpoint) -> Result<Checkpoint> {
        validate(&ckpt)?;
        if self.store.get(&keys::job(&ckpt.job_id)).await?.is_none() {
            return Err(Error::NotFound { kind: "job", id: ckpt.job_id.to_string() });
        }
        if ckpt.created_unix_ms == 0 {
            ckpt.created_unix_ms = now_unix_ms();
        }
        let key = keys::checkpoint(&ckpt.job_id, ckpt.step);
        if let CasOutcome::Swapped(_) = self.store.cas_json(&key, Expect::Absent, &ckpt).await? {
            return Ok(ckpt);
        }
        let existing = match self.store.get_json::<Checkpoint>(&key).await? {
            Some((existing, _)) => checked(&key, &ckpt.job_id, existing)?,
            // Deleted in between: nothing else deletes checkpoints, so report the race.
            None => return Err(Error::Contended { key, attempts: 1 }),
        };
        if existing.path == ckpt.path && existing.val_loss == ckpt.val_loss {
            return Ok(existing);
        }
        let id = format!("{} step {}", ckpt.job_id, ckpt.step);
        Err(Error::AlreadyExists { kind: "checkpoint", id })
    }

    /// The job's checkpoints, ascending by step. Empty if it has none.
    pub async fn list(&self, job: &JobId) -> Result<Vec<Checkpoint>> {
        let entries = self.store.list_json::<Checkpoint>(&keys::checkpoints(job)).await?;
        entries.into_iter().map(|(key, ckpt, _)| checked(&key, job, ckpt)).collect()
    }

    /// Forgets all but the newest `keep` checkpoints of a job (0 keeps all), as the worker
    /// that wrote them deletes the older folders (`[output] keep_checkpoints`): the registry
    /// never lists a checkpoint that is gone.
    pub async fn prune(&self, job: &JobId, keep: usize) -> Result<()> {
        let all = self.list(job).await?;
        if keep == 0 || all.len() <= keep {
            return Ok(());
        }
        for old in &all[..all.len() - keep] {
            self.store.delete(&keys::checkpoint(job, old.step)).await?;
        }
        Ok(())
    }

    /// The job's checkpoint with the highest step.
    pub async fn latest(&self, job: &JobId) -> Result<Option<Checkpoint>> {
        // Keys are zero-padded steps, so the last listed is the newest.
        Ok(self.list(job).await?.pop())
    }
}

fn validate(ckpt: &Checkpoint) -> Result<()> {
    if ckpt.path.trim().is_empty() {
        return Err(Error::invalid("checkpoint.path", "empty"));
    }
    if ckpt.path.len() > MAX_PATH_BYTES || ckpt.path.contains('\0') {
        return Err(Error::invalid("checkpoint.path", "too long or contains NUL"));
    }
    if let Some(loss) = ckpt.val_loss {
        if !loss.is_finite() {
            return Err(Error::invalid("checkpoint.val_loss", format!("{loss} is not finite")));
        }
    }
    Ok(())
}

/// A decoded checkpoint must be the one its key names.
fn checked(key: &str, job: &JobId, ckpt: Checkpoint) -> Result<Checkpoint> {
    if &ckpt.job_id != job || keys::checkpoint(job, ckpt.step) != key {
        let reason = format!("holds {} step {}", ckpt.job_id, ckpt.step);
        return Err(Error::corrupt(key, reason));
    }
    Ok(ckpt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobKind, JobSpec};
    use crate::{EmbeddedStore, JobRegistry};

    async fn setup() -> (tempfile::TempDir, Arc<dyn Store>, JobId) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("s")).unwrap());
        let spec = JobSpec {
            toml: "x = 1".into(),
            name: String::new(),
            kind: JobKind::Pretrain,
            workers: 1,
            min_workers: 1,
            priority: 0,
            device: None,
            max_restarts: 5,
        };
        let job = JobRegistry::new(store.clone()).submit(spec).await.unwrap();
        (dir, store, job.id)
    }

    fn ckpt(job: &JobId, step: u64, loss: f32) -> Checkpoint {
        Checkpoint {
            job_id: job.clone(),
            step,
            path: format!("/ckpt/{job}/step-{step}"),
            val_loss: Some(loss),
            created_unix_ms: 0,
        }
    }

    #[tokio::test]
    async fn lists_by_step_and_latest_is_highest_step_not_last_recorded() {
        let (_dir, store, job) = setup().await;
        let reg = CheckpointRegistry::new(store);
        assert_eq!(reg.latest(&job).await.unwrap(), None);
        for step in [100, 2000, 300] {
            reg.record(ckpt(&job, step, 1.0)).await.unwrap();
        }
        let steps: Vec<u64> = reg.list(&job).await.unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, [100, 300, 2000]);
        let latest = reg.latest(&job).await.unwrap().unwrap();
        assert_eq!(latest.step, 2000);
        assert!(latest.created_unix_ms > 0);
        assert!(reg.list(&JobId::from_seq(99)).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_as_the_worker_does_on_disk() {
        let (_dir, store, job) = setup().await;
        let reg = CheckpointRegistry::new(store);
        for step in [10, 20, 30, 40] {
            reg.record(ckpt(&job, step, 1.0)).await.unwrap();
        }
        reg.prune(&job, 0).await.unwrap();
        assert_eq!(reg.list(&job).await.unwrap().len(), 4, "0 keeps all");
        reg.prune(&job, 2).await.unwrap();
        let steps: Vec<u64> = reg.list(&job).await.unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, [30, 40]);
        reg.prune(&job, 5).await.unwrap();
        assert_eq!(reg.list(&job).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn republishing_is_idempotent_but_a_different_checkpoint_at_a_step_is_refused() {
        let (_dir, store, job) = setup().await;
        let reg = CheckpointRegistry::new(store);
        let first = reg.record(ckpt(&job, 10, 2.5)).await.unwrap();
        assert_eq!(reg.record(ckpt(&job, 10, 2.5)).await.unwrap(), first);
        let err = reg.record(ckpt(&job, 10, 2.4)).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { kind: "checkpoint", .. }), "{err}");
    }

    #[tokio::test]
    async fn bad_checkpoints_are_refused_with_the_field_named() {
        let (_dir, store, job) = setup().await;
        let reg = CheckpointRegistry::new(store);
        let field = |r: Result<Checkpoint>| match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        let no_path = Checkpoint { path: " ".into(), ..ckpt(&job, 1, 1.0) };
        assert_eq!(field(reg.record(no_path).await), "checkpoint.path");
        assert_eq!(field(reg.record(ckpt(&job, 1, f32::NAN)).await), "checkpoint.val_loss");
        let unknown = reg.record(ckpt(&JobId::from_seq(77), 1, 1.0)).await.unwrap_err();
        assert!(matches!(unknown, Error::NotFound { kind: "job", .. }), "{unknown}");
    }

    #[tokio::test]
    async fn a_record_stored_under_the_wrong_key_is_corrupt() {
        let (_dir, store, job) = setup().await;
        let reg = CheckpointRegistry::new(store.clone());
        let wrong = ckpt(&job, 5, 1.0);
        store.put_json(&keys::checkpoint(&job, 6), &wrong).await.unwrap();
        assert!(matches!(reg.list(&job).await, Err(Error::Corrupt { .. })));
        store.put(&keys::checkpoint(&job, 6), b"{not json".to_vec()).await.unwrap();
        assert!(matches!(reg.latest(&job).await, Err(Error::Corrupt { .. })));
    }
}
