//! The `Store` trait: a small, etcd-shaped key-value API the control plane keeps its state in.
//!
//! Semantics shared by every implementation (checked by `tests/store_conformance.rs`):
//! - Keys are UTF-8 strings, values bytes. Listing and watching are by key prefix; listing
//!   returns keys in ascending byte order.
//! - Every write is stamped with a store-wide [`Revision`] that only grows; `get` and `list`
//!   return the revision of each key's last write, which is what compare-and-swap compares.
//! - A key put under a lease lives while the lease is kept alive; when the lease expires or is
//!   revoked, its keys read as absent and watchers see them deleted. The embedded store keeps
//!   the lease's deadline on disk and checks it on read; etcd rounds TTLs up to whole seconds
//!   and enforces its own minimum (about 2 s with default settings).
//! - A watch sees every change made after `watch` returns, in revision order. To follow a
//!   prefix without gaps: watch first, then list, then apply events newer than the listing.

mod embedded;
mod etcd;

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_stream::Stream;

use crate::error::{Error, Result};

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdAccess, EtcdStore};

/// Store-wide write counter; each key's value carries the revision of its last write.
pub type Revision = u64;

/// A lease handle. Keys put with it are deleted when it expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A value with the revision of its last write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: Revision,
}

/// A key, its value and the revision of its last write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put(Entry),
    /// Deleted explicitly, or its lease ran out.
    Delete {
        key: String,
        revision: Revision,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(e) => &e.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// What compare-and-swap expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist (create).
    Absent,
    /// The key's last write must be at this revision.
    Revision(Revision),
}

/// Result of a compare-and-swap that reached the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written at this revision.
    Swapped(Revision),
    /// The expectation did not hold; this is what was there (`None`: absent).
    Conflict { current: Option<Revision> },
}

/// A stream of changes; it ends only if the store shuts down.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

/// The control plane's state store. Object-safe: hold it as `Arc<dyn Store>`.
#[async_trait]
pub trait Store: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<Versioned>>;
    /// Writes unconditionally (detaching any lease); returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision>;
    /// Returns whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool>;
    /// Every live key starting with `prefix`, in ascending key order.
    async fn list(&self, prefix: &str) -> Result<Vec<Entry>>;
    /// Writes `value` only if `expect` holds, atomically.
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<CasOutcome>;
    /// Creates a lease that lives `ttl` past each keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    /// Writes a key that is deleted when `lease` expires. [`Error::LeaseExpired`] if it has.
    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision>;
    /// Pushes the lease's deadline to now + TTL. [`Error::LeaseExpired`] if it has passed.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// Ends the lease now, deleting its keys. Revoking an unknown lease is not an error.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;
    /// Changes under `prefix` from now on.
    async fn watch(&self, prefix: &str) -> Result<WatchStream>;
}

/// Typed records on top of [`Store`]: values are JSON, and a value that does not decode is
/// [`Error::Corrupt`] naming the key.
#[async_trait]
pub trait StoreExt: Store {
    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, Revision)>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(v) => Ok(Some((decode_json(key, &v.value)?, v.revision))),
        }
    }

    async fn put_json<T: Serialize + Sync>(&self, key: &str, value: &T) -> Result<Revision> {
        self.put(key, encode_json(value)?).await
    }

    async fn cas_json<T: Serialize + Sync>(
        &self,
        key: &str,
        expect: Expect,
        value: &T,
    ) -> Result<CasOutcome> {
        self.compare_and_swap(key, expect, encode_json(value)?).await
    }

    /// Every record under `prefix`, in key order, with its revision.
    async fn list_json<T: DeserializeOwned + Send>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T, Revision)>> {
        let entries = self.list(prefix).await?;
        entries
            .into_iter()
            .map(|e| Ok((decode_json(&e.key, &e.value)?, e)))
            .map(|r: Result<(T, Entry)>| r.map(|(t, e)| (e.key, t, e.revision)))
            .collect()
    }

    /// Grants a lease of `ttl` and puts `key` under it.
    async fn put_with_ttl(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<LeaseId> {
        let lease = self.grant_lease(ttl).await?;
        self.put_with_lease(key, value, lease).await?;
        Ok(lease)
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// Decodes a JSON record, naming the key if it does not decode.
pub fn decode_json<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::corrupt(key, e))
}

fn encode_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    // Our records are plain structs with string keys; failing to encode one is a bug, but
    // still an error rather than a panic.
    serde_json::to_vec(value).map_err(|e| Error::Internal(format!("encoding record: {e}")))
}

/// How many times read-modify-write loops retry a lost compare-and-swap before giving up.
pub(crate) const MAX_CAS_ATTEMPTS: u32 = 32;

/// Atomically increments the JSON counter at `key` (absent = 0); returns the new value.
pub(crate) async fn increment(store: &dyn Store, key: &str) -> Result<u64> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (next, expect) = match store.get_json::<u64>(key).await? {
            None => (1, Expect::Absent),
            Some((n, rev)) => {
                let next = n.checked_add(1).ok_or_else(|| Error::corrupt(key, "overflow"))?;
                (next, Expect::Revision(rev))
            }
        };
        if let CasOutcome::Swapped(_) = store.cas_json(key, expect, &next).await? {
            return Ok(next);
        }
    }
    Err(Error::Contended { key: key.to_owned(), attempts: MAX_CAS_ATTEMPTS })
}
