//! `ferrite worker`: joins a coordinator and runs the training ranks it assigns.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ferrite_kernels::cuda::Device;
use ferrite_worker::agent::{self, AgentConfig};
use ferrite_worker::metrics::{self, WorkerMetrics};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::coordinator::{init_logging, stopped_by_signal, until_set, LogFormat};
use super::security::{ClientSecurityArgs, ServerSecurityArgs};

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator's URL; several, comma-separated, when coordinators elect a leader.
    #[arg(long, env = "FERRITE_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// CPU threads for the training step (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the collective (TCP ring between ranks) listens; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// HOST:PORT that peers dial to reach the collective listener (needed when --listen is
    /// a wildcard address such as 0.0.0.0).
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP address for /metrics (Prometheus: step time, tokens/s, all-reduce, checkpoints);
    /// off when absent. The READY line then ends with ` http=HOST:PORT`.
    #[arg(long)]
    http_listen: Option<String>,
    /// What the worker presents to the coordinator: `--tls-ca` and a worker join token
    /// (`ferrite token create --role worker`).
    #[command(flatten)]
    client: ClientSecurityArgs,
    /// TLS and tokens of the /metrics endpoint (with --http-listen).
    #[command(flatten)]
    http_security: ServerSecurityArgs,
    /// How logs are written to stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// Runs until SIGINT or SIGTERM. Prints `READY addr=HOST:PORT worker=ID` (then
/// ` http=HOST:PORT` with --http-listen) on stdout once registered (`addr` is the
/// collective address); logs go to stderr.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    // Fail at start, in one line, on a machine (or a build) that cannot use the device.
    if let Device::Cuda(i) = args.device {
        ferrite_kernels::cuda::probe(i)?;
    }
    init_logging(args.log_format);
    let threads =
        args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let credentials = args.client.credentials()?;
    let http_security = match &args.http_listen {
        Some(_) => {
            let s = args.http_security.load()?;
            s.announce("worker /metrics");
            Some(s)
        }
        None => None,
    };
    let cfg = AgentConfig {
        credentials,
        coordinator: args.coordinator,
        threads,
        listen: args.listen,
        advertise: args.advertise,
        hostname: hostname(),
        device: args.device,
        metrics: Arc::new(WorkerMetrics::default()),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let stop = stopped_by_signal()?;
        let http = match &args.http_listen {
            Some(a) => {
                Some(TcpListener::bind(a).await.with_context(|| format!("listening on {a}"))?)
            }
            None => None,
        };
        let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
        let (stop_tx, stopping) = watch::channel(false);
        let http_task = http.zip(http_security).map(|(l, security)| {
            tokio::spawn(metrics::serve(l, cfg.metrics.clone(), security, until_set(stopping)))
        });
        let stop = async move {
            stop.await;
            let _ = stop_tx.send(true);
        };
        agent::run(
            cfg,
            |ready| {
                let mut line =
                    format!("READY addr={} worker={}", ready.collective_addr, ready.worker_id);
                if let Some(h) = http_addr {
                    line.push_str(&format!(" http={h}"));
                }
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            },
            stop,
        )
        .await?;
        if let Some(task) = http_task {
            task.await?.context("serving /metrics")?;
        }
        tracing::info!("worker stopped");
        Ok(())
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
