//! `ferrite coordinator` and the operator commands (`ferrite job …`, `ferrite checkpoints …`)
//! as real processes on 127.0.0.1: the coordinator binds port 0 and the harness reads the
//! address from its `READY addr=HOST:PORT` line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

const FERRITE: &str = env!("CARGO_BIN_EXE_ferrite");

/// A running coordinator, killed on drop.
struct Coordinator {
    child: Child,
    addr: String,
    // Kept open so the coordinator never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl Coordinator {
    fn start(store: &Path) -> Coordinator {
        let mut child = Command::new(FERRITE)
            .args(["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--store"])
            .arg(format!("embedded:{}", store.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ferrite coordinator");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read READY line");
        let addr = match line.trim_end().strip_prefix("READY addr=") {
            Some(addr) => addr.to_owned(),
            None => {
                let _ = child.kill();
                panic!("expected READY addr=..., got {line:?}");
            }
        };
        Coordinator { child, addr, _stdout: stdout }
    }

    /// `ferrite <args> --coordinator <addr>`.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(FERRITE)
            .args(args)
            .args(["--coordinator", &format!("http://{}", self.addr)])
            .env_remove("FERRITE_COORDINATOR")
            .output()
            .expect("run ferrite")
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; returns whether it exited
    /// successfully.
    fn terminate(mut self) -> bool {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "coordinator ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Output of a command that must succeed.
fn ok(out: Output) -> String {
    assert!(out.status.success(), "failed: {}\n{}", stdout(&out), stderr(&out));
    stdout(&out)
}

/// A temp dir with a data dir and a valid job file pointing at it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        Fixture { dir }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("coordinator.redb")
    }

    fn job_text(&self) -> String {
        let data = self.dir.path().join("data");
        let out = self.dir.path().join("out");
        format!(
            "name = \"tiny\"\n\
             [model]\nn_layer = 2\nn_head = 4\nn_embd = 128\nblock_size = 64\n\
             [data]\ndir = {:?}\n\
             [train]\nmax_steps = 10\n\
             [output]\ndir = {:?}\n\
             [cluster]\nworkers = 2\nmin_workers = 1\n",
            data.display().to_string(),
            out.display().to_string()
        )
    }

    /// Writes `text` as a job file named `name`; returns its path.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

fn job_ids(list: &str) -> Vec<String> {
    list.lines().skip(1).filter_map(|l| l.split_whitespace().next().map(str::to_owned)).collect()
}

fn state_of(list: &str, id: &str) -> Option<String> {
    list.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
}

#[test]
fn submitted_job_is_queued_shown_cancelled_and_survives_a_restart() {
    let fx = Fixture::new();
    let coord = Coordinator::start(&fx.store());
    let job = fx.write("job.toml", &fx.job_text());

    let id = ok(coord.cli(&["job", "submit", &job])).trim().to_owned();
    assert!(id.starts_with("job-"), "{id:?}");
    let list = ok(coord.cli(&["job", "list"]));
    assert_eq!(state_of(&list, &id).as_deref(), Some("QUEUED"), "{list}");
    assert!(list.contains("tiny"), "{list}");

    let json = ok(coord.cli(&["job", "status", &id, "--json"]));
    let status: serde_json::Value = serde_json::from_str(&json).expect("status --json is JSON");
    assert_eq!(status["id"], id.as_str());
    assert_eq!(status["state"], "QUEUED");
    assert_eq!(status["workers"], 2);
    assert_eq!(status["min_workers"], 1);
    assert_eq!(status["kind"], "pretrain");
    assert_eq!(status["history"][0]["to"], "QUEUED");
    let text = ok(coord.cli(&["job", "status", &id]));
    assert!(text.contains("state:     QUEUED"), "{text}");

    let cancelled = ok(coord.cli(&["job", "cancel", &id, "--reason", "not today"]));
    assert_eq!(cancelled.trim(), format!("{id} CANCELLED"));
    let json = ok(coord.cli(&["job", "status", &id, "--json"]));
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["state"], "CANCELLED");
    assert_eq!(status["reason"], "not today");
    // A second cancel is refused: the job has finished.
    let again = coord.cli(&["job", "cancel", &id]);
    assert!(!again.status.success());
    assert!(stderr(&again).starts_with("error: "), "{}", stderr(&again));

    let second = ok(coord.cli(&["job", "submit", &job])).trim().to_owned();
    let ckpts = ok(coord.cli(&["checkpoints", "list", "--job", &second]));
    assert_eq!(ckpts.lines().count(), 1, "only the header: {ckpts}");

    assert!(coord.terminate(), "coordinator did not stop cleanly on SIGTERM");
    let coord = Coordinator::start(&fx.store());
    let list = ok(coord.cli(&["job", "list"]));
    assert_eq!(job_ids(&list), vec![id.clone(), second.clone()], "{list}");
    assert_eq!(state_of(&list, &id).as_deref(), Some("CANCELLED"));
    assert_eq!(state_of(&list, &second).as_deref(), Some("QUEUED"));
    // New ids continue after the reloaded ones.
    let third = ok(coord.cli(&["job", "submit", &job])).trim().to_owned();
    assert!(third > second, "{third} after {second}");
}

#[test]
fn bad_job_files_are_rejected_naming_the_field_and_not_stored() {
    let fx = Fixture::new();
    let coord = Coordinator::start(&fx.store());
    let good = fx.job_text();
    let cases = [
        ("unknown.toml", good.replace("max_steps", "max_stepz"), "train.max_stepz"),
        ("zero.toml", good.replace("workers = 2", "workers = 0"), "cluster.workers"),
        ("embd.toml", good.replace("n_embd = 128", "n_embd = 130"), "model.n_embd"),
        ("nodata.toml", good.replace("/data\"", "/missing\""), "data.dir"),
    ];
    for (name, text, field) in &cases {
        assert_ne!(text, &good, "{name}: the case did not change the file");
        let path = fx.write(name, text);
        let out = coord.cli(&["job", "submit", &path]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{name} accepted");
        assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
        assert!(err.starts_with(&format!("error: invalid argument `{field}`")), "{name}: {err}");
        assert!(stdout(&out).is_empty(), "{name} printed an id");
    }
    let embd = coord.cli(&["job", "submit", &fx.write("e.toml", &cases[2].1)]);
    assert_eq!(
        stderr(&embd).trim(),
        "error: invalid argument `model.n_embd`: 130 is not a positive multiple of n_head = 4"
    );
    let list = ok(coord.cli(&["job", "list"]));
    assert!(job_ids(&list).is_empty(), "rejected jobs were stored: {list}");
}

#[test]
fn bad_ids_and_unreachable_coordinator_are_one_line_errors() {
    let fx = Fixture::new();
    let coord = Coordinator::start(&fx.store());
    let bad = coord.cli(&["job", "status", "nope"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).starts_with("error: invalid argument `job_id`"), "{}", stderr(&bad));
    let missing = coord.cli(&["job", "status", "job-000042"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("not found"), "{}", stderr(&missing));
    let ckpts = coord.cli(&["checkpoints", "list", "--job", "job-000042"]);
    assert!(stderr(&ckpts).contains("not found"), "{}", stderr(&ckpts));

    // The env var names the coordinator when the flag is absent.
    let via_env = Command::new(FERRITE)
        .args(["job", "list"])
        .env("FERRITE_COORDINATOR", &coord.addr)
        .output()
        .unwrap();
    assert!(via_env.status.success(), "{}", stderr(&via_env));

    drop(coord);
    let gone = Command::new(FERRITE)
        .args(["job", "list", "--coordinator", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!gone.status.success());
    let err = stderr(&gone);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: cannot reach the coordinator"), "{err}");
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn submit_wait_follows_the_job_until_it_is_cancelled() {
    let fx = Fixture::new();
    let coord = Coordinator::start(&fx.store());
    let job = fx.write("job.toml", &fx.job_text());
    let mut waiter = Killed(
        Command::new(FERRITE)
            .args(["job", "submit", &job, "--wait", "--coordinator", &coord.addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut id = String::new();
    BufReader::new(waiter.0.stdout.take().unwrap()).read_line(&mut id).unwrap();
    let id = id.trim().to_owned();
    assert!(id.starts_with("job-"), "{id:?}");
    // The first line is the watch's snapshot: from here on, the waiter is following.
    let mut err = BufReader::new(waiter.0.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.starts_with(&format!("{id} QUEUED")), "{first:?}");

    ok(coord.cli(&["job", "cancel", &id, "--reason", "operator changed mind"]));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = waiter.0.wait().unwrap();
    assert!(!status.success(), "a cancelled job is not a success");
    assert!(rest.contains(&format!("{id} CANCELLED operator changed mind")), "{rest}");
    assert!(rest.contains(&format!("error: job {id} CANCELLED: operator changed mind")), "{rest}");
}
