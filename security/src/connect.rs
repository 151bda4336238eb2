//! Finding the leading coordinator among several (`--coordinator URL1,URL2`).
//!
//! Coordinators on etcd elect one leader; a standby answers every call with `Unavailable`
//! and its health service says NOT_SERVING. A client given several URLs asks each one's
//! health service for the API it needs and talks to the one that serves it. With one URL
//! there is nothing to choose (it may be a load balancer that routes to the leader).

use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The gRPC service an operator's CLI needs.
pub const JOB_SERVICE: &str = "ferrite.v1.JobService";
/// The gRPC service a worker needs.
pub const WORKER_SERVICE: &str = "ferrite.v1.WorkerService";

/// Splits `http://a:1,http://b:2` (a scheme is added where missing).
pub fn parse_urls(list: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| if u.contains("://") { u.to_owned() } else { format!("http://{u}") })
        .collect();
    if urls.is_empty() {
        return Err("no coordinator URL given".into());
    }
    for u in &urls {
        Endpoint::from_shared(u.clone())
            .map_err(|_| format!("`{u}` is not a coordinator URL (http://HOST:PORT)"))?;
    }
    Ok(urls)
}

/// A channel to the coordinator that serves `service`, trying every URL until `patience`
/// has passed (an election may be under way). With one URL, a channel to it.
pub async fn connect(
    urls: &[String],
    service: &str,
    patience: Duration,
) -> Result<(String, Channel), String> {
    if let [url] = urls {
        return Ok((url.clone(), open(url).await?));
    }
    let deadline = Instant::now() + patience;
    loop {
        let mut why = Vec::new();
        for url in urls {
            match serves(url, service).await {
                Ok(channel) => return Ok((url.clone(), channel)),
                Err(e) => why.push(format!("{url}: {e}")),
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no coordinator leads ({})", why.join("; ")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn open(url: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| format!("`{url}` is not a coordinator URL (http://HOST:PORT)"))?
        .connect_timeout(Duration::from_secs(5));
    endpoint.connect().await.map_err(|e| describe(&e))
}

/// A channel to `url` if its health service says it serves `service`.
async fn serves(url: &str, service: &str) -> Result<Channel, String> {
    let channel = open(url).await?;
    let req = HealthCheckRequest { service: service.to_owned() };
    let resp = HealthClient::new(channel.clone())
        .check(req)
        .await
        .map_err(|s| format!("health check: {}", s.message()))?;
    match resp.into_inner().status() {
        ServingStatus::Serving => Ok(channel),
        _ => Err("standby (not the leader)".into()),
    }
}

/// An error and its causes on one line (hyper repeats its message one level down).
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !why.ends_with(&text) {
            why = format!("{why}: {text}");
        }
        source = s.source();
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_lists_parse() {
        assert_eq!(
            parse_urls("http://a:1, b:2").unwrap(),
            vec!["http://a:1".to_owned(), "http://b:2".to_owned()]
        );
        assert!(parse_urls(" , ").is_err());
        assert!(parse_urls("http://a:1,not a url").unwrap_err().contains("not a url"));
    }
}
