use std::time::Duration;

use super::*;
use crate::job::JobKind;
use crate::EmbeddedStore;

fn spec(workers: u32, priority: i32) -> JobSpec {
    JobSpec {
        toml: "[train]\nsteps = 10\n".into(),
        name: "t".into(),
        kind: JobKind::Pretrain,
        workers,
        min_workers: 0,
        priority,
        device: None,
        max_restarts: 5,
    }
}

fn ws(names: &[&str]) -> Vec<WorkerId> {
    names.iter().map(|n| WorkerId::new(*n)).collect()
}

fn registry() -> (tempfile::TempDir, JobRegistry) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("jobs.redb")).unwrap();
    (dir, JobRegistry::new(Arc::new(store)))
}

#[tokio::test]
async fn submit_stores_a_queued_job_with_a_reason_and_ids_in_order() {
    let (_dir, reg) = registry();
    let a = reg.submit(spec(2, 0)).await.unwrap();
    let b = reg.submit(spec(1, 0)).await.unwrap();
    assert_eq!((a.id.as_str(), b.id.as_str()), ("job-000001", "job-000002"));
    let stored = reg.get(&a.id).await.unwrap();
    assert_eq!(stored, a);
    assert_eq!(stored.state, JobState::Queued);
    assert!(stored.reason.contains("waiting for 2 workers"), "{}", stored.reason);
    assert_eq!(stored.spec.min_workers, 2, "min_workers defaults to workers");
    assert_eq!(stored.history.len(), 1);
    let ids: Vec<JobId> = reg.list().await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(ids, [a.id, b.id]);
}

#[tokio::test]
async fn invalid_spec_is_refused_and_nothing_is_stored() {
    let (_dir, reg) = registry();
    let err = reg.submit(spec(0, 0)).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { field: "spec.workers", .. }), "{err}");
    assert!(reg.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn full_lifecycle_records_every_transition_with_reason_and_time() {
    let (_dir, reg) = registry();
    let id = reg.submit(spec(2, 0)).await.unwrap().id;
    reg.start(&id, ws(&["w1", "w2"]), "placed").await.unwrap();
    reg.transition(&id, JobState::Running, "all ranks up").await.unwrap();
    let lost = reg.transition(&id, JobState::Recovering, "w2 lost").await.unwrap();
    assert!(lost.workers.is_empty(), "recovering drops the old assignment");
    let again = reg.start(&id, ws(&["w1", "w3"]), "replaced w2").await.unwrap();
    assert_eq!((again.attempt, again.workers.clone()), (2, ws(&["w1", "w3"])));
    reg.transition(&id, JobState::Running, "up").await.unwrap();
    let done = reg.transition(&id, JobState::Succeeded, "step 10 reached").await.unwrap();

    let stored = reg.get(&id).await.unwrap();
    assert_eq!(stored, done);
    let path: Vec<JobState> = stored.history.iter().map(|c| c.to).collect();
    use JobState::*;
    assert_eq!(path, [Queued, Starting, Running, Recovering, Starting, Running, Succeeded]);
    assert!(stored.history.windows(2).all(|w| w[1].from == Some(w[0].to)));
    assert!(stored.history.iter().all(|c| c.at_unix_ms > 0 && !c.reason.is_empty()));
    assert_eq!(stored.reason, "step 10 reached");
}

#[tokio::test]
async fn illegal_transitions_are_errors_and_change_nothing() {
    let (_dir, reg) = registry();
    let id = reg.submit(spec(1, 0)).await.unwrap().id;
    let err = reg.transition(&id, JobState::Running, "skip").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::IllegalTransition { from: JobState::Queued, to: JobState::Running, .. }
        ),
        "{err}"
    );
    reg.cancel(&id, "operator").await.unwrap();
    assert!(reg.cancel(&id, "again").await.is_err());
    assert!(reg.start(&id, ws(&["w1"]), "late").await.is_err());
    let stored = reg.get(&id).await.unwrap();
    assert_eq!((stored.state, stored.history.len()), (JobState::Cancelled, 2));
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn start_refuses_bad_assignments() {
    let (_dir, reg) = registry();
    let id = reg.submit(spec(2, 0)).await.unwrap().id;
    for bad in [ws(&[]), ws(&["a", "a"]), ws(&["a", "b", "c"])] {
        let err = reg.start(&id, bad.clone(), "x").await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { field: "workers", .. }), "{bad:?}: {err}");
    }
    assert_eq!(reg.get(&id).await.unwrap().state, JobState::Queued);
    let unknown = reg.start(&JobId::from_seq(9), ws(&["a"]), "x").await.unwrap_err();
    assert!(matches!(unknown, Error::NotFound { kind: "job", .. }), "{unknown}");
}

#[tokio::test]
async fn racing_completion_and_cancel_exactly_one_wins() {
    let (_dir, reg) = registry();
    for _ in 0..5 {
        let id = reg.submit(spec(1, 0)).await.unwrap().id;
        reg.start(&id, ws(&["w"]), "go").await.unwrap();
        reg.transition(&id, JobState::Running, "up").await.unwrap();
        let (r1, r2) = (reg.clone(), reg.clone());
        let (i1, i2) = (id.clone(), id.clone());
        let done = tokio::spawn(async move { r1.transition(&i1, JobState::Succeeded, "ok").await });
        let cancel = tokio::spawn(async move { r2.cancel(&i2, "operator").await });
        let (done, cancel) = (done.await.unwrap(), cancel.await.unwrap());
        assert!(done.is_ok() != cancel.is_ok(), "exactly one must win");
        let loser = done.err().or(cancel.err()).unwrap();
        assert!(matches!(loser, Error::IllegalTransition { .. }), "{loser}");
        assert_eq!(reg.get(&id).await.unwrap().history.len(), 4);
    }
}

