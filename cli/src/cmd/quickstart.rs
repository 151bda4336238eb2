//! `ferrite quickstart`: the whole system on one machine, as local processes: a coordinator
//! on the embedded store, two CPU workers, a pretraining job followed with a progress bar,
//! then an inference server on the job's published checkpoint and a generation from it.
//!
//! Every part is this same binary started with the command an operator would type, so the
//! quickstart shows (and tests) the real thing, secured as a cluster should be: TLS with a
//! CA of its own (`DIR/certs/`), a token per role, job paths confined to `DIR`. Logs go to `DIR/logs/`. Ctrl-C stops
//! everything: the children get SIGTERM and are waited for.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ferrite_security::{certs, Role, Signer};

/// Where Debian's `fortunes` package puts its files.
const FORTUNES: &str = "/usr/share/games/fortunes";

#[derive(Args)]
pub struct QuickstartArgs {
    /// Folder for the data, checkpoints, logs and the coordinator's database.
    #[arg(long, default_value = "ferrite-quickstart")]
    dir: PathBuf,
    /// Text files to train on (default: Debian's fortunes, `apt-get install fortunes`).
    #[arg(long, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// Optimizer steps of the job.
    #[arg(long, default_value_t = 600)]
    steps: u64,
    /// CPU threads per worker (two workers run).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The generation's prompt.
    #[arg(long, default_value = "The ")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
}

pub fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    let procs = Procs::default();
    let interrupted = Arc::new(AtomicBool::new(false));
    stop_on_ctrl_c(procs.clone(), interrupted.clone())?;
    let result = quickstart(&args, &procs);
    procs.stop_all();
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted; every process of the quickstart was stopped");
    }
    result
}

fn quickstart(args: &QuickstartArgs, procs: &Procs) -> anyhow::Result<()> {
    let dir = absolute(&args.dir)?;
    let logs = dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let corpus = corpus_files(&args.corpus)?;

    step(&format!("preparing {} corpus file(s) as characters", corpus.len()));
    let data = dir.join("data");
    let mut prepare = ferrite();
    prepare.args(["data", "prepare", "--tokenizer", "char", "--val-fraction", "0.1", "--out"]);
    prepare.arg(&data).args(&corpus);
    wait_ok(procs.spawn(prepare, "data prepare")?, "data prepare")?;

    step("creating a CA, TLS certificates and tokens for this cluster (in certs/)");
    let sec = Security::create(&dir.join("certs"))?;

    step("starting a coordinator (embedded store) and two CPU workers");
    let store = format!("embedded:{}", dir.join("coordinator.redb").display());
    let out = dir.join("out");
    let mut coordinator = ferrite();
    coordinator.args(["coordinator", "--listen", "127.0.0.1:0", "--store", &store]);
    coordinator.arg("--data-root").arg(&data).arg("--checkpoint-root").arg(&dir);
    sec.server(&mut coordinator);
    let url = format!("https://{}", procs.start(coordinator, &logs.join("coordinator.log"))?);
    for n in 0..2 {
        let mut worker = ferrite();
        worker.args(["worker", "--coordinator", &url, "--listen", "127.0.0.1:0"]);
        worker.args(["--threads", &args.threads.to_string()]);
        sec.client(&mut worker, Role::Worker)?;
        procs.start(worker, &logs.join(format!("worker-{n}.log")))?;
    }

    step(&format!("training a 0.8M-parameter GPT for {} steps on both workers", args.steps));
    let job = dir.join("job.toml");
    fs::write(&job, job_file(&data, &out, args.steps))
        .with_context(|| format!("writing {}", job.display()))?;
    let mut submit = ferrite();
    submit.args(["job", "submit", "--wait", "--coordinator", &url]).arg(&job);
    sec.client(&mut submit, Role::Submit)?;
    let submitted = procs.spawn_with(submit, "job submit", Stdio::piped())?;
    let output = submitted.wait_with_output().context("waiting for the job")?;
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    print!("{printed}");
    if !output.status.success() {
        bail!("the job did not succeed; `ferrite job logs` and {} say why", logs.display());
    }
    let id = printed
        .split_whitespace()
        .find(|w| w.starts_with("job-"))
        .context("`job submit` printed no job id")?
        .to_owned();

    step("serving the newest checkpoint of the job");
    let mut serve = ferrite();
    serve.args(["serve", "--listen", "127.0.0.1:0", "--coordinator", &url, "--job", &id]);
    sec.server(&mut serve);
    sec.client(&mut serve, Role::Read)?;
    let server = format!("https://{}", procs.start(serve, &logs.join("serve.log"))?);

    step(&format!("a generation from {server}:"));
    let mut generate = ferrite();
    generate.args(["generate", "--server", &server, "--prompt", &args.prompt, "--seed", "1"]);
    generate.args(["--max-tokens", &args.max_tokens.to_string()]);
    sec.client(&mut generate, Role::Read)?;
    wait_ok(procs.spawn_with(generate, "generate", Stdio::inherit())?, "generate")?;
    println!();
    step(&format!(
        "done: job {id}, checkpoints in {}, logs in {}",
        dir.join("out/checkpoints").display(),
        logs.display()
    ));
    Ok(())
}

