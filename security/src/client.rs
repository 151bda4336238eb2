//! What a client presents: TLS trust for `https://` URLs and a bearer token on every call.

use std::path::Path;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::{ClientTls, Error, Result};

/// A channel whose every call carries the client's token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// TLS trust and token of one client (CLI, worker, inference's coordinator watch). Its
/// `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct Credentials {
    pub tls: ClientTls,
    token: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    /// No TLS trust, no token: for `http://` URLs of `--insecure` servers.
    pub fn none() -> Self {
        Credentials::default()
    }

    /// `token` as given (`--token`), or read from `token_file` (`--token-file`).
    pub fn new(tls: ClientTls, token: Option<String>, token_file: Option<&Path>) -> Result<Self> {
        let token = match (token, token_file) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?.trim().to_owned(),
            ),
            (None, None) => None,
        };
        let token =
            match token.filter(|t| !t.is_empty()) {
                Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                    Error::Config("the token holds characters a header cannot".into())
                })?),
                None => None,
            };
        Ok(Credentials { tls, token })
    }

    /// An endpoint for `url`: TLS when it is `https://`.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let bad = || Error::Config(format!("`{url}` is not a URL (https://HOST:PORT)"));
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|_| bad())?
            .connect_timeout(Duration::from_secs(5));
        if url.starts_with("https://") {
            let tls = self.tls.tonic()?;
            return endpoint.tls_config(tls).map_err(|e| Error::Config(format!("{url}: {e}")));
        }
        Ok(endpoint)
    }

    /// `channel` with this client's token on every call.
    pub fn authed(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, Bearer(self.token.clone()))
    }

    /// The `authorization` header value, for HTTP clients.
    pub fn authorization(&self) -> Option<&str> {
        self.token.as_ref().and_then(|t| t.to_str().ok())
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<token>"))
            .finish()
    }
}

/// Adds `authorization: Bearer TOKEN` to each call (nothing without a token).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            req.metadata_mut().insert("authorization", token.clone());
        }
        Ok(req)
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(<token>)" } else { "Bearer(none)" })
    }
}

/// A hint for a connection error that looks like a TLS mismatch.
pub fn tls_hint(url: &str, error: &str) -> Option<&'static str> {
    let e = error.to_ascii_lowercase();
    // A TLS server drops a plain-text client; how the client sees it varies with timing.
    let dropped = ["frame", "connection reset", "protocol", "closed", "broken pipe", "canceled"];
    if url.starts_with("http://") && dropped.iter().any(|m| e.contains(m)) {
        return Some("the server may require TLS: use an https:// URL and --tls-ca");
    }
    if url.starts_with("https://")
        && (e.contains("corrupt")
            || e.contains("invalidcontenttype")
            || e.contains("invalid content type")
            || e.contains("wrong version"))
    {
        return Some("the server speaks plain text (started with --insecure?): use http://");
    }
    if url.starts_with("https://")
        && ["canceled", "certificate required", "alert", "transport error"]
            .iter()
            .any(|m| e.contains(m))
    {
        return Some(
            "the server may want a client certificate signed by its CA (--client-cert, \
             --client-key)",
        );
    }
    if e.contains("unknownissuer") || e.contains("unknown issuer") || e.contains("certificate") {
        return Some("the server's certificate is not signed by the CA given with --tls-ca");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::tls_hint;

    #[test]
    fn hints_name_the_likely_mismatch() {
        let plain = tls_hint("http://h:1", "health check: operation was canceled").unwrap();
        assert!(plain.contains("https://"));
        let tls = tls_hint("https://h:1", "received corrupt message of type InvalidContentType");
        assert!(tls.unwrap().contains("plain text"));
        let ca = tls_hint("https://h:1", "invalid peer certificate: UnknownIssuer").unwrap();
        assert!(ca.contains("--tls-ca"));
        assert_eq!(tls_hint("http://h:1", "no route to host"), None);
    }
}
