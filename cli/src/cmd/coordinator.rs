//! `ferrite coordinator`: the control plane's gRPC server (jobs API, health, reflection).

use std::io::Write;
use std::time::Duration;

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
    /// A worker silent this long is dropped and its job recovers (e.g. 5s, 1500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,
}

/// Serves until SIGINT or SIGTERM. Prints `READY addr=HOST:PORT` on stdout once listening;
/// logs go to stderr.
pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    init_logging();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Completes on SIGINT or SIGTERM. Install it before printing READY, so a signal sent right
/// after it is never missed.
pub fn stopped_by_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(stopped_by(interrupt, terminate))
}

async fn serve(args: CoordinatorArgs) -> anyhow::Result<()> {
    let stop = stopped_by_signal()?;
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
    let deps = Deps::with_heartbeat_timeout(store, args.heartbeat_timeout);
    server::run(listener, deps, stop).await?;
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

/// `250ms`, `5s` or `2m`; at least 100 ms.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("`{s}`: expected a number with ms, s or m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("`{s}`: the unit must be ms, s or m")),
    };
    if d < Duration::from_millis(100) {
        return Err(format!("`{s}` is too short; at least 100ms"));
    }
    Ok(d)
}
