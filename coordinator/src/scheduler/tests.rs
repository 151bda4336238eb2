use super::*;

fn job(seq: u64, priority: i32, workers: u32) -> PendingJob {
    PendingJob {
        id: JobId::from_seq(seq),
        priority,
        submit_seq: seq,
        workers,
        min_workers: workers,
        device: None,
        resuming: false,
    }
}

fn worker(name: &str, device: DeviceKind, threads: u32) -> FreeWorker {
    FreeWorker { id: WorkerId::new(name), device, threads }
}

fn cpus(n: usize) -> Vec<FreeWorker> {
    (0..n).map(|i| worker(&format!("c{i}"), DeviceKind::Cpu, 8)).collect()
}

fn view(pending: Vec<PendingJob>, free: Vec<FreeWorker>) -> ClusterView {
    ClusterView { pending, free_workers: free, strategy: QueueingStrategy::StrictFifo }
}

fn started(actions: &[Action]) -> Vec<(u64, usize)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { job, workers } => {
                let seq = job.as_str()["job-".len()..].parse().unwrap();
                Some((seq, workers.len()))
            }
            Action::Wait { .. } => None,
        })
        .collect()
}

#[test]
fn higher_priority_first_then_submission_order() {
    let pending = vec![job(1, 0, 1), job(2, 5, 1), job(3, 5, 1), job(4, 0, 1)];
    let actions = schedule(&view(pending, cpus(3)));
    assert_eq!(started(&actions), vec![(2, 1), (3, 1), (1, 1)]);
    let order: Vec<&str> = actions.iter().map(|a| a.job().as_str()).collect();
    assert_eq!(order, ["job-000002", "job-000003", "job-000001", "job-000004"]);
}

#[test]
fn strict_fifo_blocks_smaller_jobs_behind_one_that_does_not_fit() {
    let pending = vec![job(1, 0, 4), job(2, 0, 1)];
    let actions = schedule(&view(pending, cpus(2)));
    assert!(started(&actions).is_empty());
    match &actions[1] {
        Action::Wait { reason, .. } => assert!(reason.contains("job-000001"), "{reason}"),
        other => panic!("expected Wait, got {other:?}"),
    }
    match &actions[0] {
        Action::Wait { reason, .. } => assert!(reason.contains("needs 4"), "{reason}"),
        other => panic!("expected Wait, got {other:?}"),
    }
}

#[test]
fn best_effort_fifo_backfills_jobs_that_fit() {
    let pending = vec![job(1, 0, 4), job(2, 0, 1), job(3, 0, 2)];
    let mut v = view(pending, cpus(2));
    v.strategy = QueueingStrategy::BestEffortFifo;
    assert_eq!(started(&schedule(&v)), vec![(2, 1)]);
}

#[test]
fn ranks_go_to_workers_with_most_threads_first() {
    let free = vec![
        worker("a", DeviceKind::Cpu, 4),
        worker("b", DeviceKind::Cpu, 16),
        worker("c", DeviceKind::Cpu, 16),
    ];
    let actions = schedule(&view(vec![job(1, 0, 3)], free));
    let Action::Start { workers, .. } = &actions[0] else { panic!("{actions:?}") };
    let names: Vec<&str> = workers.iter().map(WorkerId::as_str).collect();
    assert_eq!(names, ["b", "c", "a"]);
}

#[test]
fn one_job_never_mixes_device_kinds_and_prefers_cuda() {
    let mut free = cpus(2);
    free.push(worker("g0", DeviceKind::Cuda, 4));
    free.push(worker("g1", DeviceKind::Cuda, 4));
    // 3 workers: neither kind has 3 free, and 2 cuda + 1 cpu is not allowed.
    assert!(started(&schedule(&view(vec![job(1, 0, 3)], free.clone()))).is_empty());
    let actions = schedule(&view(vec![job(1, 0, 2), job(2, 0, 2)], free.clone()));
    let Action::Start { workers, .. } = &actions[0] else { panic!("{actions:?}") };
    assert!(workers.iter().all(|w| w.as_str().starts_with('g')), "{workers:?}");
    let Action::Start { workers, .. } = &actions[1] else { panic!("{actions:?}") };
    assert!(workers.iter().all(|w| w.as_str().starts_with('c')), "{workers:?}");
    // A job that asks for CPU does not take GPUs even when they are the only free workers.
    let cpu_job = PendingJob { device: Some(DeviceKind::Cpu), ..job(3, 0, 2) };
    let gpus_only: Vec<FreeWorker> =
        free.into_iter().filter(|w| w.device == DeviceKind::Cuda).collect();
    assert!(started(&schedule(&view(vec![cpu_job], gpus_only))).is_empty());
}

