//! etcd's own authentication passed through: a coordinator's store on an etcd with auth
//! enabled works with the right user and password, and says why without them.

mod common;

use ferrite_coordinator::store::EtcdAccess;
use ferrite_coordinator::{EtcdStore, Store};

#[tokio::test]
async fn the_store_authenticates_to_an_etcd_with_auth_enabled() {
    let Some(etcd) = common::etcd::EtcdProcess::start().await else {
        eprintln!("skipping: no etcd binary (scripts/install-deps.sh installs etcd-server)");
        return;
    };
    let endpoints = std::slice::from_ref(&etcd.endpoint);
    let mut admin = etcd_client::Client::connect(endpoints, None).await.unwrap();
    admin.user_add("root", "s3cret", None).await.unwrap();
    // etcd 3.4 makes the root role itself; later versions want it created.
    let _ = admin.role_add("root").await;
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let access = EtcdAccess { tls: None, user: Some(("root".into(), "s3cret".into())) };
    let store = EtcdStore::connect_with(endpoints, "/auth/", &access).await.unwrap();
    store.put("k", b"v".to_vec()).await.unwrap();
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"v");

    let wrong = EtcdAccess { tls: None, user: Some(("root".into(), "guess".into())) };
    let err = match EtcdStore::connect_with(endpoints, "/auth/", &wrong).await {
        Ok(s) => s.get("k").await.unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("authentication failed"), "{err}");

    let anonymous = EtcdStore::connect(endpoints, "/auth/").await.unwrap();
    let err = anonymous.get("k").await.unwrap_err().to_string();
    assert!(err.contains("user name is empty") || err.contains("permission denied"), "{err}");
}