/// The quickstart cluster's TLS material and token key: made on the first run, reused after.
struct Security {
    dir: PathBuf,
    signer: Signer,
}

impl Security {
    fn create(dir: &Path) -> anyhow::Result<Self> {
        if !dir.join(certs::CA_CERT).exists() {
            certs::init(dir, &[], 30)?;
        }
        let signer = Signer::from_pem_file(&dir.join(certs::TOKEN_KEY))?;
        Ok(Security { dir: dir.to_owned(), signer })
    }

    /// A server's certificate and the key that checks tokens.
    fn server(&self, cmd: &mut Command) {
        cmd.arg("--tls-cert").arg(self.dir.join(certs::SERVER_CERT));
        cmd.arg("--tls-key").arg(self.dir.join(certs::SERVER_KEY));
        cmd.arg("--token-key").arg(self.dir.join(certs::TOKEN_PUB));
    }

    /// A client's trust in the CA, and a token with `role` (in the environment, where other
    /// users of the machine cannot read it from the process list).
    fn client(&self, cmd: &mut Command, role: Role) -> anyhow::Result<()> {
        let token = self.signer.issue("quickstart", role, Duration::from_secs(24 * 3600))?;
        cmd.arg("--tls-ca").arg(self.dir.join(certs::CA_CERT));
        cmd.env("FERRITE_TOKEN", token);
        Ok(())
    }
}

/// The quickstart's job: nanoGPT's Shakespeare CPU shape, on two workers.
fn job_file(data: &Path, out: &Path, steps: u64) -> String {
    format!(
        r#"name = "quickstart"
[model]
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
[data]
dir = "{data}"
[train]
batch_size = 6
max_steps = {steps}
learning_rate = 1e-3
min_lr = 1e-4
warmup_steps = {warmup}
lr_decay_steps = {steps}
weight_decay = 0.1
beta2 = 0.99
eval_interval = {eval}
eval_steps = 10
seed = 1337
[output]
dir = "{out}"
checkpoint_interval = {eval}
[cluster]
workers = 2
"#,
        data = data.display(),
        out = out.display(),
        warmup = (steps / 6).max(1),
        eval = (steps / 3).max(1),
    )
}

fn corpus_files(given: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let entries = fs::read_dir(FORTUNES).map_err(|_| {
        anyhow::anyhow!(
            "no corpus: install Debian's `fortunes` package (apt-get install fortunes) or \
             pass --corpus FILE..."
        )
    })?;
    // The fortune files proper; the .dat and .u8 files beside them are indexes.
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_none())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{FORTUNES} holds no fortune files; pass --corpus FILE...");
    }
    Ok(files)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_owned() } else { std::env::current_dir()?.join(p) })
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

fn ferrite() -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ferrite"));
    let mut cmd = Command::new(exe);
    cmd.stdin(Stdio::null());
    cmd
}

fn wait_ok(mut child: Child, what: &str) -> anyhow::Result<()> {
    let status = child.wait().with_context(|| format!("waiting for {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// The children, so that Ctrl-C and the end of the quickstart stop every one of them.
#[derive(Clone, Default)]
struct Procs(Arc<Mutex<Vec<Child>>>);

impl Procs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Child>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a short-lived command with stdout and stderr on the terminal.
    fn spawn(&self, cmd: Command, what: &str) -> anyhow::Result<Child> {
        self.spawn_with(cmd, what, Stdio::inherit())
    }

    fn spawn_with(&self, mut cmd: Command, what: &str, stdout: Stdio) -> anyhow::Result<Child> {
        cmd.stdout(stdout).spawn().with_context(|| format!("starting {what}"))
    }

    /// Starts a server, waits for its `READY addr=…` line and returns the address; its
    /// logs go to `log`.
    fn start(&self, mut cmd: Command, log: &Path) -> anyhow::Result<String> {
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting the process logging to {}", log.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        self.lock().push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        match line.trim_end().strip_prefix("READY addr=") {
            Some(rest) => Ok(rest.split_whitespace().next().unwrap_or_default().to_owned()),
            None => bail!("a process did not start; see {}", log.display()),
        }
    }

    /// SIGTERM to every server, then wait for each.
    fn stop_all(&self) {
        let mut children = self.lock();
        for child in children.iter() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        for child in children.iter_mut() {
            let _ = child.wait();
        }
        children.clear();
    }
}

/// On Ctrl-C (which the terminal also sends to the children), notes it and stops the
/// servers, so the waits in [`quickstart`] end and [`run`] reports the interruption.
fn stop_on_ctrl_c(procs: Procs, interrupted: Arc<AtomicBool>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal thread")?;
    let mut interrupt = runtime
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        })
        .context("installing the SIGINT handler")?;
    std::thread::spawn(move || {
        runtime.block_on(interrupt.recv());
        interrupted.store(true, Ordering::SeqCst);
        eprintln!("\n==> interrupted: stopping the coordinator, workers and server");
        procs.stop_all();
    });
    Ok(())
}
