//! Chaos with real processes on 127.0.0.1: a worker SIGKILLed or SIGSTOPped mid-job, the
//! coordinator SIGKILLed and restarted, the leading coordinator killed with a standby
//! present, a worker killed while its checkpoint is being written. Each job must still
//! succeed, and where its world size is kept, end with the same bits as an uninterrupted run.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferrite_model::checkpoint;
use harness::etcd::EtcdProcess;
use harness::{final_weights, history, now_ms, steps, Change, Cluster};

const STEPS: u64 = 400;
const JOB_SERVICE: &str = "ferrite.v1.JobService";

/// Submits `name` on 2 workers of batch 4 and waits for its first checkpoint.
fn start_job(cluster: &Cluster, name: &str, steps: u64) -> String {
    let job = cluster.job(name, 2, 4, steps, name);
    let (out, id) = cluster.submit(&job, false);
    cluster.ok(&out);
    cluster.wait_for_checkpoint(&id, Duration::from_secs(60));
    id
}

/// Runs the same job again, uninterrupted, and compares the final weights bit for bit.
fn assert_same_bits_as_uninterrupted(cluster: &Cluster, name: &str, steps: u64) {
    let reference = format!("{name}-reference");
    cluster.run_reference(&cluster.job(&reference, 2, 4, steps, &reference));
    let (a, b) = (final_weights(&cluster.path(name)), final_weights(&cluster.path(&reference)));
    assert!(a == b, "final weights of {name} differ from an uninterrupted run");
}

fn assert_every_step_once(cluster: &Cluster, name: &str, n: u64) {
    let logged = steps(&cluster.path(&format!("{name}/metrics.jsonl")));
    assert_eq!(logged, (1..=n).collect::<Vec<_>>(), "every step logged once, in order");
}

fn print_history(h: &[Change]) {
    for c in h {
        eprintln!("{} {} {}", c.at_ms, c.to, c.reason);
    }
}

/// The resume after the (single) failure: (kill -> Recovering, kill -> first step) in ms.
fn recovery_times(h: &[Change], killed_ms: i64) -> (i64, i64) {
    let recovering = h.iter().find(|c| c.to == "RECOVERING").expect("went through RECOVERING");
    let resumed = h.iter().rev().find(|c| c.to == "STARTING").unwrap();
    assert!(
        resumed.reason.contains("resuming from step") && resumed.reason.contains("on 2 workers"),
        "{}",
        resumed.reason
    );
    let running = h.iter().rev().find(|c| c.to == "RUNNING").unwrap();
    assert!(running.reason.starts_with("resumed: step"), "{}", running.reason);
    (recovering.at_ms - killed_ms, running.at_ms - killed_ms)
}

#[test]
fn a_killed_worker_sends_the_job_to_recovering_and_it_finishes_on_the_spare_bit_for_bit() {
    let mut cluster = Cluster::start(None, 3);
    cluster.prepare_data();
    let id = start_job(&cluster, "killed", STEPS);
    let j = cluster.status_json(&id);
    let victim = j["assigned_workers"][1].as_str().unwrap().to_owned();
    let killed_ms = now_ms();
    cluster.workers.remove(cluster.worker(&victim)).kill();
    let j = cluster.wait_for_state(&id, "SUCCEEDED", Duration::from_secs(120));
    let h = history(&j);
    print_history(&h);
    // The first to notice may be the coordinator (the victim's stream closed) or the
    // survivor (its ring connection to the victim, rank 1, closed): either names what broke.
    let why = &h.iter().find(|c| c.to == "RECOVERING").unwrap().reason;
    let ring = why.contains("rank 1 (") && why.contains("connection closed by peer");
    assert!(why.contains(&victim) || ring, "{why}");
    let (detect, resume) = recovery_times(&h, killed_ms);
    eprintln!("SIGKILL worker: detected after {detect} ms, first step after resume {resume} ms");
    assert_every_step_once(&cluster, "killed", STEPS);
    assert_same_bits_as_uninterrupted(&cluster, "killed", STEPS);
}

