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

/// The hint for a plain-text client whose server speaks TLS.
pub const WANTS_TLS: &str = "the server requires TLS: use an https:// URL and --tls-ca";

/// A hint for a connection error that looks like a TLS mismatch, for errors the server's
/// own TLS stack named (an `https://` client meeting plain text or an unknown CA). A
/// plain-text client meeting TLS sees only a dropped connection, worded differently with
/// timing: [`speaks_tls`] asks the server instead.
pub fn tls_hint(url: &str, error: &str) -> Option<&'static str> {
    let e = error.to_ascii_lowercase();
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

/// Whether the server of an `http://` URL answers a TLS handshake: it sends a certificate
/// (which this probe, trusting no CA, refuses without sending anything else). A plain-text
/// server, an unreachable one or one that does not answer within a second: no.
pub async fn speaks_tls(url: &str) -> bool {
    use tokio_rustls::rustls;
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let probe = async {
        let name = rustls::pki_types::ServerName::try_from(host).ok()?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(authority).await.ok()?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let err = connector.connect(name, tcp).await.err()?;
        let cause = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        Some(matches!(cause, Some(rustls::Error::InvalidCertificate(_))))
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::{speaks_tls, tls_hint};

    #[test]
    fn hints_name_the_likely_mismatch() {
        let tls = tls_hint("https://h:1", "received corrupt message of type InvalidContentType");
        assert!(tls.unwrap().contains("plain text"));
        let ca = tls_hint("https://h:1", "invalid peer certificate: UnknownIssuer").unwrap();
        assert!(ca.contains("--tls-ca"));
        assert_eq!(tls_hint("http://h:1", "no route to host"), None);
    }

    #[tokio::test]
    async fn the_probe_tells_a_tls_server_from_a_plain_one() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::init(dir.path(), &[], 1).unwrap();
        let tls = crate::ServerTls {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: None,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.rustls().unwrap());
        let secure = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (s, p) = (secure.local_addr().unwrap(), plain.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = secure.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            // Like an h2 server: reads the (unexpected) bytes, answers in its own framing.
            while let Ok((mut tcp, _)) = plain.accept().await {
                let mut buf = [0u8; 512];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(&[0, 0, 8, 7, 0, 0, 0, 0, 0]).await;
            }
        });
        assert!(speaks_tls(&format!("http://{s}")).await);
        assert!(speaks_tls(&format!("http://localhost:{}", s.port())).await);
        assert!(!speaks_tls(&format!("http://{p}")).await);
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        assert!(!speaks_tls(&format!("http://{gone}")).await);
        assert!(!speaks_tls(&format!("https://{s}")).await, "only plain-text URLs are probed");
    }
}
