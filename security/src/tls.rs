//! TLS from PEM files: for tonic servers and channels, and (as a rustls config) for the HTTP
//! endpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{Error, Result};

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::file(path, e))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::file(path, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::file(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(&read(path)?)
        .map_err(|e| Error::file(path, format!("not a PEM private key: {e}")))
}

/// A server's certificate and key, and for mutual TLS the CA its clients' certificates must
/// be signed by.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// From `--tls-cert`, `--tls-key` and `--tls-client-ca`: both or neither of the first two.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<Self>> {
        match (cert, key) {
            (Some(cert), Some(key)) => {
                let tls = ServerTls { cert, key, client_ca };
                tls.rustls()?; // fail at start, naming the file, not at the first handshake
                Ok(Some(tls))
            }
            (None, None) if client_ca.is_none() => Ok(None),
            (None, None) => {
                Err(Error::Config("--tls-client-ca needs --tls-cert and --tls-key".into()))
            }
            _ => Err(Error::Config("--tls-cert and --tls-key go together".into())),
        }
    }

    /// For a tonic server.
    pub fn tonic(&self) -> Result<ServerTlsConfig> {
        let identity = Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(config)
    }

    /// For the HTTP endpoints (HTTP/1.1 and HTTP/2 by ALPN).
    pub fn rustls(&self) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca)? {
                    roots.add(c).map_err(|e| Error::file(ca, e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| Error::file(ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder.with_single_cert(certs(&self.cert)?, key(&self.key)?).map_err(|e| {
                Error::file(&self.key, format!("does not match {}: {e}", self.cert.display()))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// What a client trusts (the cluster's CA) and, for mutual TLS, its own certificate.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// From `--tls-ca`, `--tls-cert` and `--tls-key`.
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Self> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(Error::Config("--tls-cert and --tls-key go together".into())),
        };
        Ok(ClientTls { ca, identity })
    }

    /// For a tonic channel to an `https://` URL.
    pub fn tonic(&self) -> Result<ClientTlsConfig> {
        let Some(ca) = &self.ca else {
            return Err(Error::Config(
                "an https:// URL needs the cluster's CA certificate: give --tls-ca \
                 (or FERRITE_TLS_CA)"
                    .into(),
            ));
        };
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(config)
    }
}
