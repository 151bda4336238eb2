//! `ferrite job …` and `ferrite checkpoints …`: the operator's client of the coordinator's
//! `JobService`. Server errors print as one line, `error: <what>`, and exit with status 1.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand, ValueEnum};
use ferrite_proto::v1 as pb;
use ferrite_security::{connect, AuthChannel, Credentials};
use indicatif::{ProgressBar, ProgressStyle};
use pb::job_service_client::JobServiceClient;
use serde_json::json;
use tokio_stream::StreamExt;

use super::security::ClientSecurityArgs;

/// Where the coordinator is.
#[derive(Args)]
pub struct Connection {
    /// Coordinator URL, `http://HOST:PORT` (or `HOST:PORT`); several, comma-separated, for
    /// coordinators that elect a leader.
    #[arg(
        long,
        env = "FERRITE_COORDINATOR",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    coordinator: String,
    #[command(flatten)]
    security: ClientSecurityArgs,
}

#[derive(Args)]
pub struct JobArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Subcommand)]
enum JobCommand {
    /// Submit a job file; prints the new job's id.
    Submit {
        /// The job file (TOML), as `ferrite train` takes it. Paths in it are read on the
        /// coordinator's machine.
        file: PathBuf,
        /// Name shown in listings (default: the file's `name`).
        #[arg(long)]
        name: Option<String>,
        /// Higher runs first (default: the file's `cluster.priority`).
        #[arg(long)]
        priority: Option<i32>,
        /// Kind of worker the job needs (default: any).
        #[arg(long, value_enum)]
        device: Option<Device>,
        /// Follow the job until it finishes; exit 0 only if it succeeds.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs, oldest first.
    List {
        /// Only jobs in this state (repeatable).
        #[arg(long, value_enum)]
        state: Vec<State>,
    },
    /// Show one job.
    Status {
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a job's log: state changes, per-step metrics and checkpoints.
    Logs {
        id: String,
        /// Keep printing new events until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Draw a job's train and val loss against step, with the learning rate on a second
    /// axis, to a PNG or SVG file (from the steps the coordinator has seen).
    Plot {
        id: String,
        /// The image to write; `.png` or `.svg` chooses the format.
        #[arg(long)]
        out: PathBuf,
        /// Width in pixels.
        #[arg(long, default_value_t = 1000)]
        width: u32,
        /// Height in pixels.
        #[arg(long, default_value_t = 600)]
        height: u32,
    },
    /// Cancel a job that has not finished.
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Args)]
pub struct CheckpointsArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: CheckpointsCommand,
}

#[derive(Subcommand)]
enum CheckpointsCommand {
    /// List a job's published checkpoints, ascending by step.
    List {
        #[arg(long)]
        job: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum State {
    Queued,
    Starting,
    Running,
    Recovering,
    Succeeded,
    Failed,
    Cancelled,
}

pub fn run(args: JobArgs) -> anyhow::Result<()> {
    block_on(&args.conn, |client| job(client, args.command))
}

pub fn checkpoints(args: CheckpointsArgs) -> anyhow::Result<()> {
    block_on(&args.conn, |client| match args.command {
        CheckpointsCommand::List { job } => list_checkpoints(client, job),
    })
}

/// Runs one command against the coordinator; any failure is one line on stderr and exit 1.
fn block_on<F, Fut>(conn: &Connection, f: F) -> anyhow::Result<()>
where
    F: FnOnce(JobServiceClient<AuthChannel>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let client = connect(&conn.coordinator, &conn.security.credentials()?).await?;
        f(client).await
    });
    if let Err(e) = result {
        eprintln!("error: {}", one_line(&format!("{e:#}")));
        std::process::exit(1);
    }
    Ok(())
}

/// A client of the coordinator at `urls` (comma-separated: the one that leads; during an
/// election it waits up to 15 s for a leader).
async fn connect(urls: &str, creds: &Credentials) -> anyhow::Result<JobServiceClient<AuthChannel>> {
    let urls = connect::parse_urls(urls, creds).map_err(|e| anyhow!("{e}"))?;
    let patience = Duration::from_secs(15);
    let (_, channel) = connect::connect(&urls, connect::JOB_SERVICE, patience, creds)
        .await
        .map_err(|e| anyhow!("cannot reach the coordinator at {}: {e}", urls.join(",")))?;
    Ok(JobServiceClient::new(creds.authed(channel)))
}

/// The server's message is already worded for people (`invalid argument `x`: ...`).
pub(super) fn status_error(s: tonic::Status) -> anyhow::Error {
    if s.message().is_empty() {
        anyhow!("{}", s.code().description())
    } else {
        anyhow!("{}", s.message())
    }
}

async fn job(mut client: JobServiceClient<AuthChannel>, command: JobCommand) -> anyhow::Result<()> {
    match command {
        JobCommand::Submit { file, name, priority, device, wait } => {
            let toml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let device = match device {
                None => pb::DeviceKind::Unspecified,
                Some(Device::Cpu) => pb::DeviceKind::Cpu,
                Some(Device::Cuda) => pb::DeviceKind::Cuda,
            };
            // Workers, kind and the rest come from the file; the coordinator reads them.
            let spec = pb::JobSpec {
                toml,
                name: name.unwrap_or_default(),
                priority: priority.unwrap_or(0),
                device: device as i32,
                ..Default::default()
            };
            let req = pb::SubmitJobRequest { spec: Some(spec) };
            let job = client.submit_job(req).await.map_err(status_error)?;
            let job = job.into_inner().job.context("the coordinator returned no job")?;
            println!("{}", job.id);
            if wait {
                follow(client, job.id).await?;
            }
        }
        JobCommand::List { state } => {
            let states = state.into_iter().map(|s| proto_state(s) as i32).collect();
            let resp = client.list_jobs(pb::ListJobsRequest { states }).await;
            let jobs = resp.map_err(status_error)?.into_inner().jobs;
            println!("{:<12} {:<11} {:>7}  {:<20} REASON", "ID", "STATE", "WORKERS", "NAME");
            for j in jobs {
                let spec = j.spec.clone().unwrap_or_default();
                println!(
                    "{:<12} {:<11} {:>7}  {:<20} {}",
                    j.id,
                    state_name(j.state),
                    spec.workers,
                    spec.name,
                    j.reason
                );
            }
        }
        JobCommand::Status { id, json } => {
            let req = pb::GetJobRequest { job_id: id };
            let job = client.get_job(req).await.map_err(status_error)?.into_inner();
            let job = job.job.context("the coordinator returned no job")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job_json(&job))?);
            } else {
                print_job(&job);
            }
        }
        JobCommand::Logs { id, follow } => logs(client, id, follow).await?,
        JobCommand::Plot { id, out, width, height } => {
            super::plot::run(client, id, out, (width, height)).await?
        }
        JobCommand::Cancel { id, reason } => {
            let req = pb::CancelJobRequest { job_id: id, reason };
            let job = client.cancel_job(req).await.map_err(status_error)?.into_inner();
            let job = job.job.context("the coordinator returned no job")?;
            println!("{} {}", job.id, state_name(job.state));
        }
    }
    Ok(())
}

