//! One behavioural suite for every `Store` implementation: each case below runs against the
//! embedded store (a redb file in a temp dir) and against a real etcd started for the test.

mod common;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use ferrite_coordinator::store::{CasOutcome, Entry, Expect, WatchEvent, WatchStream};
use ferrite_coordinator::{EmbeddedStore, Error, EtcdStore, Store, StoreExt};
use tokio_stream::StreamExt;

/// A store plus whatever must outlive it (temp dir, etcd process).
pub struct Fixture {
    pub store: Arc<dyn Store>,
    _keep: Box<dyn Any + Send>,
}

async fn embedded() -> Option<Fixture> {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("store.redb")).unwrap();
    Some(Fixture { store: Arc::new(store), _keep: Box::new(dir) })
}

async fn etcd() -> Option<Fixture> {
    let process = common::etcd::EtcdProcess::start().await?;
    let store =
        EtcdStore::connect(std::slice::from_ref(&process.endpoint), "/test/").await.unwrap();
    Some(Fixture { store: Arc::new(store), _keep: Box::new(process) })
}

/// Every case, as `#[tokio::test]`s that open a fresh store with `$open`.
macro_rules! conformance_suite {
    ($open:path) => {
        conformance_suite!(@cases $open;
            get_of_missing_key_is_none,
            put_then_get_returns_value_and_a_growing_revision,
            delete_reports_whether_the_key_existed,
            list_matches_prefix_exactly_in_key_order,
            create_only_cas_succeeds_once,
            cas_compares_revisions_and_reports_the_current_one,
            concurrent_cas_increments_lose_no_update,
            typed_records_round_trip_and_bad_bytes_are_corrupt,
            leased_key_lives_while_kept_alive_and_dies_after_ttl,
            revoking_a_lease_deletes_its_keys,
            put_with_dead_lease_is_lease_expired,
            watch_sees_changes_under_prefix_in_order,
            dropping_a_watch_does_not_disturb_writers,
        );
    };
    (@cases $open:path; $($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let Some(fixture) = $open().await else { return };
            super::cases::$case(fixture.store.as_ref()).await;
        }
    )*};
}

mod embedded_store {
    conformance_suite!(super::embedded);
}

mod etcd_store {
    conformance_suite!(super::etcd);
}

async fn next_event(watch: &mut WatchStream) -> WatchEvent {
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
    next.expect("a watch event within 10 s").expect("watch stream open").expect("event")
}

mod cases {
    use super::*;

    pub async fn get_of_missing_key_is_none(s: &dyn Store) {
        assert_eq!(s.get("nope").await.unwrap(), None);
        assert!(s.list("nope/").await.unwrap().is_empty());
    }

    pub async fn put_then_get_returns_value_and_a_growing_revision(s: &dyn Store) {
        let r1 = s.put("k", b"v1".to_vec()).await.unwrap();
        let got = s.get("k").await.unwrap().unwrap();
        assert_eq!((got.value.as_slice(), got.revision), (&b"v1"[..], r1));
        let r2 = s.put("other", b"x".to_vec()).await.unwrap();
        let r3 = s.put("k", b"v2".to_vec()).await.unwrap();
        assert!(r1 < r2 && r2 < r3, "{r1} {r2} {r3}");
        let got = s.get("k").await.unwrap().unwrap();
        assert_eq!((got.value.as_slice(), got.revision), (&b"v2"[..], r3));
    }

    pub async fn delete_reports_whether_the_key_existed(s: &dyn Store) {
        s.put("k", vec![1]).await.unwrap();
        assert!(s.delete("k").await.unwrap());
        assert!(!s.delete("k").await.unwrap());
        assert_eq!(s.get("k").await.unwrap(), None);
    }

