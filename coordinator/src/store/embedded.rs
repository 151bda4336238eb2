//! `EmbeddedStore`: the single-node default, one redb file.
//!
//! Crash safety comes from redb: each call is one ACID transaction with immediate durability,
//! so a killed coordinator reopens the file at its last committed write.
//!
//! Layout: table `kv` maps key -> record (`[format=1][revision u64 LE][lease i64 LE][value]`),
//! `leases` maps lease id -> (ttl ms, deadline unix ms), `meta` holds the revision and lease
//! counters. A record whose lease is missing or past its deadline reads as absent; expired
//! leases are swept (their keys deleted, watchers told) at the start of every write and by a
//! background task every [`SWEEP_INTERVAL`] when the store was opened inside a tokio runtime.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use super::WatchStream;
use super::{CasOutcome, Entry, Expect, LeaseId, Revision, Store, Versioned, WatchEvent};
use crate::error::{Error, Result};
use crate::job::now_unix_ms;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// lease id -> (ttl ms, deadline unix ms)
const LEASES: TableDefinition<i64, (u64, i64)> = TableDefinition::new("leases");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_LAST_LEASE: &str = "last_lease";

const RECORD_FORMAT: u8 = 1;
const RECORD_HEADER: usize = 17;
/// Watchers further behind than this get [`Error::WatchLagged`].
const WATCH_BUFFER: usize = 4096;
/// How often the background task looks for expired leases.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// The embedded store. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Held from `begin_write` until the transaction's events are published, so watchers see
    /// events in revision order. Guards no data, so a poisoned lock is still usable.
    write_order: Mutex<()>,
    events: broadcast::Sender<WatchEvent>,
}

/// A decoded `kv` record.
struct Record<'a> {
    revision: Revision,
    /// 0: no lease.
    lease: i64,
    value: &'a [u8],
}

impl EmbeddedStore {
    /// Opens the database file at `path`, creating it if absent.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let db = Database::create(path.as_ref())?;
        let txn = db.begin_write()?;
        txn.open_table(KV)?;
        txn.open_table(LEASES)?;
        txn.open_table(META)?;
        txn.commit()?;
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let inner = Arc::new(Inner { db, write_order: Mutex::new(()), events });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep_periodically(Arc::downgrade(&inner)));
        }
        Ok(EmbeddedStore { inner })
    }

    /// Runs blocking database work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::Unavailable(format!("embedded store task failed: {e}")))?
    }

    #[cfg(test)]
    pub(crate) fn put_raw_for_test(&self, key: &str, raw: &[u8]) -> Result<()> {
        self.inner.write(|tx| {
            tx.kv.insert(key, raw)?;
            Ok(())
        })
    }
}

async fn sweep_periodically(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let swept = tokio::task::spawn_blocking(move || {
            if inner.has_expired_lease()? {
                inner.write(|_| Ok(()))?;
            }
            Ok::<_, Error>(())
        })
        .await;
        match swept {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "embedded store: lease sweep failed"),
            Err(e) => tracing::warn!(error = %e, "embedded store: lease sweep task failed"),
        }
    }
}

/// One write transaction's open tables and pending events.
struct Tx<'t> {
    kv: redb::Table<'t, &'static str, &'static [u8]>,
    leases: redb::Table<'t, i64, (u64, i64)>,
    meta: redb::Table<'t, &'static str, u64>,
    revision: Revision,
    revision_changed: bool,
    now: i64,
    events: Vec<WatchEvent>,
}

