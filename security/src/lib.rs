//! Security shared by every Ferrite role: TLS material, signed tokens, and the policy that
//! says which token may call what.
//!
//! - [`certs`] — `ferrite certs init DIR`: a CA, a server and a client certificate, and the
//!   token signing key pair, for a test cluster.
//! - [`token`] — operator and worker tokens: Ed25519-signed JWTs carrying a [`Role`] and an
//!   expiry. Servers hold only the public key.
//! - [`policy`] — what each RPC and HTTP route needs, and which roles grant it.
//! - [`layer`] — the tower layer in front of every gRPC server that enforces the policy and
//!   logs each denial with its caller.
//! - [`tls`] — server and client TLS from PEM files, for tonic and for the HTTP endpoints.
//! - [`client`] — what a client presents: TLS trust and a bearer token.
//! - [`connect`] — reaching a server, and the leading coordinator among several URLs.
//! - [`http`] — serving an axum router over TLS with the same tokens.
//!
//! Secure by default: a server starts only with a certificate and a token key, or with
//! `--insecure`, which it announces loudly (see [`ServerSecurity::announce`]).

pub mod certs;
pub mod client;
pub mod connect;
pub mod http;
pub mod layer;
pub mod policy;
pub mod tls;
pub mod token;

use std::path::PathBuf;
use std::sync::Arc;

pub use client::{AuthChannel, Credentials};
pub use layer::AuthLayer;
pub use policy::Access;
pub use tls::{ClientTls, ServerTls};
pub use token::{Claims, Role, Signer, TokenError, Verifier};

/// A problem with security material on disk or on the command line, named.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{0}")]
    Config(String),
}

impl Error {
    pub(crate) fn file(path: &std::path::Path, why: impl std::fmt::Display) -> Self {
        Error::File { path: path.to_owned(), why: why.to_string() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How one server protects itself: TLS (or none, with `--insecure`) and a token verifier (or
/// none, with `--insecure`).
#[derive(Clone)]
pub struct ServerSecurity {
    pub tls: Option<ServerTls>,
    pub verifier: Option<Arc<Verifier>>,
}

impl ServerSecurity {
    /// Plain text, no tokens: for tests and local experiments only.
    pub fn insecure() -> Self {
        ServerSecurity { tls: None, verifier: None }
    }

    /// From the command line's flags. Without `insecure`, both a certificate and a token key
    /// are required; with it, either may still be given.
    pub fn from_flags(
        tls: Option<ServerTls>,
        token_key: Option<PathBuf>,
        insecure: bool,
    ) -> Result<Self> {
        if !insecure {
            if tls.is_none() {
                return Err(Error::Config(
                    "no TLS certificate: give --tls-cert and --tls-key (`ferrite certs init DIR` \
                     makes a set for a test cluster), or --insecure to serve plain text"
                        .into(),
                ));
            }
            if token_key.is_none() {
                return Err(Error::Config(
                    "no token key: give --token-key (the token.pub of `ferrite certs init`), or \
                     --insecure to accept calls without tokens"
                        .into(),
                ));
            }
        }
        let verifier = match token_key {
            Some(path) => Some(Arc::new(Verifier::from_pem_file(&path)?)),
            None => None,
        };
        Ok(ServerSecurity { tls, verifier })
    }

    /// Logs what the server accepts; a server without TLS or tokens says so at warning level
    /// on every start (in the chosen log format), so nobody runs one by accident.
    pub fn announce(&self, server: &str) {
        match (&self.tls, &self.verifier) {
            (Some(tls), Some(_)) => tracing::info!(
                "{server}: TLS on{}, tokens required",
                if tls.client_ca.is_some() { " with client certificates (mutual TLS)" } else { "" }
            ),
            (tls, verifier) => {
                let mut off = Vec::new();
                if tls.is_none() {
                    off.push("PLAIN TEXT (no TLS)");
                }
                if verifier.is_none() {
                    off.push("NO TOKENS (anyone who reaches the port is admin)");
                }
                tracing::warn!("INSECURE {server}: {}; started with --insecure", off.join(", "));
            }
        }
    }
}
