//! The security flags every server and client shares, and `ferrite certs init` /
//! `ferrite token create`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferrite_security::certs;
use ferrite_security::{ClientTls, Credentials, Role, ServerSecurity, ServerTls, Signer};

/// How a server protects itself. Secure by default: without `--insecure` it needs a
/// certificate and a token key.
#[derive(Args, Clone, Debug, Default)]
pub struct ServerSecurityArgs {
    /// The server's TLS certificate (PEM), e.g. server.pem from `ferrite certs init`.
    #[arg(long, env = "FERRITE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "FERRITE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients with a certificate signed by this CA (ca.pem).
    #[arg(long, env = "FERRITE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// The public key that verifies tokens (token.pub from `ferrite certs init`).
    #[arg(long, env = "FERRITE_TOKEN_KEY")]
    pub token_key: Option<PathBuf>,
    /// Serve without TLS and/or without tokens, for local experiments only; announced
    /// loudly at start.
    #[arg(long)]
    pub insecure: bool,
}

impl ServerSecurityArgs {
    /// The checked settings, loaded from their files.
    pub fn load(&self) -> anyhow::Result<ServerSecurity> {
        let tls = ServerTls::from_flags(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_client_ca.clone(),
        )?;
        Ok(ServerSecurity::from_flags(tls, self.token_key.clone(), self.insecure)?)
    }
}

/// What a client presents to servers.
#[derive(Args, Clone, Debug, Default)]
pub struct ClientSecurityArgs {
    /// The CA that signed the servers' certificates (ca.pem); needed for https:// URLs, and
    /// makes https:// the default for a bare HOST:PORT.
    #[arg(long, env = "FERRITE_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: this client's certificate (client.pem).
    #[arg(long, env = "FERRITE_CLIENT_CERT", requires = "client_key", global = true)]
    pub client_cert: Option<PathBuf>,
    /// Its private key (client.key).
    #[arg(long, env = "FERRITE_CLIENT_KEY", requires = "client_cert", global = true)]
    pub client_key: Option<PathBuf>,
    /// The token to present (`ferrite token create`).
    #[arg(long, env = "FERRITE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// A file holding the token (instead of --token).
    #[arg(long, env = "FERRITE_TOKEN_FILE", conflicts_with = "token", global = true)]
    pub token_file: Option<PathBuf>,
}

impl ClientSecurityArgs {
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        let tls = ClientTls::from_flags(
            self.tls_ca.clone(),
            self.client_cert.clone(),
            self.client_key.clone(),
        )?;
        Ok(Credentials::new(tls, self.token.clone(), self.token_file.as_deref())?)
    }
}

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a CA, a server and a client certificate, and the token signing key pair in
    /// DIR (never overwrites).
    Init {
        dir: PathBuf,
        /// A name or address the servers are reached at, besides localhost (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days the certificates stay valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn certs(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init { dir, hosts, days } => {
            let written = certs::init(&dir, &hosts, days)?;
            for path in &written {
                println!("{}", path.display());
            }
            eprintln!(
                "servers: --tls-cert {d}/{} --tls-key {d}/{} --token-key {d}/{}\n\
                 clients: --tls-ca {d}/{} and a token from \
                 `ferrite token create --key {d}/{} --subject NAME --role ROLE`",
                certs::SERVER_CERT,
                certs::SERVER_KEY,
                certs::TOKEN_PUB,
                certs::CA_CERT,
                certs::TOKEN_KEY,
                d = dir.display()
            );
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Print a new signed token.
    Create {
        /// The signing key (token.key from `ferrite certs init`).
        #[arg(long, env = "FERRITE_TOKEN_SIGNING_KEY")]
        key: PathBuf,
        /// Who holds the token (shown in the servers' logs).
        #[arg(long)]
        subject: String,
        /// admin, submit, read, or worker (a worker join token).
        #[arg(long)]
        role: Role,
        /// How long it is valid (e.g. 30m, 12h, 90d).
        #[arg(long, default_value = "30d", value_parser = parse_ttl)]
        ttl: Duration,
    },
}

pub fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create { key, subject, role, ttl } => {
            let signer = Signer::from_pem_file(&key)?;
            let token = signer.issue(&subject, role, ttl).context("issuing the token")?;
            println!("{token}");
            Ok(())
        }
    }
}

/// `90s`, `30m`, `12h` or `90d`.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 =
        digits.parse().map_err(|_| format!("`{s}`: expected a number with s, m, h or d"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{s}`: the unit must be s, m, h or d")),
    };
    if n == 0 {
        return Err("a token must be valid for some time".into());
    }
    Ok(Duration::from_secs(n * secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("90d"), Ok(Duration::from_secs(90 * 86400)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        for bad in ["", "0s", "5", "5y", "h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
