//! Worker membership: a worker is a member while its store lease is kept alive.
//!
//! `register` grants a lease and stores the worker's record under it; heartbeats keep the
//! lease alive; a worker that stops heartbeating vanishes from the store when the lease
//! expires, and watchers see it leave.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_stream::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::job::{now_unix_ms, DeviceKind, WorkerId};
use crate::keys;
use crate::store::{decode_json, increment, LeaseId, Store, StoreExt, WatchEvent};

/// What a worker offers, as it registers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerCapabilities {
    pub device: DeviceKind,
    /// GPUs visible to the worker (0 on CPU workers).
    pub device_count: u32,
    /// Device memory (GPU) or host memory (CPU), bytes.
    pub memory_bytes: u64,
    pub threads: u32,
    /// `host:port` of the worker's collective listener.
    pub collective_addr: String,
    pub hostname: String,
}

/// A registered worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: WorkerId,
    pub capabilities: WorkerCapabilities,
    /// The lease that holds the membership; heartbeats keep it alive.
    pub lease: LeaseId,
    pub registered_unix_ms: i64,
}

/// A change of membership.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberEvent {
    /// Registered (or re-registered) worker.
    Joined(WorkerInfo),
    /// Deregistered, or its lease expired.
    Left(WorkerId),
}

pub type MemberEvents = Pin<Box<dyn Stream<Item = Result<MemberEvent>> + Send>>;

/// Worker membership over a store.
#[derive(Clone)]
pub struct WorkerRegistry {
    store: Arc<dyn Store>,
    ttl: Duration,
}

impl WorkerRegistry {
    /// Workers silent for `ttl` are dropped.
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Self {
        WorkerRegistry { store, ttl }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Admits a worker under a fresh id and lease.
    pub async fn register(&self, capabilities: WorkerCapabilities) -> Result<WorkerInfo> {
        validate(&capabilities)?;
        let seq = increment(self.store.as_ref(), keys::WORKER_SEQ).await?;
        let id = WorkerId::new(format!("w-{seq:06}"));
        let lease = self.store.grant_lease(self.ttl).await?;
        let info = WorkerInfo { id, capabilities, lease, registered_unix_ms: now_unix_ms() };
        let bytes = serde_json::to_vec(&info).map_err(|e| Error::Internal(e.to_string()))?;
        self.store.put_with_lease(&keys::worker(&info.id), bytes, lease).await?;
        Ok(info)
    }

    /// Keeps a worker's membership alive. [`Error::LeaseExpired`]: it was dropped and must
    /// register again.
    pub async fn heartbeat(&self, worker: &WorkerInfo) -> Result<()> {
        self.store.keep_alive(worker.lease).await
    }

    /// Removes a worker now.
    pub async fn deregister(&self, worker: &WorkerInfo) -> Result<()> {
        self.store.revoke_lease(worker.lease).await
    }

    /// A live worker. [`Error::NotFound`] once it left or its lease expired.
    pub async fn get(&self, id: &WorkerId) -> Result<WorkerInfo> {
        let key = keys::worker(id);
        match self.store.get_json::<WorkerInfo>(&key).await? {
            Some((info, _)) => checked(&key, info),
            None => Err(Error::NotFound { kind: "worker", id: id.to_string() }),
        }
    }

    /// Live workers, by id.
    pub async fn list(&self) -> Result<Vec<WorkerInfo>> {
        let entries = self.store.list_json::<WorkerInfo>(keys::WORKERS).await?;
        entries.into_iter().map(|(key, info, _)| checked(&key, info)).collect()
    }

    /// Membership changes from now on.
    pub async fn watch(&self) -> Result<MemberEvents> {
        let events = self.store.watch(keys::WORKERS).await?;
        Ok(Box::pin(events.map(|event| match event? {
            WatchEvent::Put(e) => {
                let info = checked(&e.key, decode_json(&e.key, &e.value)?)?;
                Ok(MemberEvent::Joined(info))
            }
            WatchEvent::Delete { key, .. } => {
                let id = key.strip_prefix(keys::WORKERS).unwrap_or(&key);
                Ok(MemberEvent::Left(WorkerId::new(id)))
            }
        })))
    }
}

fn validate(c: &WorkerCapabilities) -> Result<()> {
    if c.threads == 0 {
        return Err(Error::invalid("capabilities.threads", "must be at least 1"));
    }
    if c.device == DeviceKind::Cuda && c.device_count == 0 {
        return Err(Error::invalid("capabilities.device_count", "a CUDA worker needs a device"));
    }
    let port = c.collective_addr.rsplit_once(':').map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(p))) if !host.is_empty() && p != 0 => Ok(()),
        _ => Err(Error::invalid(
            "capabilities.collective_addr",
            format!("`{}` is not host:port", c.collective_addr),
        )),
    }
}

fn checked(key: &str, info: WorkerInfo) -> Result<WorkerInfo> {
    if keys::worker(&info.id) != key {
        return Err(Error::corrupt(key, format!("holds worker `{}`", info.id)));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedStore;

    fn caps(addr: &str) -> WorkerCapabilities {
        WorkerCapabilities {
            device: DeviceKind::Cpu,
            device_count: 0,
            memory_bytes: 1 << 30,
            threads: 2,
            collective_addr: addr.into(),
            hostname: "h".into(),
        }
    }

    #[tokio::test]
    async fn silent_worker_is_dropped_and_watchers_see_it_leave() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("s")).unwrap());
        let reg = WorkerRegistry::new(store, Duration::from_millis(300));
        let mut events = reg.watch().await.unwrap();
        let quiet = reg.register(caps("10.0.0.1:7000")).await.unwrap();
        let chatty = reg.register(caps("10.0.0.2:7000")).await.unwrap();
        assert_ne!(quiet.id, chatty.id);
        assert_eq!(reg.list().await.unwrap().len(), 2);
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            reg.heartbeat(&chatty).await.unwrap();
        }
        let live: Vec<WorkerId> = reg.list().await.unwrap().into_iter().map(|w| w.id).collect();
        assert_eq!(live, std::slice::from_ref(&chatty.id));
        assert!(matches!(reg.heartbeat(&quiet).await, Err(Error::LeaseExpired(_))));
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let next = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
            seen.push(next.expect("event in time").expect("stream open").unwrap());
        }
        assert!(matches!(&seen[0], MemberEvent::Joined(w) if w.id == quiet.id));
        assert!(matches!(&seen[1], MemberEvent::Joined(w) if w.id == chatty.id));
        assert_eq!(seen[2], MemberEvent::Left(quiet.id.clone()));
        reg.deregister(&chatty).await.unwrap();
        assert!(reg.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn bad_capabilities_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("s")).unwrap());
        let reg = WorkerRegistry::new(store, Duration::from_secs(5));
        for addr in ["", "nohost", ":7000", "h:0", "h:99999"] {
            match reg.register(caps(addr)).await {
                Err(Error::InvalidArgument { field, .. }) => {
                    assert_eq!(field, "capabilities.collective_addr")
                }
                other => panic!("{addr:?}: expected InvalidArgument, got {other:?}"),
            }
        }
        let zero = WorkerCapabilities { threads: 0, ..caps("h:1") };
        assert!(matches!(reg.register(zero).await, Err(Error::InvalidArgument { .. })));
    }
}
