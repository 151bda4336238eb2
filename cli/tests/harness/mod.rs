//! A cluster of real processes on 127.0.0.1 for the tests that run `ferrite coordinator`,
//! `ferrite worker`s and the operator CLI as an operator does. Every process binds port 0
//! and the harness reads its address from its `READY addr=…` line.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferrite_model::checkpoint;

pub mod etcd;

pub const FERRITE: &str = env!("CARGO_BIN_EXE_ferrite");

/// A child process that printed `READY addr=…`, killed on drop.
pub struct Proc {
    child: Child,
    pub addr: String,
    pub ready_line: String,
    _stdout: BufReader<ChildStdout>,
}

impl Proc {
    pub fn start(mut cmd: Command, log: &Path) -> Proc {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start ferrite");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read READY line");
        let Some(rest) = line.trim_end().strip_prefix("READY addr=") else {
            let _ = child.kill();
            panic!("expected READY addr=..., got {line:?}");
        };
        let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
        Proc { child, addr, ready_line: line.trim_end().to_owned(), _stdout: stdout }
    }

    /// The value of `key=` on the READY line.
    pub fn field(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        let found = self.ready_line.split_whitespace().find_map(|w| w.strip_prefix(&prefix));
        found.unwrap_or_else(|| panic!("no {key}= in {:?}", self.ready_line)).to_owned()
    }

    /// Sends a signal by name (`STOP`, `CONT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Coordinators and workers in one temp dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub coordinators: Vec<Proc>,
    coordinator_args: Vec<String>,
    /// Given to every coordinator and worker (`--http-listen`, `--log-format`).
    extra_args: Vec<String>,
    /// Every coordinator started, dead or alive, as an operator lists them.
    coordinator_urls: Vec<String>,
    pub workers: Vec<Proc>,
}

impl Cluster {
    /// One coordinator (on an embedded store unless `store` names one), `workers` workers.
    pub fn start(store: Option<&str>, workers: usize) -> Cluster {
        Self::start_with(store, 1, workers, "2s")
    }

    /// `coordinators` coordinators on one store; workers silent for `heartbeat` are dropped.
    pub fn start_with(
        store: Option<&str>,
        coordinators: usize,
        workers: usize,
        heartbeat: &str,
    ) -> Cluster {
        Self::start_full(store, coordinators, workers, heartbeat, &[])
    }

    /// As [`Cluster::start_with`], with `extra` arguments for every coordinator and worker.
    pub fn start_full(
        store: Option<&str>,
        coordinators: usize,
        workers: usize,
        heartbeat: &str,
        extra: &[&str],
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let store = store.map_or_else(
            || format!("embedded:{}", dir.path().join("coord.redb").display()),
            str::to_owned,
        );
        let args = ["--heartbeat-timeout", heartbeat, "--store", &store];
        let mut cluster = Cluster {
            dir,
            coordinators: Vec::new(),
            coordinator_args: args.map(str::to_owned).to_vec(),
            extra_args: extra.iter().map(|a| a.to_string()).collect(),
            coordinator_urls: Vec::new(),
            workers: Vec::new(),
        };
        for n in 0..coordinators {
            let c = cluster.start_coordinator(n, "127.0.0.1:0");
            cluster.coordinator_urls.push(format!("http://{}", c.addr));
            cluster.coordinators.push(c);
        }
        for _ in 0..workers {
            cluster.add_worker();
        }
        cluster
    }

    fn start_coordinator(&self, n: usize, listen: &str) -> Proc {
        let mut cmd = Command::new(FERRITE);
        // Plain text and no tokens: security has its own tests (security.rs).
        cmd.args(["coordinator", "--insecure", "--listen", listen]).args(&self.coordinator_args);
        cmd.args(&self.extra_args);
        Proc::start(cmd, &self.path(&format!("coordinator-{n}.log")))
    }

    /// SIGKILLs coordinator `n` and starts it again on the same address and store.
    pub fn restart_coordinator(&mut self, n: usize) -> Duration {
        let old = self.coordinators.remove(n);
        let addr = old.addr.clone();
        let started = Instant::now();
        old.kill();
        let new = self.start_coordinator(n, &addr);
        self.coordinators.insert(n, new);
        started.elapsed()
    }

    /// Every coordinator's URL, comma-separated (workers and the CLI follow the leader).
    pub fn url(&self) -> String {
        self.coordinator_urls.join(",")
    }

    pub fn add_worker(&mut self) {
        let n = self.workers.len();
        let mut cmd = Command::new(FERRITE);
        cmd.args(["worker", "--insecure", "--coordinator", &self.url(), "--threads", "1"])
            .args(["--listen", "127.0.0.1:0"])
            .args(&self.extra_args);
        let w = Proc::start(cmd, &self.path(&format!("worker-{n}.log")));
        assert!(w.ready_line.contains(" worker=w-"), "{}", w.ready_line);
        self.workers.push(w);
    }