    pub async fn list_matches_prefix_exactly_in_key_order(s: &dyn Store) {
        for key in ["jobs/b", "jobs/a", "jobs/a/x", "jobsx", "job", "other/jobs/a"] {
            s.put(key, key.as_bytes().to_vec()).await.unwrap();
        }
        let keys: Vec<String> = s.list("jobs/").await.unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["jobs/a", "jobs/a/x", "jobs/b"]);
        let entries = s.list("jobs/a/").await.unwrap();
        assert_eq!(entries.len(), 1);
        let Entry { key, value, revision } = &entries[0];
        assert_eq!((key.as_str(), value.as_slice()), ("jobs/a/x", &b"jobs/a/x"[..]));
        assert_eq!(*revision, s.get("jobs/a/x").await.unwrap().unwrap().revision);
    }

    pub async fn create_only_cas_succeeds_once(s: &dyn Store) {
        let first = s.compare_and_swap("c", Expect::Absent, b"1".to_vec()).await.unwrap();
        let CasOutcome::Swapped(rev) = first else { panic!("{first:?}") };
        let second = s.compare_and_swap("c", Expect::Absent, b"2".to_vec()).await.unwrap();
        assert_eq!(second, CasOutcome::Conflict { current: Some(rev) });
        assert_eq!(s.get("c").await.unwrap().unwrap().value, b"1");
    }

    pub async fn cas_compares_revisions_and_reports_the_current_one(s: &dyn Store) {
        let r1 = s.put("c", b"1".to_vec()).await.unwrap();
        let r2 = s.put("c", b"2".to_vec()).await.unwrap();
        let stale = s.compare_and_swap("c", Expect::Revision(r1), b"x".to_vec()).await.unwrap();
        assert_eq!(stale, CasOutcome::Conflict { current: Some(r2) });
        let fresh = s.compare_and_swap("c", Expect::Revision(r2), b"3".to_vec()).await.unwrap();
        let CasOutcome::Swapped(r3) = fresh else { panic!("{fresh:?}") };
        assert!(r3 > r2);
        assert_eq!(
            s.get("c").await.unwrap().unwrap(),
            ferrite_coordinator::store::Versioned { value: b"3".to_vec(), revision: r3 }
        );
        let absent = s.compare_and_swap("nope", Expect::Revision(r3), vec![]).await.unwrap();
        assert_eq!(absent, CasOutcome::Conflict { current: None });
        assert_eq!(s.get("nope").await.unwrap(), None);
    }

    pub async fn concurrent_cas_increments_lose_no_update(s: &dyn Store) {
        // Each task adds 1 ten times with a read / compare-and-swap loop.
        async fn add_one(s: &dyn Store) {
            loop {
                let (n, expect) = match s.get_json::<u64>("n").await.unwrap() {
                    None => (0, Expect::Absent),
                    Some((n, rev)) => (n, Expect::Revision(rev)),
                };
                if let CasOutcome::Swapped(_) = s.cas_json("n", expect, &(n + 1)).await.unwrap() {
                    return;
                }
            }
        }
        let tasks = (0..4).map(|_| async {
            for _ in 0..10 {
                add_one(s).await;
            }
        });
        futures_join_all(tasks).await;
        assert_eq!(s.get_json::<u64>("n").await.unwrap().unwrap().0, 40);
    }

    pub async fn typed_records_round_trip_and_bad_bytes_are_corrupt(s: &dyn Store) {
        s.put_json("t", &vec![1u32, 2, 3]).await.unwrap();
        assert_eq!(s.get_json::<Vec<u32>>("t").await.unwrap().unwrap().0, [1, 2, 3]);
        s.put("t", b"{truncated".to_vec()).await.unwrap();
        match s.get_json::<Vec<u32>>("t").await {
            Err(Error::Corrupt { key, .. }) => assert_eq!(key, "t"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// etcd's TTLs are whole seconds with a floor near 2 s, so this case takes a few seconds.
    pub async fn leased_key_lives_while_kept_alive_and_dies_after_ttl(s: &dyn Store) {
        let mut watch = s.watch("members/").await.unwrap();
        let lease = s.put_with_ttl("members/a", b"a".to_vec(), Duration::from_secs(2)).await;
        let lease = lease.unwrap();
        let WatchEvent::Put(_) = next_event(&mut watch).await else { panic!("expected put") };
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            s.keep_alive(lease).await.unwrap();
        }
        assert!(s.get("members/a").await.unwrap().is_some(), "kept alive past the TTL");
        // Stop heartbeating: gone within TTL plus slack, and watchers see a delete.
        let event = next_event(&mut watch).await;
        assert!(
            matches!(&event, WatchEvent::Delete { key, .. } if key == "members/a"),
            "{event:?}"
        );
        assert_eq!(s.get("members/a").await.unwrap(), None);
        assert!(s.list("members/").await.unwrap().is_empty());
        let err = s.keep_alive(lease).await.unwrap_err();
        assert!(matches!(err, Error::LeaseExpired(l) if l == lease), "{err}");
    }

    pub async fn revoking_a_lease_deletes_its_keys(s: &dyn Store) {
        let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
        s.put_with_lease("m/a", b"a".to_vec(), lease).await.unwrap();
        s.put_with_lease("m/b", b"b".to_vec(), lease).await.unwrap();
        s.put("m/c", b"c".to_vec()).await.unwrap();
        assert_eq!(s.list("m/").await.unwrap().len(), 3);
        s.revoke_lease(lease).await.unwrap();
        let keys: Vec<String> = s.list("m/").await.unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["m/c"]);
        s.revoke_lease(lease).await.unwrap();
    }

    pub async fn put_with_dead_lease_is_lease_expired(s: &dyn Store) {
        let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
        s.revoke_lease(lease).await.unwrap();
        let err = s.put_with_lease("m/a", vec![], lease).await.unwrap_err();
        assert!(matches!(err, Error::LeaseExpired(_)), "{err}");
        assert!(!err.is_retryable());
        assert_eq!(s.get("m/a").await.unwrap(), None);
    }

    pub async fn watch_sees_changes_under_prefix_in_order(s: &dyn Store) {
        s.put("w/before", vec![0]).await.unwrap();
        let mut watch = s.watch("w/").await.unwrap();
        let r1 = s.put("w/a", vec![1]).await.unwrap();
        s.put("x/ignored", vec![2]).await.unwrap();
        let r2 = s.put("w/a", vec![3]).await.unwrap();
        assert!(s.delete("w/a").await.unwrap());
        let cas = s.compare_and_swap("w/b", Expect::Absent, vec![4]).await.unwrap();
        let CasOutcome::Swapped(r4) = cas else { panic!("{cas:?}") };
        let put = |key: &str, value: u8, revision| {
            WatchEvent::Put(Entry { key: key.into(), value: vec![value], revision })
        };
        assert_eq!(next_event(&mut watch).await, put("w/a", 1, r1));
        assert_eq!(next_event(&mut watch).await, put("w/a", 3, r2));
        let WatchEvent::Delete { key, revision: r3 } = next_event(&mut watch).await else {
            panic!("expected delete")
        };
        assert!(key == "w/a" && r3 > r2 && r3 < r4);
        assert_eq!(next_event(&mut watch).await, put("w/b", 4, r4));
    }

    pub async fn dropping_a_watch_does_not_disturb_writers(s: &dyn Store) {
        let watch = s.watch("d/").await.unwrap();
        drop(watch);
        for i in 0..50u8 {
            s.put("d/k", vec![i]).await.unwrap();
        }
        let mut watch = s.watch("d/").await.unwrap();
        let rev = s.put("d/k", vec![99]).await.unwrap();
        let event = next_event(&mut watch).await;
        assert_eq!(
            event,
            WatchEvent::Put(Entry { key: "d/k".into(), value: vec![99], revision: rev })
        );
    }
}

/// Runs futures concurrently to completion (a small `join_all`, to avoid a dependency).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}
