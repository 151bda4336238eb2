//! Finding the leading coordinator among several (`--coordinator URL1,URL2`).
//!
//! Coordinators on etcd elect one leader; a standby answers every call with `Unavailable`
//! and its health service says NOT_SERVING. A client given several URLs asks each one's
//! health service for the API it needs and talks to the one that serves it. With one URL
//! there is nothing to choose (it may be a load balancer that routes to the leader).
//!
//! Every connection goes through [`Credentials`]: TLS for `https://` URLs, and errors that
//! look like a TLS mismatch come with a hint.

use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use crate::client::{speaks_tls, tls_hint, WANTS_TLS};
use crate::Credentials;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The gRPC service an operator's CLI needs.
pub const JOB_SERVICE: &str = "ferrite.v1.JobService";
/// The gRPC service a worker needs.
pub const WORKER_SERVICE: &str = "ferrite.v1.WorkerService";

/// Splits `https://a:1,https://b:2`; a bare `HOST:PORT` gets `https://` when the client has
/// a CA to trust (`--tls-ca`), else `http://`.
pub fn parse_urls(list: &str, creds: &Credentials) -> Result<Vec<String>, String> {
    let scheme = if creds.tls.ca.is_some() { "https" } else { "http" };
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| if u.contains("://") { u.to_owned() } else { format!("{scheme}://{u}") })
        .collect();
    if urls.is_empty() {
        return Err("no coordinator URL given".into());
    }
    for u in &urls {
        Endpoint::from_shared(u.clone())
            .map_err(|_| format!("`{u}` is not a coordinator URL (https://HOST:PORT)"))?;
    }
    Ok(urls)
}

/// A channel to the coordinator that serves `service`, trying every URL until `patience`
/// has passed (an election may be under way). With one URL, a channel to it.
pub async fn connect(
    urls: &[String],
    service: &str,
    patience: Duration,
    creds: &Credentials,
) -> Result<(String, Channel), String> {
    if let [url] = urls {
        // One round trip now, so a TLS mismatch or a refused client certificate is reported
        // here, with a hint, rather than as a bare protocol error on the first call.
        let channel = open(url, creds).await?;
        let req = HealthCheckRequest { service: String::new() };
        match HealthClient::new(channel.clone()).check(req).await {
            // A server without the health service still answered: the connection works.
            Err(s) if s.code() != tonic::Code::Unimplemented => {
                return Err(with_hint(url, format!("health check: {}", s.message())).await);
            }
            _ => return Ok((url.clone(), channel)),
        }
    }
    let deadline = Instant::now() + patience;
    loop {
        let mut why = Vec::new();
        for url in urls {
            match serves(url, service, creds).await {
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

/// A connected channel to `url`, or why not (with a hint when it looks like TLS on one side
/// only).
pub async fn open(url: &str, creds: &Credentials) -> Result<Channel, String> {
    let endpoint: Endpoint = creds.endpoint(url).map_err(|e| e.to_string())?;
    match endpoint.connect().await {
        Ok(channel) => Ok(channel),
        Err(e) => Err(with_hint(url, describe(&e)).await),
    }
}

/// A channel to `url` that connects on first use (and reconnects while it is down).
pub fn open_lazy(url: &str, creds: &Credentials) -> Result<Channel, String> {
    Ok(creds.endpoint(url).map_err(|e| e.to_string())?.connect_lazy())
}

/// `why`, and a hint when it looks like a TLS mismatch: for `http://` URLs (one or a
/// comma-separated list) the server is asked whether it speaks TLS ([`speaks_tls`]), for
/// `https://` ones the error's wording says.
pub async fn with_hint(urls: &str, why: String) -> String {
    for url in urls.split(',').map(str::trim) {
        if speaks_tls(url).await {
            return format!("{why} ({WANTS_TLS})");
        }
        if let Some(hint) = tls_hint(url, &why) {
            return format!("{why} ({hint})");
        }
    }
    why
}

/// A channel to `url` if its health service says it serves `service`.
async fn serves(url: &str, service: &str, creds: &Credentials) -> Result<Channel, String> {
    let channel = open(url, creds).await?;
    let req = HealthCheckRequest { service: service.to_owned() };
    let resp = match HealthClient::new(channel.clone()).check(req).await {
        Ok(resp) => resp,
        Err(s) => return Err(with_hint(url, format!("health check: {}", s.message())).await),
    };
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
        let plain = Credentials::none();
        assert_eq!(
            parse_urls("http://a:1, b:2", &plain).unwrap(),
            vec!["http://a:1".to_owned(), "http://b:2".to_owned()]
        );
        let tls = crate::ClientTls { ca: Some("ca.pem".into()), identity: None };
        let trusting = Credentials::new(tls, None, None).unwrap();
        assert_eq!(parse_urls("b:2", &trusting).unwrap(), vec!["https://b:2".to_owned()]);
        assert!(parse_urls(" , ", &plain).is_err());
        assert!(parse_urls("http://a:1,not a url", &plain).unwrap_err().contains("not a url"));
    }
}