#[tokio::test]
async fn pending_lists_queued_and_recovering_jobs_for_the_scheduler() {
    let (_dir, reg) = registry();
    let queued = reg.submit(spec(4, 7)).await.unwrap().id;
    let running = reg.submit(spec(1, 0)).await.unwrap().id;
    let recovering = reg.submit(JobSpec { min_workers: 1, ..spec(2, 0) }).await.unwrap().id;
    reg.start(&running, ws(&["a"]), "go").await.unwrap();
    reg.start(&recovering, ws(&["b", "c"]), "go").await.unwrap();
    reg.transition(&recovering, JobState::Recovering, "c lost").await.unwrap();
    let pending = reg.pending().await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(
        (&pending[0].id, pending[0].priority, pending[0].resuming, pending[0].workers),
        (&queued, 7, false, 4)
    );
    assert_eq!(
        (&pending[1].id, pending[1].resuming, pending[1].min_workers),
        (&recovering, true, 1)
    );
}

#[tokio::test]
async fn note_updates_the_reason_only_when_it_changes() {
    let (_dir, reg) = registry();
    let job = reg.submit(spec(4, 0)).await.unwrap();
    let noted = reg.note(&job.id, "needs 4 cpu workers; free: 1 cpu").await.unwrap();
    assert_eq!((noted.state, noted.history.len()), (JobState::Queued, 1));
    assert_eq!(reg.get(&job.id).await.unwrap().reason, "needs 4 cpu workers; free: 1 cpu");
    let mut updates = reg.watch(&job.id).await.unwrap();
    reg.note(&job.id, "needs 4 cpu workers; free: 1 cpu").await.unwrap();
    reg.cancel(&job.id, "bye").await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), updates.next()).await.unwrap();
    assert_eq!(next.unwrap().unwrap().state, JobState::Cancelled, "the unchanged note wrote");
}

#[tokio::test]
async fn watch_follows_one_job_and_ignores_jobs_with_longer_ids() {
    let (_dir, reg) = registry();
    let id = reg.submit(spec(1, 0)).await.unwrap().id;
    let mut updates = reg.watch(&id).await.unwrap();
    // job-0000010 would share the prefix `jobs/job-000001` if keys were matched by prefix.
    let store = reg.store.clone();
    let mut other = reg.get(&id).await.unwrap();
    other.id = JobId::parse("job-0000010").unwrap();
    store.put_json(&keys::job(&other.id), &other).await.unwrap();
    reg.start(&id, ws(&["w"]), "go").await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), updates.next()).await.unwrap();
    let job = next.unwrap().unwrap();
    assert_eq!((job.id, job.state), (id, JobState::Starting));
}

#[tokio::test]
async fn corrupt_job_records_are_errors_not_panics() {
    let (_dir, reg) = registry();
    let id = reg.submit(spec(1, 0)).await.unwrap().id;
    let store = reg.store.clone();
    store.put(&keys::job(&id), b"\xff\x00 not json".to_vec()).await.unwrap();
    let err = reg.get(&id).await.unwrap_err();
    assert!(matches!(&err, Error::Corrupt { key, .. } if key == "jobs/job-000001"), "{err}");
    assert!(matches!(reg.list().await, Err(Error::Corrupt { .. })));
    assert!(matches!(reg.cancel(&id, "x").await, Err(Error::Corrupt { .. })));
    // A valid record under the wrong key is corrupt too.
    let other = reg.submit(spec(1, 0)).await.unwrap();
    store.put_json(&keys::job(&id), &other).await.unwrap();
    assert!(matches!(reg.get(&id).await, Err(Error::Corrupt { .. })));
    // A corrupt sequence counter stops submission with an error.
    store.put(keys::JOB_SEQ, b"-1".to_vec()).await.unwrap();
    assert!(matches!(reg.submit(spec(1, 0)).await, Err(Error::Corrupt { .. })));
}

#[tokio::test]
async fn jobs_survive_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.redb");
    let id = {
        let reg = JobRegistry::new(Arc::new(EmbeddedStore::open(&path).unwrap()));
        let id = reg.submit(spec(1, 0)).await.unwrap().id;
        reg.start(&id, ws(&["w"]), "go").await.unwrap();
        id
    };
    let reg = JobRegistry::new(Arc::new(EmbeddedStore::open(&path).unwrap()));
    let job = reg.get(&id).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Starting, 1));
    assert_eq!(reg.submit(spec(1, 0)).await.unwrap().id.as_str(), "job-000002");
}

#[tokio::test]
async fn a_report_about_an_ended_attempt_changes_nothing() {
    let (_dir, reg) = registry();
    let id = reg.submit(spec(1, 0)).await.unwrap().id;
    reg.start(&id, ws(&["a"]), "go").await.unwrap();
    let moved = reg.transition_attempt(&id, 1, JobState::Recovering, "a lost").await.unwrap();
    assert_eq!(moved.map(|j| j.state), Some(JobState::Recovering));
    reg.start(&id, ws(&["b"]), "again").await.unwrap();
    // Attempt 1's late failure report must not interrupt attempt 2.
    let stale = reg.transition_attempt(&id, 1, JobState::Recovering, "late").await.unwrap();
    assert!(stale.is_none());
    let job = reg.get(&id).await.unwrap();
    assert_eq!((job.state, job.attempt, job.workers), (JobState::Starting, 2, ws(&["b"])));
}