/// Follows a job until it ends: state changes on stderr, and a progress bar of its steps
/// when stderr is a terminal. An error unless the job succeeded.
async fn follow(mut client: JobServiceClient<AuthChannel>, id: String) -> anyhow::Result<()> {
    let req = pb::WatchJobRequest { job_id: id.clone(), include_metrics: true };
    let mut events = client.watch_job(req).await.map_err(status_error)?.into_inner();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
                .expect("valid template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut last: Option<(i32, String)> = None;
    while let Some(msg) = events.next().await {
        let (state, reason) = match msg.map_err(status_error)?.event {
            Some(pb::watch_job_response::Event::Snapshot(j)) => {
                bar.set_length(max_steps(&j));
                (j.state, j.reason)
            }
            Some(pb::watch_job_response::Event::StateChange(c)) => (c.to, c.reason),
            Some(pb::watch_job_response::Event::Metrics(m)) => {
                bar.set_position(m.step);
                bar.set_message(format!(
                    "loss {:.4} | {:.0} tok/s",
                    m.train_loss, m.tokens_per_second
                ));
                continue;
            }
            Some(pb::watch_job_response::Event::Checkpoint(_)) | None => continue,
        };
        bar.suspend(|| eprintln!("{id} {} {reason}", state_name(state)));
        last = Some((state, reason));
    }
    bar.finish_and_clear();
    match last {
        Some((s, _)) if s == pb::JobState::Succeeded as i32 => Ok(()),
        Some((s, reason)) => Err(anyhow!("job {id} {}: {reason}", state_name(s))),
        None => Err(anyhow!("the coordinator ended the watch of {id} without news")),
    }
}

/// The job file's `[train] max_steps` (0 when it cannot be read).
fn max_steps(j: &pb::Job) -> u64 {
    let toml = j.spec.as_ref().map(|s| s.toml.as_str()).unwrap_or_default();
    ferrite_model::JobSpec::parse(toml).map_or(0, |f| f.train.max_steps)
}

/// The job's history, then (with `follow`) every event until it ends. Steps are the ones
/// this coordinator has seen; the full record is `metrics.jsonl` in the job's output dir.
async fn logs(
    mut client: JobServiceClient<AuthChannel>,
    id: String,
    follow: bool,
) -> anyhow::Result<()> {
    let req = pb::WatchJobRequest { job_id: id.clone(), include_metrics: true };
    let mut events = client.watch_job(req).await.map_err(status_error)?.into_inner();
    let mut caught_up = false;
    loop {
        // Without --follow, stop once the replay of past events has gone quiet.
        let next = if follow || !caught_up {
            events.next().await
        } else {
            match tokio::time::timeout(Duration::from_millis(300), events.next()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        };
        let Some(msg) = next else { break };
        match msg.map_err(status_error)?.event {
            Some(pb::watch_job_response::Event::Snapshot(j)) => {
                for c in &j.history {
                    println!("{} {:<10} {}", time(c.at_unix_ms), state_name(c.to), c.reason);
                }
                caught_up = true;
            }
            Some(pb::watch_job_response::Event::StateChange(c)) => {
                println!("{} {:<10} {}", time(c.at_unix_ms), state_name(c.to), c.reason);
            }
            Some(pb::watch_job_response::Event::Metrics(m)) => {
                let val = m.val_loss.map_or(String::new(), |v| format!(" | val {v:.4}"));
                println!(
                    "step {:>6} | loss {:.4}{val} | lr {:.2e} | norm {:.3} | {:.1} ms | {:.0} tok/s",
                    m.step, m.train_loss, m.learning_rate, m.grad_norm, m.step_ms, m.tokens_per_second
                );
            }
            Some(pb::watch_job_response::Event::Checkpoint(c)) => {
                println!("{} checkpoint step {} {}", time(c.created_unix_ms), c.step, c.path);
            }
            None => {}
        }
    }
    Ok(())
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
fn time(unix_ms: i64) -> String {
    let ms = unix_ms.rem_euclid(86_400_000);
    let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", ms % 1000)
}

async fn list_checkpoints(
    mut client: JobServiceClient<AuthChannel>,
    id: String,
) -> anyhow::Result<()> {
    let req = pb::ListCheckpointsRequest { job_id: id };
    let resp = client.list_checkpoints(req).await.map_err(status_error)?;
    println!("{:>10}  {:>9}  PATH", "STEP", "VAL_LOSS");
    for c in resp.into_inner().checkpoints {
        let loss = c.val_loss.map_or("-".to_owned(), |l| format!("{l:.4}"));
        println!("{:>10}  {:>9}  {}", c.step, loss, c.path);
    }
    Ok(())
}

fn print_job(j: &pb::Job) {
    let spec = j.spec.clone().unwrap_or_default();
    let workers = if j.workers.is_empty() { "-".to_owned() } else { j.workers.join(", ") };
    println!("id:        {}", j.id);
    println!("name:      {}", spec.name);
    println!("state:     {}", state_name(j.state));
    println!("reason:    {}", j.reason);
    println!("kind:      {}", kind_name(spec.kind));
    println!(
        "workers:   {} (min {}), device {}, priority {}",
        spec.workers,
        spec.min_workers,
        device_name(spec.device),
        spec.priority
    );
    println!("attempt:   {}", j.attempt);
    println!("assigned:  {workers}");
    println!("history:");
    for c in &j.history {
        println!("  {:>14} -> {:<11} {}", state_name(c.from), state_name(c.to), c.reason);
    }
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    let spec = j.spec.clone().unwrap_or_default();
    let history: Vec<_> = j
        .history
        .iter()
        .map(|c| {
            let from = (c.from != 0).then(|| state_name(c.from));
            json!({
                "from": from,
                "to": state_name(c.to),
                "reason": c.reason,
                "at_unix_ms": c.at_unix_ms,
            })
        })
        .collect();
    json!({
        "id": j.id,
        "name": spec.name,
        "state": state_name(j.state),
        "reason": j.reason,
        "kind": kind_name(spec.kind),
        "workers": spec.workers,
        "min_workers": spec.min_workers,
        "priority": spec.priority,
        "device": device_name(spec.device),
        "attempt": j.attempt,
        "assigned_workers": j.workers,
        "submitted_unix_ms": j.submitted_unix_ms,
        "updated_unix_ms": j.updated_unix_ms,
        "history": history,
    })
}

/// `QUEUED`, `RUNNING`, ...; `-` for unspecified (the submission's `from`).
pub(super) fn state_name(state: i32) -> String {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Unspecified) => "-".to_owned(),
        Ok(s) => s.as_str_name().trim_start_matches("JOB_STATE_").to_owned(),
        Err(_) => format!("UNKNOWN({state})"),
    }
}

fn kind_name(kind: i32) -> &'static str {
    match pb::JobKind::try_from(kind) {
        Ok(pb::JobKind::Pretrain) => "pretrain",
        Ok(pb::JobKind::Finetune) => "finetune",
        Ok(pb::JobKind::Unspecified) | Err(_) => "unknown",
    }
}

fn device_name(device: i32) -> &'static str {
    match pb::DeviceKind::try_from(device) {
        Ok(pb::DeviceKind::Cpu) => "cpu",
        Ok(pb::DeviceKind::Cuda) => "cuda",
        Ok(pb::DeviceKind::Unspecified) => "any",
        Err(_) => "unknown",
    }
}

fn proto_state(s: State) -> pb::JobState {
    match s {
        State::Queued => pb::JobState::Queued,
        State::Starting => pb::JobState::Starting,
        State::Running => pb::JobState::Running,
        State::Recovering => pb::JobState::Recovering,
        State::Succeeded => pb::JobState::Succeeded,
        State::Failed => pb::JobState::Failed,
        State::Cancelled => pb::JobState::Cancelled,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
