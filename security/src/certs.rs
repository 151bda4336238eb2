//! `ferrite certs init DIR`: everything a test cluster needs to run with TLS and tokens.
//!
//! | file | what | who needs it |
//! |---|---|---|
//! | `ca.pem` | the CA certificate | every client (`--tls-ca`), servers for mutual TLS |
//! | `ca.key` | the CA's private key | nobody at run time; keep it to sign more |
//! | `server.pem`, `server.key` | a server certificate for `localhost`, `127.0.0.1`, `::1` and each `--host` | coordinator, inference (`--tls-cert`, `--tls-key`) |
//! | `client.pem`, `client.key` | a client certificate (`ferrite-client`) | workers and operators under mutual TLS |
//! | `token.key` | the Ed25519 key that signs tokens | `ferrite token create` only |
//! | `token.pub` | its public half | every server (`--token-key`) |
//!
//! Private keys are written mode 0600. Nothing is ever overwritten: if any of these files
//! exists the command fails before writing, so a cluster's keys cannot be lost by rerunning it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519,
};
use time::{Duration, OffsetDateTime};

use crate::{Error, Result};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
pub const CLIENT_CERT: &str = "client.pem";
pub const CLIENT_KEY: &str = "client.key";
pub const TOKEN_KEY: &str = "token.key";
pub const TOKEN_PUB: &str = "token.pub";

const ALL: [&str; 8] =
    [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY, TOKEN_KEY, TOKEN_PUB];

/// Names every server certificate carries besides the `--host`s.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Creates the files of the table above in `dir` (created if absent), the certificates valid
/// for `days`. Returns the paths written.
pub fn init(dir: &Path, hosts: &[String], days: u32) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    if let Some(existing) = ALL.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
        return Err(Error::file(
            &existing,
            "already exists; `certs init` never overwrites keys (remove it or use another folder)",
        ));
    }
    let gen = |e: rcgen::Error| Error::Config(format!("generating certificates: {e}"));
    let not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    let not_after = OffsetDateTime::now_utc() + Duration::days(days.into());

    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("Ferrite cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (ca.not_before, ca.not_after) = (not_before, not_after);
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let issuer = Issuer::new(ca, &ca_key);

    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    names.extend(hosts.iter().filter(|h| !LOCAL_NAMES.contains(&h.as_str())).cloned());
    let leaf = |cn: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose| -> Result<_> {
        let key = KeyPair::generate().map_err(gen)?;
        let mut p = CertificateParams::new(names).map_err(gen)?;
        p.distinguished_name = name(cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![usage];
        (p.not_before, p.not_after) = (not_before, not_after);
        let cert = p.signed_by(&key, &issuer).map_err(gen)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let server = leaf("ferrite-server", names, ExtendedKeyUsagePurpose::ServerAuth)?;
    let client =
        leaf("ferrite-client", vec!["ferrite-client".into()], ExtendedKeyUsagePurpose::ClientAuth)?;
    let token_key = KeyPair::generate_for(&PKCS_ED25519).map_err(gen)?;

    let files = [
        (CA_CERT, ca_cert.pem(), false),
        (CA_KEY, ca_key.serialize_pem(), true),
        (SERVER_CERT, server.0, false),
        (SERVER_KEY, server.1, true),
        (CLIENT_CERT, client.0, false),
        (CLIENT_KEY, client.1, true),
        (TOKEN_KEY, token_key.serialize_pem(), true),
        (TOKEN_PUB, token_key.public_key_pem(), false),
    ];
    let mut written = Vec::new();
    for (file, text, private) in files {
        let path = dir.join(file);
        write_new(&path, text.as_bytes(), if private { 0o600 } else { 0o644 })?;
        written.push(path);
    }
    Ok(written)
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Ferrite");
    dn
}

/// Writes a file that must not exist yet, with `mode` from the start (a key is never
/// readable by others, not even for a moment).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::file(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| Error::file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_every_file_with_private_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        let written = init(dir.path(), &["coordinator-1".into()], 30).unwrap();
        assert_eq!(written.len(), ALL.len());
        for key in [CA_KEY, SERVER_KEY, CLIENT_KEY, TOKEN_KEY] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let server = std::fs::read_to_string(dir.path().join(SERVER_CERT)).unwrap();
        assert!(server.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn init_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], 1).unwrap();
        let before = std::fs::read(dir.path().join(CA_KEY)).unwrap();
        let err = init(dir.path(), &[], 1).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(CA_KEY)).unwrap(), before);
    }
}
