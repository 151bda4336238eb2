//! `ferrite coordinator`: the control plane's gRPC server (jobs API, health, reflection),
//! and with `--http-listen` its HTTP edge (Prometheus `/metrics`, JSON `/api`, the `/ui`
//! dashboard).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ferrite_coordinator::http::{self, HttpConfig};
use ferrite_coordinator::leader;
use ferrite_coordinator::server::{self, Deps, PathRoots, StoreSpec};
use ferrite_coordinator::store::EtcdAccess;
use ferrite_coordinator::EtcdStore;
use ferrite_security::ClientTls;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use super::security::ServerSecurityArgs;

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
    /// The URL clients and workers reach this coordinator at, announced when it leads
    /// (coordinators on etcd elect a leader); default `https://` (`http://` without TLS) +
    /// the bound address.
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP address for /metrics (Prometheus), /api (JSON) and /ui (the dashboard); off
    /// when absent. The READY line then ends with ` http=HOST:PORT`.
    #[arg(long)]
    http_listen: Option<String>,
    /// One worker's peak TFLOP/s, the denominator of the MFU in /metrics (the default is
    /// about the f32 matmul peak of two Zen 5 cores).
    #[arg(long, default_value_t = http::DEFAULT_PEAK_FLOPS / 1e12)]
    peak_tflops: f64,
    /// Submitted jobs' `[data] dir` must lie under this folder (repeatable); any when absent.
    #[arg(long = "data-root")]
    data_roots: Vec<PathBuf>,
    /// Submitted jobs' `[output] dir`, `init_from` and `resume` must lie under this folder
    /// (repeatable); any when absent.
    #[arg(long = "checkpoint-root")]
    checkpoint_roots: Vec<PathBuf>,
    #[command(flatten)]
    security: ServerSecurityArgs,
    /// etcd's CA certificate, for https:// etcd endpoints.
    #[arg(long, env = "FERRITE_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd (`--client-cert-auth` on the etcd side).
    #[arg(long, env = "FERRITE_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "FERRITE_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user (etcd's own authentication).
    #[arg(long, env = "FERRITE_ETCD_USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// A file holding that user's password.
    #[arg(long, env = "FERRITE_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// How logs are written to stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// How logs are written to stderr (`--log-format`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event, with the fields of every enclosing span.
    Json,
}

/// Serves until SIGINT or SIGTERM. Prints `READY addr=HOST:PORT` (then ` http=HOST:PORT`
/// with --http-listen) on stdout once listening; logs go to stderr.
pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init()
        }
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).init(),
    }
}

/// Completes once `stop` holds `true`: one signal shared by several servers.
pub async fn until_set(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
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
    let security = args.security.load()?;
    security.announce("coordinator");
    for root in args.data_roots.iter().chain(&args.checkpoint_roots) {
        anyhow::ensure!(root.is_dir(), "root {} is not a directory", root.display());
    }
    let access = etcd_access(&args)?;
    let store = args
        .store
        .open(&access)
        .await
        .with_context(|| format!("opening the store {:?}", args.store))?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let http_listener = match &args.http_listen {
        Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("listening on {a}"))?),
        None => None,
    };
    let mut ready = format!("READY addr={addr}");
    if let Some(h) = &http_listener {
        ready.push_str(&format!(" http={}", h.local_addr()?));
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{ready}")?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!(%addr, store = ?args.store, "coordinator serving");
    let roots =
        PathRoots { data: args.data_roots.clone(), checkpoints: args.checkpoint_roots.clone() };
    let mut deps = Deps::with_heartbeat_timeout(store, args.heartbeat_timeout).with_roots(roots);
    // On etcd several coordinators may run: they elect one leader, the others stand by.
    let campaign = match &args.store {
        StoreSpec::Etcd(endpoints) => {
            let scheme = if security.tls.is_some() { "https" } else { "http" };
            let me = args.advertise.clone().unwrap_or_else(|| format!("{scheme}://{addr}"));
            let ttl = (args.heartbeat_timeout / 2).max(Duration::from_secs(2));
            let ns = EtcdStore::DEFAULT_NAMESPACE;
            let (role, campaign) = leader::campaign(endpoints, ns, me, ttl, &access)
                .await
                .context("joining the leader election in etcd")?;
            deps = deps.with_role(role);
            Some(campaign)
        }
        StoreSpec::Embedded(_) => None,
    };
    let (stop_tx, stopping) = watch::channel(false);
    let http_task = http_listener.map(|l| {
        let cfg = HttpConfig { peak_flops_per_worker: args.peak_tflops * 1e12 };
        tokio::spawn(http::run(l, deps.clone(), cfg, security.clone(), until_set(stopping)))
    });
    let stop = async move {
        stop.await;
        let _ = stop_tx.send(true);
    };
    let serve = server::run(listener, deps, security, stop);
    match campaign {
        Some(campaign) => tokio::select! {
            served = serve => served?,
            lost = campaign => anyhow::bail!("left the leader election: {lost}"),
        },
        None => serve.await?,
    }
    if let Some(task) = http_task {
        task.await??;
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// The etcd flags: TLS when a CA or client certificate is given, a user when named.
fn etcd_access(args: &CoordinatorArgs) -> anyhow::Result<EtcdAccess> {
    let tls = match (&args.etcd_ca, &args.etcd_cert, &args.etcd_key) {
        (None, None, None) => None,
        (ca, cert, key) => Some(ClientTls::from_flags(ca.clone(), cert.clone(), key.clone())?),
    };
    let user = match (&args.etcd_user, &args.etcd_password_file) {
        (Some(user), Some(file)) => {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("reading the etcd password from {}", file.display()))?;
            Some((user.clone(), password.trim_end_matches(['\n', '\r']).to_owned()))
        }
        _ => None,
    };
    Ok(EtcdAccess { tls, user })
}

async fn stopped_by(mut interrupt: Signal, mut terminate: Signal) {
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    tracing::info!(signal = name, "stopping");
}

/// `250ms`, `5s` or `2m`; at least 100 ms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