    /// The worker process that registered as `id`.
    pub fn worker(&self, id: &str) -> usize {
        let suffix = format!("worker={id}");
        self.workers.iter().position(|w| w.ready_line.ends_with(&suffix)).expect("one of ours")
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// `ferrite <args> --coordinator URL`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(FERRITE)
            .args(args)
            .args(["--coordinator", &self.url()])
            .env_remove("FERRITE_COORDINATOR")
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run ferrite")
    }

    /// `ferrite <args> --coordinator URL` against coordinator `n` alone.
    pub fn cli_at(&self, n: usize, args: &[&str]) -> Output {
        Command::new(FERRITE)
            .args(args)
            .args(["--coordinator", &format!("http://{}", self.coordinators[n].addr)])
            .env_remove("FERRITE_COORDINATOR")
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run ferrite")
    }

    /// The last lines of every process's log.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                all += &format!("--- {}\n", p.display());
                all += &tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                all += "\n";
            }
        }
        all
    }

    /// The command's stdout; fails the test with its stderr and the logs if it failed.
    pub fn ok(&self, out: &Output) -> String {
        assert!(
            out.status.success(),
            "failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout.clone()).unwrap()
    }

    /// Prepares a small character corpus under `data/`.
    pub fn prepare_data(&self) {
        let text: String = (0..400)
            .map(|i| format!("line {} of a small corpus, said {}.\n", i % 9, i % 5))
            .collect();
        std::fs::write(self.path("corpus.txt"), text).unwrap();
        let out = Command::new(FERRITE)
            .args(["data", "prepare", "--tokenizer", "char", "--out"])
            .arg(self.path("data"))
            .arg(self.path("corpus.txt"))
            .output()
            .unwrap();
        self.ok(&out);
    }

    /// Writes a job file for `workers` ranks of `batch` rows each, output under `out`.
    pub fn job(&self, name: &str, workers: usize, batch: usize, steps: u64, out: &str) -> PathBuf {
        let text = format!(
            r#"name = "{name}"
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
[data]
dir = "{data}"
[train]
batch_size = {batch}
max_steps = {steps}
learning_rate = 1e-3
warmup_steps = 5
lr_decay_steps = {steps}
eval_interval = 10
eval_steps = 2
seed = 7
[output]
dir = "{out}"
checkpoint_interval = 10
[cluster]
workers = {workers}
"#,
            data = self.path("data").display(),
            out = self.path(out).display(),
        );
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `job submit`, with `--wait` or not; the job id it printed.
    pub fn submit(&self, job: &Path, wait: bool) -> (Output, String) {
        let mut args = vec!["job", "submit", job.to_str().unwrap()];
        if wait {
            args.push("--wait");
        }
        let out = self.cli(&args);
        let id = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find(|w| w.starts_with("job-"))
            .unwrap_or_default()
            .to_owned();
        (out, id)
    }

    pub fn status_json(&self, id: &str) -> serde_json::Value {
        let out = self.cli(&["job", "status", id, "--json"]);
        serde_json::from_str(&self.ok(&out)).unwrap()
    }

    pub fn wait_for_state(&self, id: &str, state: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let job = self.status_json(id);
            if job["state"] == state {
                return job;
            }
            assert!(Instant::now() < deadline, "{id} never became {state}: {job}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the job has published a checkpoint.
    pub fn wait_for_checkpoint(&self, id: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let listed = self.ok(&self.cli(&["checkpoints", "list", "--job", id]));
            if listed.lines().count() > 1 {
                return;
            }
            assert!(Instant::now() < deadline, "no checkpoint published\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the job file `job` (written by [`Cluster::job`]) to the end, uninterrupted.
    pub fn run_reference(&self, job: &Path) {
        let (out, id) = self.submit(job, true);
        self.ok(&out);
        assert_eq!(self.status_json(&id)["state"], "SUCCEEDED");
    }
}

/// (step, loss) of every line of a `metrics.jsonl`.
pub fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", metrics.display()));
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// The steps a `metrics.jsonl` holds, in file order.
pub fn steps(metrics: &Path) -> Vec<u64> {
    losses(metrics).iter().map(|l| l.0).collect()
}

/// The parameters of the newest checkpoint under `out/checkpoints`.
pub fn final_weights(out: &Path) -> Vec<f32> {
    let newest = checkpoint::list(&out.join("checkpoints")).unwrap().pop().expect("a checkpoint");
    checkpoint::load_weights(&newest.1).unwrap().params
}

/// One entry of a job's history.
#[derive(Debug)]
pub struct Change {
    pub to: String,
    pub reason: String,
    pub at_ms: i64,
}

/// The states a job went through, with their reasons and times.
pub fn history(job: &serde_json::Value) -> Vec<Change> {
    job["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Change {
            to: c["to"].as_str().unwrap().to_owned(),
            reason: c["reason"].as_str().unwrap().to_owned(),
            at_ms: c["at_unix_ms"].as_i64().unwrap_or_default(),
        })
        .collect()
}

/// Milliseconds since the Unix epoch, as the coordinator stamps its history.
pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    since.as_millis() as i64
}
