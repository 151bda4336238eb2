//! `EtcdStore`: the cluster store, over etcd v3 (etcd-client).
//!
//! All keys live under a namespace prefix (`/ferrite/` by default), so one etcd can hold
//! several clusters, or many tests. Revisions are etcd's `mod_revision`.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::WatchStream;
use super::{CasOutcome, Entry, Expect, LeaseId, Revision, Store, Versioned, WatchEvent};
use crate::error::{Error, Result};

const WATCH_BUFFER: usize = 1024;

/// How the coordinator authenticates to etcd: TLS (`https://` endpoints, optionally with a
/// client certificate) and etcd's own user and password. Every etcd client the coordinator
/// makes (the store, the leader election) uses the same.
#[derive(Clone, Debug, Default)]
pub struct EtcdAccess {
    pub tls: Option<ferrite_security::ClientTls>,
    pub user: Option<(String, String)>,
}

impl EtcdAccess {
    /// `options` with this access applied.
    pub fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions> {
        if let Some(tls) = &self.tls {
            let config = tls.tonic().map_err(|e| Error::invalid("etcd TLS", e.to_string()))?;
            options = options.with_tls(config);
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        Ok(options)
    }
}

/// A store in etcd. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    namespace: String,
}

impl EtcdStore {
    /// The namespace a cluster uses unless told otherwise.
    pub const DEFAULT_NAMESPACE: &'static str = "/ferrite/";

    /// Connects to `endpoints` (`http://host:port`); every key is stored under `namespace`.
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<Self> {
        Self::connect_with(endpoints, namespace, &EtcdAccess::default()).await
    }

    /// [`EtcdStore::connect`] with TLS and/or a user.
    pub async fn connect_with(
        endpoints: &[String],
        namespace: &str,
        access: &EtcdAccess,
    ) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::invalid("endpoints", "no etcd endpoint given"));
        }
        if namespace.is_empty() {
            return Err(Error::invalid("namespace", "must not be empty"));
        }
        let options = access.apply(
            ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5)),
        )?;
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(EtcdStore { client, namespace: namespace.to_owned() })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    /// Our key for a key etcd returned.
    fn strip(&self, raw: &[u8]) -> Result<String> {
        let key = std::str::from_utf8(raw)
            .map_err(|e| Error::corrupt(&String::from_utf8_lossy(raw), e))?;
        key.strip_prefix(&self.namespace)
            .map(str::to_owned)
            .ok_or_else(|| Error::corrupt(key, "outside the store's namespace"))
    }
}

fn revision(rev: i64) -> Revision {
    Revision::try_from(rev).unwrap_or(0)
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .map(|h| revision(h.revision()))
        .ok_or_else(|| Error::Internal("etcd response without a header".into()))
}

/// etcd refuses a lease it does not know (or that expired) with `NotFound`.
fn lease_error(e: etcd_client::Error, lease: LeaseId) -> Error {
    match &e {
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound => {
            Error::LeaseExpired(lease)
        }
        etcd_client::Error::LeaseKeepAliveError(msg) if msg.contains("not found") => {
            Error::LeaseExpired(lease)
        }
        _ => Error::Etcd(e),
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let resp = self.client.clone().get(self.full(key), None).await?;
        Ok(resp.kvs().first().map(|kv| Versioned {
            value: kv.value().to_vec(),
            revision: revision(kv.mod_revision()),
        }))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let resp = self.client.clone().put(self.full(key), value, None).await?;
        header_revision(resp.header())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let resp = self.client.clone().delete(self.full(key), None).await?;
        Ok(resp.deleted() > 0)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let options = GetOptions::new().with_prefix();
        let resp = self.client.clone().get(self.full(prefix), Some(options)).await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = self.strip(kv.key())?;
                Ok(Entry { key, value: kv.value().to_vec(), revision: revision(kv.mod_revision()) })
            })
            .collect()
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<CasOutcome> {
        let full = self.full(key);
        let compare = match expect {
            Expect::Absent => Compare::version(full.clone(), CompareOp::Equal, 0),
            Expect::Revision(r) => {
                let r = i64::try_from(r).map_err(|_| Error::invalid("revision", "too large"))?;
                Compare::mod_revision(full.clone(), CompareOp::Equal, r)
            }
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(full.clone(), value, None)])
            .or_else([TxnOp::get(full, None)]);
        let resp = self.client.clone().txn(txn).await?;
        if resp.succeeded() {
            return Ok(CasOutcome::Swapped(header_revision(resp.header())?));
        }
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => {
                Some(get.kvs().first().map(|kv| revision(kv.mod_revision())))
            }
            _ => None,
        });
        Ok(CasOutcome::Conflict { current: current.flatten() })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd counts whole seconds.
        let secs = i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX).max(1);
        let resp = self.client.clone().lease_grant(secs, None).await?;
        Ok(LeaseId(resp.id()))
    }

    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision> {
        let options = PutOptions::new().with_lease(lease.0);
        let resp = self
            .client
            .clone()
            .put(self.full(key), value, Some(options))
            .await
            .map_err(|e| lease_error(e, lease))?;
        header_revision(resp.header())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        // One request on a fresh keep-alive stream; the client checks the answer's TTL > 0.
        self.client.clone().lease_keep_alive(lease.0).await.map_err(|e| lease_error(e, lease))?;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        match self.client.clone().lease_revoke(lease.0).await.map_err(|e| lease_error(e, lease)) {
            Ok(_) | Err(Error::LeaseExpired(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        let options = WatchOptions::new().with_prefix();
        let mut stream = self.client.clone().watch(self.full(prefix), Some(options)).await?;
        // Wait until etcd confirms the watch, so changes after this call are never missed.
        match stream.message().await? {
            Some(resp) if resp.created() => {}
            Some(_) | None => {
                return Err(Error::Unavailable("etcd did not create the watch".into()))
            }
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return,
                    msg = stream.message() => msg,
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        let _ =
                            tx.send(Err(Error::Unavailable("etcd closed the watch".into()))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if resp.canceled() {
                    let why = format!("etcd cancelled the watch: {}", resp.cancel_reason());
                    let _ = tx.send(Err(Error::Unavailable(why))).await;
                    return;
                }
                for event in resp.events() {
                    let converted = this.convert_event(event);
                    if tx.send(converted).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

impl EtcdStore {
    fn convert_event(&self, event: &etcd_client::Event) -> Result<WatchEvent> {
        let kv = event.kv().ok_or_else(|| Error::Internal("etcd event without a kv".into()))?;
        let key = self.strip(kv.key())?;
        let revision = revision(kv.mod_revision());
        Ok(match event.event_type() {
            EventType::Put => WatchEvent::Put(Entry { key, value: kv.value().to_vec(), revision }),
            EventType::Delete => WatchEvent::Delete { key, revision },
        })
    }
}
