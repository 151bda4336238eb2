//! `ferrite serve`: the inference role. gRPC `ferrite.v1.InferenceService` (with health and
//! reflection) on `--listen`; optionally an OpenAI-compatible HTTP endpoint and Prometheus
//! metrics on a second port (`--http-listen`, served by axum).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferrite_inference::metrics::Metrics;
use ferrite_inference::rpc::coordinator::CheckpointWatch;
use ferrite_inference::{Engine, EngineConfig, ModelVersion, ServedModel};
use ferrite_model::generate::WeightDtype;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::coordinator::{init_logging, stopped_by_signal, LogFormat};
use super::security::{ClientSecurityArgs, ServerSecurityArgs};

#[derive(Args)]
#[command(after_help = "Prints `READY addr=HOST:PORT` (then ` http=HOST:PORT` with \
--http-listen) on stdout once serving. The HTTP port (axum) answers POST /v1/completions \
(OpenAI's completions API; \"stream\": true for server-sent events) and GET /metrics \
(Prometheus).")]
pub struct ServeArgs {
    /// gRPC address; port 0 picks a free one (the READY line names it).
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: String,
    /// HTTP address for /v1/completions and /metrics (a second port); off when absent.
    #[arg(long)]
    http_listen: Option<String>,
    /// Serve this checkpoint folder.
    #[arg(long, required_unless_present = "coordinator", conflicts_with = "coordinator")]
    checkpoint: Option<PathBuf>,
    /// Serve the newest checkpoint a job published on this coordinator, switching to newer
    /// ones as they are published; several URLs, comma-separated, when coordinators elect a
    /// leader (the leader is followed across failovers).
    #[arg(long, requires = "job")]
    coordinator: Option<String>,
    /// The job whose checkpoints to serve (with --coordinator).
    #[arg(long, requires = "coordinator")]
    job: Option<String>,
    /// How often to ask the coordinator for a newer checkpoint, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    poll_ms: u64,
    /// Most sequences decoded together in one step.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most requests waiting for a slot; more are refused with ResourceExhausted.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Memory for all running sequences' KV caches, in MiB.
    #[arg(long, default_value_t = 2048)]
    kv_cache_mb: usize,
    /// Most prompt tokens prefilled per step (chunked prefill).
    #[arg(long, default_value_t = 64)]
    prefill_chunk: usize,
    /// Decode threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Number format of the weight matrices in memory: f32 (the checkpoint's values), f16
    /// (rounded once; half the memory, and decoding, which reads every weight per token, up
    /// to twice as fast; arithmetic in f32), or bf16 (f16's bytes, with the linear layers'
    /// inputs rounded to bf16 too, on AMX tiles: needs AMX-BF16).
    #[arg(long, default_value = "f32")]
    dtype: WeightDtype,
    /// TLS and tokens of this server (gRPC and HTTP).
    #[command(flatten)]
    security: ServerSecurityArgs,
    /// What this server presents to the coordinator (with --coordinator): `--tls-ca` and a
    /// token with role read.
    #[command(flatten)]
    client: ClientSecurityArgs,
    /// How logs are written to stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let stop = stopped_by_signal()?;
    let security = a.security.load()?;
    security.announce("inference server");
    let cfg = EngineConfig {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        kv_cache_bytes: a.kv_cache_mb << 20,
        prefill_chunk: a.prefill_chunk,
        threads: a.threads,
        dtype: a.dtype,
    };
    let mut watch_job = None;
    let first = match (&a.checkpoint, &a.coordinator, &a.job) {
        (Some(dir), _, _) => {
            let v =
                ModelVersion { job_id: String::new(), step: 0, path: dir.display().to_string() };
            let d = dir.clone();
            let dtype = a.dtype;
            let m = tokio::task::spawn_blocking(move || ServedModel::load(&d, v, dtype))
                .await?
                .with_context(|| format!("loading {}", dir.display()))?;
            Some(Arc::new(m))
        }
        (None, Some(url), Some(job)) => {
            let creds = a.client.credentials()?;
            watch_job = Some(CheckpointWatch::connect(url, job, creds).await?);
            None
        }
        _ => anyhow::bail!("give --checkpoint DIR, or --coordinator URL with --job ID"),
    };
    let engine = Engine::start(cfg, first, Arc::new(Metrics::default()))?;
    let handle = engine.handle();
    if let Some(mut w) = watch_job {
        // The newest checkpoint now, if any; requests before one exists get NotFound.
        if let Err(e) = w.refresh(&handle).await {
            tracing::warn!(error = %e, "no checkpoint to serve yet");
        }
        tokio::spawn(w.follow(handle.clone(), Duration::from_millis(a.poll_ms.max(10))));
    }
    let grpc =
        TcpListener::bind(&a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
    let http = match &a.http_listen {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?)
        }
        None => None,
    };
    let mut ready = format!("READY addr={}", grpc.local_addr()?);
    if let Some(h) = &http {
        ready.push_str(&format!(" http={}", h.local_addr()?));
    }
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{ready}")?;
        stdout.flush()?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let http_task = http.map(|l| {
        let (h, s, sec) = (handle.clone(), stopped(stop_rx.clone()), security.clone());
        tokio::spawn(async move { ferrite_inference::http::run(l, h, sec, s).await })
    });
    let grpc_task =
        tokio::spawn(ferrite_inference::rpc::run(grpc, handle, security, stopped(stop_rx)));
    stop.await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    // Ends running and queued requests (ShuttingDown), so open streams let the servers stop.
    drop(engine);
    grpc_task.await??;
    if let Some(t) = http_task {
        t.await??;
    }
    Ok(())
}