#[test]
fn resuming_job_may_shrink_to_min_workers_but_fresh_job_may_not() {
    let fresh = PendingJob { min_workers: 2, ..job(1, 0, 4) };
    assert!(started(&schedule(&view(vec![fresh.clone()], cpus(3)))).is_empty());
    let resuming = PendingJob { resuming: true, ..fresh };
    assert_eq!(started(&schedule(&view(vec![resuming.clone()], cpus(3)))), vec![(1, 3)]);
    assert_eq!(started(&schedule(&view(vec![resuming.clone()], cpus(9)))), vec![(1, 4)]);
    assert!(started(&schedule(&view(vec![resuming], cpus(1)))).is_empty());
}

#[test]
fn a_worker_listed_twice_is_assigned_once() {
    let mut free = cpus(1);
    free.push(free[0].clone());
    let actions = schedule(&view(vec![job(1, 0, 2), job(2, 0, 1)], free));
    assert_eq!(started(&actions), vec![]);
    let actions = schedule(&view(vec![job(1, 0, 1), job(2, 0, 1)], cpus(1)));
    assert_eq!(started(&actions), vec![(1, 1)]);
}

#[test]
fn zero_worker_job_waits_with_a_reason_instead_of_panicking() {
    let actions = schedule(&view(vec![job(1, 0, 0)], cpus(2)));
    assert!(matches!(&actions[0], Action::Wait { reason, .. } if reason.contains("0 workers")));
}

/// xorshift64*: a tiny deterministic generator, so the property test needs no crate.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[test]
fn random_views_keep_every_invariant() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2000 {
        let free: Vec<FreeWorker> = (0..rng.below(12))
            .map(|i| {
                let kind = if rng.below(2) == 0 { DeviceKind::Cpu } else { DeviceKind::Cuda };
                worker(&format!("w{}", i % 9), kind, rng.below(4) as u32)
            })
            .collect();
        let pending: Vec<PendingJob> = (0..rng.below(8))
            .map(|seq| {
                let workers = 1 + rng.below(5) as u32;
                PendingJob {
                    min_workers: 1 + rng.below(u64::from(workers)) as u32,
                    resuming: rng.below(2) == 0,
                    device: [None, Some(DeviceKind::Cpu), Some(DeviceKind::Cuda)]
                        [rng.below(3) as usize],
                    ..job(seq, rng.below(3) as i32, workers)
                }
            })
            .collect();
        let strategy = if rng.below(2) == 0 {
            QueueingStrategy::StrictFifo
        } else {
            QueueingStrategy::BestEffortFifo
        };
        let v = ClusterView { pending, free_workers: free, strategy };
        check_invariants(&v, &schedule(&v));
    }
}

fn check_invariants(v: &ClusterView, actions: &[Action]) {
    assert_eq!(actions.len(), v.pending.len(), "one action per pending job");
    let mut used = HashSet::new();
    let mut saw_wait = false;
    for action in actions {
        let job = v.pending.iter().find(|j| &j.id == action.job()).expect("known job");
        match action {
            Action::Wait { .. } => saw_wait = true,
            Action::Start { workers, .. } => {
                if v.strategy == QueueingStrategy::StrictFifo {
                    assert!(!saw_wait, "strict FIFO started a job behind a waiting one");
                }
                let need = if job.resuming { job.min_workers } else { job.workers };
                assert!(workers.len() >= need as usize && workers.len() <= job.workers as usize);
                let kinds: HashSet<DeviceKind> = workers
                    .iter()
                    .map(|w| v.free_workers.iter().find(|f| &f.id == w).expect("free").device)
                    .collect();
                assert_eq!(kinds.len(), 1, "mixed device kinds");
                if let Some(kind) = job.device {
                    assert!(kinds.contains(&kind));
                }
                for w in workers {
                    assert!(used.insert(w.clone()), "{w} assigned twice");
                }
            }
        }
    }
}
