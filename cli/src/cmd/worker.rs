//! `ferrite worker`: joins a coordinator and runs the training ranks it assigns.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use ferrite_kernels::cuda::Device;
use ferrite_worker::agent::{self, AgentConfig};

use super::coordinator::{init_logging, stopped_by_signal};

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator's URL.
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
}

/// Runs until SIGINT or SIGTERM. Prints `READY addr=HOST:PORT worker=ID` on stdout once
/// registered (`addr` is the collective address); logs go to stderr.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    if let Device::Cuda(i) = args.device {
        ferrite_kernels::cuda::probe(i)?;
        anyhow::bail!("cuda:{i}: CUDA workers are not supported yet; run with --device cpu");
    }
    init_logging();
    let threads =
        args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let cfg = AgentConfig {
        coordinator: args.coordinator,
        threads,
        listen: args.listen,
        advertise: args.advertise,
        hostname: hostname(),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let stop = stopped_by_signal()?;
        agent::run(
            cfg,
            |ready| {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(
                    out,
                    "READY addr={} worker={}",
                    ready.collective_addr, ready.worker_id
                );
                let _ = out.flush();
            },
            stop,
        )
        .await?;
        Ok(())
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
