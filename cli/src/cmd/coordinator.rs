//! `ferrite coordinator`: the control plane's gRPC server (jobs API, health, reflection).

use std::io::Write;

use anyhow::Context;
use clap::Args;
use ferrite_coordinator::server::{self, Deps, StoreSpec};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on; port 0 picks a free one (the READY line names it).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// `embedded:PATH` (a database file, created if absent) or
    /// `etcd:http://HOST:PORT[,http://HOST:PORT...]`.
    #[arg(long, default_value = "embedded:./ferrite-coordinator.redb")]
    store: StoreSpec,
}

/// Serves until SIGINT or SIGTERM. Prints `READY addr=HOST:PORT` on stdout once listening;
/// logs go to stderr.
pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: CoordinatorArgs) -> anyhow::Result<()> {
    // Installed before READY, so a signal sent right after it is never missed.
    let interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let store =
        args.store.open().await.with_context(|| format!("opening the store {:?}", args.store))?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "READY addr={addr}")?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!(%addr, store = ?args.store, "coordinator serving");
    server::run(listener, Deps::new(store), stopped_by(interrupt, terminate)).await?;
    tracing::info!("coordinator stopped");
    Ok(())
}

async fn stopped_by(mut interrupt: Signal, mut terminate: Signal) {
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    tracing::info!(signal = name, "stopping");
}