#[test]
fn a_stopped_worker_is_fenced_and_after_sigcont_corrupts_nothing() {
    let cluster = Cluster::start(None, 3);
    cluster.prepare_data();
    let id = start_job(&cluster, "stalled", STEPS);
    let j = cluster.status_json(&id);
    // Rank 0: the one that writes metrics and checkpoints, so the most dangerous to return.
    let victim = j["assigned_workers"][0].as_str().unwrap().to_owned();
    let stopped = cluster.worker(&victim);
    let stopped_ms = now_ms();
    cluster.workers[stopped].signal("STOP");
    // The job resumes without it: its lease (2 s) runs out, the spare takes its place.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = cluster.status_json(&id);
        let resumed = j["attempt"].as_u64() > Some(1) && j["state"] == "RUNNING";
        if resumed || j["state"] == "SUCCEEDED" {
            break;
        }
        assert!(Instant::now() < deadline, "never resumed: {j}\n{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.workers[stopped].signal("CONT");
    let j = cluster.wait_for_state(&id, "SUCCEEDED", Duration::from_secs(120));
    let h = history(&j);
    print_history(&h);
    let why = &h.iter().find(|c| c.to == "RECOVERING").unwrap().reason;
    assert!(why.contains(&victim), "{why}");
    let (detect, resume) = recovery_times(&h, stopped_ms);
    eprintln!("SIGSTOP worker: detected after {detect} ms, first step after resume {resume} ms");
    assert!(detect >= 1500, "a lease of 2 s cannot run out after {detect} ms");
    // The stale worker learnt it was fenced and joined again under a new id.
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = cluster.path(&format!("worker-{stopped}.log"));
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("fenced by the coordinator") && text.matches("registered").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the stale worker never re-registered\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_every_step_once(&cluster, "stalled", STEPS);
    assert_same_bits_as_uninterrupted(&cluster, "stalled", STEPS);
}

#[test]
fn a_killed_coordinator_restarts_and_the_job_goes_on_without_a_restart() {
    // A longer lease than the other tests: the restarted coordinator gives every worker one
    // lease period to reattach, and reattaching follows a backoff of up to 2 s.
    let mut cluster = Cluster::start_with(None, 1, 2, "4s");
    cluster.prepare_data();
    let steps = 3 * STEPS;
    let id = start_job(&cluster, "restarted", steps);
    assert_eq!(cluster.status_json(&id)["state"], "RUNNING");
    let down = cluster.restart_coordinator(0);
    eprintln!("coordinator down for {down:?}");
    let j = cluster.wait_for_state(&id, "SUCCEEDED", Duration::from_secs(120));
    let h = history(&j);
    print_history(&h);
    assert!(
        h.iter().all(|c| c.to != "RECOVERING"),
        "the job restarted instead of carrying on\n{}",
        cluster.logs()
    );
    assert_eq!(j["attempt"], 1, "{j}");
    let log = std::fs::read_to_string(cluster.path("coordinator-0.log")).unwrap();
    assert!(log.contains("worker reattached"), "{log}");
    assert_every_step_once(&cluster, "restarted", steps);
    assert_same_bits_as_uninterrupted(&cluster, "restarted", steps);
}

#[test]
fn with_etcd_the_standby_coordinator_takes_over_when_the_leader_is_killed() {
    let Some(etcd) = EtcdProcess::start() else { return };
    let store = format!("etcd:{}", etcd.endpoint);
    let mut cluster = Cluster::start_with(Some(&store), 2, 2, "5s");
    cluster.prepare_data();
    // Exactly one leads: the other's health says NOT_SERVING and it refuses calls.
    let leader = wait_for_one_leader(&cluster);
    let standby = 1 - leader;
    let leader_url = format!("http://{}", cluster.coordinators[leader].addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The standby learns who leads within a moment of the election.
        let refused = cluster.cli_at(standby, &["job", "list"]);
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr).into_owned();
        assert!(err.contains("standby"), "{err}");
        if err.contains(&leader_url) {
            break;
        }
        assert!(Instant::now() < deadline, "the standby never named the leader: {err}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The health service tells them apart too (what a Kubernetes readiness probe asks).
    let health = |n: usize, service: &str| {
        let addr = format!("http://{}", cluster.coordinators[n].addr);
        let args = ["health", "--addr", &addr, "--service", service];
        Command::new(harness::FERRITE).args(args).output().unwrap()
    };
    let (lead, stand) = (health(leader, JOB_SERVICE), health(standby, JOB_SERVICE));
    assert!(lead.status.success(), "{}", String::from_utf8_lossy(&lead.stderr));
    let err = String::from_utf8_lossy(&stand.stderr);
    assert!(!stand.status.success() && err.contains("NOT_SERVING"), "{err}");
    assert!(health(standby, "").status.success(), "a standby is alive as a whole");

    let steps = 3 * STEPS;
    let id = start_job(&cluster, "failover", steps);
    let killed = Instant::now();
    cluster.coordinators.remove(leader).kill();
    let j = cluster.wait_for_state(&id, "SUCCEEDED", Duration::from_secs(120));
    eprintln!("leader killed -> job succeeded in {:?}", killed.elapsed());
    let h = history(&j);
    print_history(&h);
    let log = std::fs::read_to_string(cluster.path(&format!("coordinator-{standby}.log")));
    assert!(log.unwrap().contains("elected leader"), "{}", cluster.logs());
    assert_every_step_once(&cluster, "failover", steps);
    assert_same_bits_as_uninterrupted(&cluster, "failover", steps);
}

/// The index of the one coordinator that leads, once the election settled.
fn wait_for_one_leader(cluster: &Cluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leading: Vec<usize> = (0..cluster.coordinators.len())
            .filter(|&n| cluster.cli_at(n, &["job", "list"]).status.success())
            .collect();
        if let [one] = leading.as_slice() {
            return *one;
        }
        assert!(leading.len() <= 1, "two coordinators lead at once");
        assert!(Instant::now() < deadline, "no leader elected\n{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_worker_killed_while_its_checkpoint_is_written_leaves_only_whole_checkpoints() {
    let mut cluster = Cluster::start(None, 3);
    cluster.prepare_data();
    // A wider model, so that writing a checkpoint takes long enough to be caught in the act.
    let job = cluster.job("torn", 2, 4, 60, "torn");
    let text = std::fs::read_to_string(&job).unwrap().replace("n_embd = 32", "n_embd = 256");
    std::fs::write(&job, text).unwrap();
    let (out, id) = cluster.submit(&job, false);
    cluster.ok(&out);
    cluster.wait_for_state(&id, "RUNNING", Duration::from_secs(60));
    let writer = cluster.status_json(&id)["assigned_workers"][0].as_str().unwrap().to_owned();
    let root = cluster.path("torn/checkpoints");
    // Rank 0 writes into a hidden temporary folder and renames it when whole.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !has_temporary(&root) {
        assert!(Instant::now() < deadline, "never saw a checkpoint being written");
        std::thread::sleep(Duration::from_millis(1));
    }
    cluster.workers.remove(cluster.worker(&writer)).kill();
    let j = cluster.wait_for_state(&id, "SUCCEEDED", Duration::from_secs(120));
    print_history(&history(&j));
    // Every checkpoint the registry ever listed is whole and loads.
    let listed = cluster.ok(&cluster.cli(&["checkpoints", "list", "--job", &id]));
    let mut paths = 0;
    for line in listed.lines().skip(1) {
        let path = line.split_whitespace().find(|w| w.starts_with('/')).expect("a path");
        assert!(!path.contains(".tmp-"), "a temporary folder was published: {line}");
        checkpoint::load_weights(Path::new(path))
            .unwrap_or_else(|e| panic!("listed checkpoint {path} does not load: {e}"));
        paths += 1;
    }
    assert!(paths > 0, "{listed}");
    assert!(checkpoint::list(&root).unwrap().iter().all(|(_, p)| p.exists()));
}

fn has_temporary(root: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(root) else { return false };
    entries.flatten().any(|e| e.file_name().to_string_lossy().contains(".tmp-"))
}
