//! `ferrite health`: asks a server's standard gRPC health service (`grpc.health.v1`) whether
//! it serves; exit 0 if it does. The container health check of every gRPC role.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use ferrite_security::connect;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::security::ClientSecurityArgs;

#[derive(Args)]
pub struct HealthArgs {
    /// The server, `https://HOST:PORT` or `http://HOST:PORT` (coordinator or `ferrite serve`).
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    addr: String,
    /// The service to ask about; empty for the server as a whole (a standby coordinator
    /// serves as a whole, its `ferrite.v1.JobService` only while it leads).
    #[arg(long, default_value = "")]
    service: String,
    /// Give up after this long (e.g. 3s, 500ms).
    #[arg(long, default_value = "3s", value_parser = super::coordinator::parse_duration)]
    timeout: Duration,
    /// `--tls-ca` for an https:// server (the health service itself needs no token).
    #[command(flatten)]
    client: ClientSecurityArgs,
}

pub fn run(args: HealthArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let asked = runtime.block_on(async { tokio::time::timeout(args.timeout, check(&args)).await });
    let status =
        asked.map_err(|_| anyhow!("{}: no answer within {:?}", args.addr, args.timeout))??;
    let what = if args.service.is_empty() { "the server" } else { args.service.as_str() };
    match status {
        ServingStatus::Serving => {
            println!("{}: {what} is serving", args.addr);
            Ok(())
        }
        other => bail!("{}: {what} is {}", args.addr, other.as_str_name()),
    }
}

async fn check(args: &HealthArgs) -> anyhow::Result<ServingStatus> {
    let creds = args.client.credentials()?;
    let urls = connect::parse_urls(&args.addr, &creds).map_err(|e| anyhow!("--addr: {e}"))?;
    let channel = connect::open(&urls[0], &creds)
        .await
        .map_err(|e| anyhow!("cannot reach {}: {e}", urls[0]))?;
    let req = HealthCheckRequest { service: args.service.clone() };
    let resp = HealthClient::new(channel)
        .check(req)
        .await
        .map_err(|s| anyhow!("{}: health check: {}", urls[0], s.message()))?;
    Ok(resp.into_inner().status())
}
