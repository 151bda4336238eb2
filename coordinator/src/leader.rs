//! Which coordinator leads: with the embedded store there is one coordinator and it always
//! leads; on etcd, every coordinator campaigns through etcd's election API and one leads.
//!
//! The leader runs the control loop and answers jobs and workers. A standby serves gRPC too,
//! but its health service reports NOT_SERVING and every `JobService`/`WorkerService` call
//! gets `Unavailable` naming the leader, so clients and workers given several coordinator
//! URLs follow the leader (and a Kubernetes Service routes only to the ready one).
//!
//! Leadership is held by an etcd lease kept alive every third of its TTL. A leader that
//! cannot renew it stops (the campaign returns an error and the process exits), so a
//! coordinator cut off from etcd never keeps acting once its lease may have passed to
//! another.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::store::EtcdAccess;

/// This coordinator's part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Leader,
    /// Waiting to lead; `leader` is the leader's URL when one is known.
    Standby {
        leader: Option<String>,
    },
}

impl Role {
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader)
    }

    /// The `Unavailable` a standby answers with.
    pub fn refusal(&self) -> Option<tonic::Status> {
        match self {
            Role::Leader => None,
            Role::Standby { leader: Some(url) } => Some(tonic::Status::unavailable(format!(
                "this coordinator is a standby; the leader is {url}"
            ))),
            Role::Standby { leader: None } => Some(tonic::Status::unavailable(
                "this coordinator is a standby and no leader is elected yet",
            )),
        }
    }
}

/// The role of a coordinator that needs no election (the embedded store).
/// The role never changes, so the channel's sender is dropped at once.
pub fn sole_leader() -> watch::Receiver<Role> {
    watch::channel(Role::Leader).1
}

/// The election's key prefix in etcd (one per store namespace).
pub fn election_name(namespace: &str) -> String {
    format!("{namespace}leader")
}

/// Campaigns for leadership as `me` (the URL clients reach this coordinator at).
///
/// Returns the role, which starts as standby, and the campaign: a future to poll for as
/// long as the coordinator runs; it only ends with the error that lost (or never won)
/// leadership, after which the coordinator must stop.
pub async fn campaign(
    endpoints: &[String],
    namespace: &str,
    me: String,
    ttl: Duration,
    access: &EtcdAccess,
) -> Result<(watch::Receiver<Role>, impl Future<Output = Error>)> {
    // No per-request timeout: a campaign waits as long as another coordinator leads. The
    // keep-alive below bounds its own waits.
    let options =
        access.apply(ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)))?;
    let client = Client::connect(endpoints, Some(options)).await?;
    let (tx, rx) = watch::channel(Role::Standby { leader: None });
    let name = election_name(namespace);
    Ok((rx, run(client, name, me, ttl, tx)))
}

async fn run(
    mut client: Client,
    name: String,
    me: String,
    ttl: Duration,
    role: watch::Sender<Role>,
) -> Error {
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let lease = match client.lease_grant(secs, None).await {
        Ok(lease) => lease.id(),
        Err(e) => return e.into(),
    };
    let keep = keep_alive(client.clone(), lease, ttl);
    let elect = async {
        let mut campaigner = client.clone();
        let campaign = campaigner.campaign(name.clone(), me.clone(), lease);
        tokio::pin!(campaign);
        loop {
            let leader = current_leader(&mut client, &name).await;
            role.send_if_modified(|r| {
                let next = Role::Standby { leader: leader.clone() };
                (*r != next).then(|| *r = next).is_some()
            });
            tokio::select! {
                won = &mut campaign => match won {
                    Ok(_) => break,
                    Err(e) => return Error::from(e),
                },
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        tracing::info!(leader = %me, "elected leader");
        let _ = role.send(Role::Leader);
        std::future::pending::<Error>().await
    };
    tokio::select! {
        e = keep => e,
        e = elect => e,
    }
}

/// The leader's URL, when one is elected.
async fn current_leader(client: &mut Client, name: &str) -> Option<String> {
    let resp = client.leader(name).await.ok()?;
    resp.kv().and_then(|kv| kv.value_str().ok()).map(str::to_owned)
}

/// Renews `lease` every third of its TTL; returns when it cannot.
async fn keep_alive(mut client: Client, lease: i64, ttl: Duration) -> Error {
    let (mut keeper, mut answers) = match client.lease_keep_alive(lease).await {
        Ok(pair) => pair,
        Err(e) => return e.into(),
    };
    loop {
        let renewed = tokio::time::timeout(ttl / 2, async {
            keeper.keep_alive().await?;
            answers.message().await
        });
        match renewed.await {
            Ok(Ok(Some(a))) if a.ttl() > 0 => {}
            Ok(Ok(_)) => return Error::Unavailable("the leadership lease expired".into()),
            Ok(Err(e)) => return e.into(),
            Err(_) => return Error::Unavailable("etcd did not renew the leadership lease".into()),
        }
        tokio::time::sleep(ttl / 3).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_names_the_leader_in_its_refusal() {
        assert!(Role::Leader.refusal().is_none());
        let standby = Role::Standby { leader: Some("http://c1:7070".into()) };
        let status = standby.refusal().unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("http://c1:7070"), "{}", status.message());
        let none = Role::Standby { leader: None }.refusal().unwrap();
        assert!(none.message().contains("no leader"), "{}", none.message());
    }
}