impl Inner {
    /// Runs `f` in one write transaction: sweep expired leases, `f`, commit, publish events.
    fn write<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let _order = self.write_order.lock().unwrap_or_else(PoisonError::into_inner);
        let txn = self.db.begin_write()?;
        let (out, events) = {
            let meta = txn.open_table(META)?;
            let revision = meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0);
            let mut tx = Tx {
                kv: txn.open_table(KV)?,
                leases: txn.open_table(LEASES)?,
                meta,
                revision,
                revision_changed: false,
                now: now_unix_ms(),
                events: Vec::new(),
            };
            tx.sweep_expired()?;
            let out = f(&mut tx)?;
            if tx.revision_changed {
                tx.meta.insert(META_REVISION, tx.revision)?;
            }
            (out, tx.events)
        };
        txn.commit()?;
        for event in events {
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(event);
        }
        Ok(out)
    }

    fn has_expired_lease(&self) -> Result<bool> {
        let txn = self.db.begin_read()?;
        let leases = txn.open_table(LEASES)?;
        let now = now_unix_ms();
        for row in leases.iter()? {
            let (_, v) = row?;
            if v.value().1 <= now {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let txn = self.db.begin_read()?;
        let kv = txn.open_table(KV)?;
        let leases = txn.open_table(LEASES)?;
        let now = now_unix_ms();
        let Some(guard) = kv.get(key)? else {
            return Ok(None);
        };
        let rec = decode_record(key, guard.value())?;
        if !lease_alive(&leases, rec.lease, now)? {
            return Ok(None);
        }
        Ok(Some(Versioned { value: rec.value.to_vec(), revision: rec.revision }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let txn = self.db.begin_read()?;
        let kv = txn.open_table(KV)?;
        let leases = txn.open_table(LEASES)?;
        let now = now_unix_ms();
        let mut out = Vec::new();
        for row in kv.range::<&str>(prefix..)? {
            let (k, v) = row?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            let rec = decode_record(key, v.value())?;
            if lease_alive(&leases, rec.lease, now)? {
                let value = rec.value.to_vec();
                out.push(Entry { key: key.to_owned(), value, revision: rec.revision });
            }
        }
        Ok(out)
    }
}

impl Tx<'_> {
    fn next_revision(&mut self) -> Revision {
        self.revision += 1;
        self.revision_changed = true;
        self.revision
    }

    /// The live record's revision at `key`, if any.
    fn current_revision(&self, key: &str) -> Result<Option<Revision>> {
        let Some(guard) = self.kv.get(key)? else {
            return Ok(None);
        };
        let rec = decode_record(key, guard.value())?;
        Ok(lease_alive(&self.leases, rec.lease, self.now)?.then_some(rec.revision))
    }

    fn put(&mut self, key: &str, value: &[u8], lease: i64) -> Result<Revision> {
        let revision = self.next_revision();
        self.kv.insert(key, encode_record(revision, lease, value).as_slice())?;
        let entry = Entry { key: key.to_owned(), value: value.to_vec(), revision };
        self.events.push(WatchEvent::Put(entry));
        Ok(revision)
    }

    fn delete(&mut self, key: &str) -> Result<bool> {
        let live = self.current_revision(key)?.is_some();
        let existed = self.kv.remove(key)?.is_some();
        if live {
            let revision = self.next_revision();
            self.events.push(WatchEvent::Delete { key: key.to_owned(), revision });
        }
        Ok(existed && live)
    }

    fn lease_is_live(&self, lease: LeaseId) -> Result<bool> {
        Ok(lease.0 != 0 && lease_alive(&self.leases, lease.0, self.now)?)
    }

    /// Deletes every key held by one of `dead` leases, and the leases.
    fn drop_leases(&mut self, dead: &HashSet<i64>) -> Result<()> {
        if dead.is_empty() {
            return Ok(());
        }
        let mut doomed = Vec::new();
        for row in self.kv.iter()? {
            let (k, v) = row?;
            match decode_record(k.value(), v.value()) {
                Ok(rec) if dead.contains(&rec.lease) => doomed.push(k.value().to_owned()),
                Ok(_) => {}
                // A corrupt record must not wedge every write; reads of it report it.
                Err(e) => tracing::warn!(error = %e, "embedded store: skipping record in sweep"),
            }
        }
        for key in doomed {
            self.kv.remove(key.as_str())?;
            let revision = self.next_revision();
            self.events.push(WatchEvent::Delete { key, revision });
        }
        for id in dead {
            self.leases.remove(*id)?;
        }
        Ok(())
    }

    fn sweep_expired(&mut self) -> Result<()> {
        let mut dead = HashSet::new();
        for row in self.leases.iter()? {
            let (id, v) = row?;
            if v.value().1 <= self.now {
                dead.insert(id.value());
            }
        }
        self.drop_leases(&dead)
    }
}

fn lease_alive(leases: &impl ReadableTable<i64, (u64, i64)>, lease: i64, now: i64) -> Result<bool> {
    if lease == 0 {
        return Ok(true);
    }
    Ok(leases.get(lease)?.is_some_and(|g| g.value().1 > now))
}

fn encode_record(revision: Revision, lease: i64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + value.len());
    out.push(RECORD_FORMAT);
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&lease.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_record<'a>(key: &str, raw: &'a [u8]) -> Result<Record<'a>> {
    if raw.len() < RECORD_HEADER {
        let reason = format!("{} bytes, shorter than the {RECORD_HEADER}-byte header", raw.len());
        return Err(Error::corrupt(key, reason));
    }
    if raw[0] != RECORD_FORMAT {
        return Err(Error::corrupt(key, format!("unknown record format {}", raw[0])));
    }
    // In bounds: the length was checked above.
    let word = |at: usize| <[u8; 8]>::try_from(&raw[at..at + 8]).unwrap_or([0; 8]);
    let revision = u64::from_le_bytes(word(1));
    let lease = i64::from_le_bytes(word(9));
    if revision == 0 {
        return Err(Error::corrupt(key, "revision 0"));
    }
    Ok(Record { revision, lease, value: &raw[RECORD_HEADER..] })
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn deadline(now: i64, ttl_ms: u64) -> i64 {
    now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.get(&key)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.write(|tx| tx.put(&key, &value, 0))).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.write(|tx| tx.delete(&key))).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| inner.list(&prefix)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<CasOutcome> {
        let key = key.to_owned();
        self.blocking(move |inner| {
            inner.write(|tx| {
                let current = tx.current_revision(&key)?;
                let holds = match expect {
                    Expect::Absent => current.is_none(),
                    Expect::Revision(r) => current == Some(r),
                };
                if !holds {
                    return Ok(CasOutcome::Conflict { current });
                }
                Ok(CasOutcome::Swapped(tx.put(&key, &value, 0)?))
            })
        })
        .await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = ttl_ms(ttl);
        self.blocking(move |inner| {
            inner.write(|tx| {
                let id = tx.meta.get(META_LAST_LEASE)?.map(|g| g.value()).unwrap_or(0) + 1;
                tx.meta.insert(META_LAST_LEASE, id)?;
                let id =
                    i64::try_from(id).map_err(|_| Error::Internal("lease ids ran out".into()))?;
                tx.leases.insert(id, (ttl, deadline(tx.now, ttl)))?;
                Ok(LeaseId(id))
            })
        })
        .await
    }

    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision> {
        let key = key.to_owned();
        self.blocking(move |inner| {
            inner.write(|tx| {
                if !tx.lease_is_live(lease)? {
                    return Err(Error::LeaseExpired(lease));
                }
                tx.put(&key, &value, lease.0)
            })
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |inner| {
            inner.write(|tx| {
                // Expired leases were swept when the transaction began.
                let ttl = match tx.leases.get(lease.0)? {
                    Some(g) => g.value().0,
                    None => return Err(Error::LeaseExpired(lease)),
                };
                tx.leases.insert(lease.0, (ttl, deadline(tx.now, ttl)))?;
                Ok(())
            })
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |inner| {
            inner.write(|tx| {
                if tx.leases.get(lease.0)?.is_some() {
                    tx.drop_leases(&HashSet::from([lease.0]))?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        let prefix = prefix.to_owned();
        let events = BroadcastStream::new(self.inner.events.subscribe());
        let stream = events.filter_map(move |item| match item {
            Ok(event) if event.key().starts_with(&prefix) => Some(Ok(event)),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(Err(Error::WatchLagged(n))),
        });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn data_and_revisions_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let rev = {
            let store = EmbeddedStore::open(&path).unwrap();
            store.put("a", b"1".to_vec()).await.unwrap();
            store.put("b", b"2".to_vec()).await.unwrap()
        };
        // The sweeper task holds only a weak reference, so dropping the store closes the file.
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.get("b").await.unwrap().unwrap().revision, rev);
        assert!(store.put("c", vec![]).await.unwrap() > rev, "revision went backwards");
    }

    #[tokio::test]
    async fn corrupt_records_are_errors_naming_the_key_and_do_not_block_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("s.redb")).unwrap();
        store.put_raw_for_test("jobs/short", &[1, 2, 3]).unwrap();
        let mut bad_format = encode_record(7, 0, b"x");
        bad_format[0] = 9;
        store.put_raw_for_test("jobs/format", &bad_format).unwrap();
        for key in ["jobs/short", "jobs/format"] {
            match store.get(key).await {
                Err(Error::Corrupt { key: k, .. }) => assert_eq!(k, key),
                other => panic!("expected Corrupt for {key}, got {other:?}"),
            }
        }
        assert!(matches!(store.list("jobs/").await, Err(Error::Corrupt { .. })));
        // A sweep that meets the corrupt records skips them.
        let lease = store.grant_lease(Duration::from_millis(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        store.put("other", b"ok".to_vec()).await.unwrap();
        assert!(matches!(store.keep_alive(lease).await, Err(Error::LeaseExpired(_))));
    }

    #[tokio::test]
    async fn lease_deadline_is_checked_on_read_without_the_sweeper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        // Opened outside a runtime's context: no sweeper task; reads still see expiry.
        let store = std::thread::spawn(move || EmbeddedStore::open(path).unwrap()).join().unwrap();
        let lease = store.grant_lease(Duration::from_millis(50)).await.unwrap();
        store.put_with_lease("workers/w", b"x".to_vec(), lease).await.unwrap();
        assert!(store.get("workers/w").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(store.get("workers/w").await.unwrap(), None);
        assert!(store.list("workers/").await.unwrap().is_empty());
    }
}
