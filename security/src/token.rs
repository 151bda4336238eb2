//! Tokens: JWTs signed with Ed25519 (`alg: EdDSA`), claims `sub` (who), `role`, `iat`, `exp`.
//!
//! The signing key (`token.key`, PKCS#8 PEM) stays with whoever issues tokens
//! (`ferrite token create`); servers verify with the public key (`token.pub`). A token is
//! never logged: errors name what is wrong with it, not its text. Verification is a signature
//! check, so no secret is ever compared byte by byte (and hence no timing to leak).

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What a token lets its holder do (see [`crate::policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything an operator can do.
    Admin,
    /// Submit jobs and cancel them, and read.
    Submit,
    /// Look: jobs, metrics, checkpoints, generations.
    Read,
    /// Join the cluster as a worker; nothing else.
    Worker,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Submit, Role::Read, Role::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submit => "submit",
            Role::Read => "read",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a role (admin, submit, read, worker)"))
    }
}

/// What a verified token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who holds it (an operator's name, a worker pool's name).
    pub sub: String,
    pub role: Role,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
}

/// Why a token was refused. The message names the problem, never the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired {0} s ago")]
    Expired(u64),
    #[error("token signature does not verify (tampered, or signed by another key)")]
    BadSignature,
    #[error("token is malformed: {0}")]
    Malformed(String),
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::file(path, e))
}

/// Issues tokens with the private key.
pub struct Signer {
    key: EncodingKey,
}

impl Signer {
    /// From `token.key` (Ed25519, PKCS#8 PEM).
    pub fn from_pem_file(path: &Path) -> Result<Self> {
        let key = EncodingKey::from_ed_pem(&read(path)?)
            .map_err(|e| Error::file(path, format!("not an Ed25519 private key in PEM: {e}")))?;
        Ok(Signer { key })
    }

    /// A token for `subject` with `role`, valid for `ttl` from now.
    pub fn issue(&self, subject: &str, role: Role, ttl: Duration) -> Result<String> {
        let iat = now_s();
        self.issue_claims(&Claims { sub: subject.to_owned(), role, iat, exp: iat + ttl.as_secs() })
    }

    /// A token with exactly these claims (tests use it for tokens already expired).
    pub fn issue_claims(&self, claims: &Claims) -> Result<String> {
        if claims.sub.is_empty() {
            return Err(Error::Config("a token needs a subject (who holds it)".into()));
        }
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.key)
            .map_err(|e| Error::Config(format!("signing the token: {e}")))
    }
}

/// Checks tokens with the public key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

/// Clocks of machines in one cluster may differ by this much.
const CLOCK_SKEW: Duration = Duration::from_secs(30);

impl Verifier {
    /// From `token.pub` (Ed25519 public key, PEM).
    pub fn from_pem_file(path: &Path) -> Result<Self> {
        let key = DecodingKey::from_ed_pem(&read(path)?)
            .map_err(|e| Error::file(path, format!("not an Ed25519 public key in PEM: {e}")))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Verifier { key, validation })
    }

    /// The token's claims if it is well formed, signed by our key, and not expired.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => {
                    let exp = jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
                        .map_or(0, |d| d.claims.exp);
                    TokenError::Expired(now_s().saturating_sub(exp))
                }
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::Json(_) | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                    // A body edited by hand may no longer parse; the signature would not have
                    // matched either way.
                    TokenError::BadSignature
                }
                other => TokenError::Malformed(format!("{other:?}")),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(dir: &Path) -> (Signer, Verifier) {
        crate::certs::init(dir, &[], 1).unwrap();
        (
            Signer::from_pem_file(&dir.join(crate::certs::TOKEN_KEY)).unwrap(),
            Verifier::from_pem_file(&dir.join(crate::certs::TOKEN_PUB)).unwrap(),
        )
    }

    #[test]
    fn a_token_carries_its_subject_and_role() {
        let dir = tempfile::tempdir().unwrap();
        let (signer, verifier) = keys(dir.path());
        let token = signer.issue("alice", Role::Submit, Duration::from_secs(60)).unwrap();
        let claims = verifier.verify(&token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.role), ("alice", Role::Submit));
        assert!(claims.exp >= claims.iat + 60);
    }

    #[test]
    fn expired_tampered_foreign_and_garbage_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (signer, verifier) = keys(dir.path());
        let now = now_s();
        let old = Claims { sub: "bob".into(), role: Role::Admin, iat: now - 7200, exp: now - 3600 };
        let expired = signer.issue_claims(&old).unwrap();
        assert!(matches!(verifier.verify(&expired), Err(TokenError::Expired(s)) if s >= 3600));

        // Raise a read token to admin: graft an admin token's body onto the read token's
        // signature. The signature covers the body, so it no longer verifies.
        let read = signer.issue("carol", Role::Read, Duration::from_secs(60)).unwrap();
        let admin = signer.issue("carol", Role::Admin, Duration::from_secs(60)).unwrap();
        let (r, a): (Vec<&str>, Vec<&str>) =
            (read.split('.').collect(), admin.split('.').collect());
        let forged = format!("{}.{}.{}", r[0], a[1], r[2]);
        assert_eq!(verifier.verify(&forged), Err(TokenError::BadSignature));
        // One character of the signature changed.
        let mut sig = r[2].to_owned().into_bytes();
        sig[5] = if sig[5] == b'A' { b'B' } else { b'A' };
        let flipped = format!("{}.{}.{}", r[0], r[1], String::from_utf8(sig).unwrap());
        assert!(verifier.verify(&flipped).is_err());

        // Signed by another cluster's key.
        let other = tempfile::tempdir().unwrap();
        let (foreign_signer, _) = keys(other.path());
        let foreign = foreign_signer.issue("dave", Role::Admin, Duration::from_secs(60)).unwrap();
        assert_eq!(verifier.verify(&foreign), Err(TokenError::BadSignature));

        assert!(verifier.verify("not-a-token").is_err());
        assert!(verifier.verify("").is_err());
    }

    #[test]
    fn roles_parse_by_name() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().unwrap_err().contains("admin, submit, read, worker"));
    }
}
