//! The coordinator's gRPC server: `ferrite.v1.JobService` for operators and
//! `ferrite.v1.WorkerService` for workers (with the control loop behind it), plus the standard
//! health service (`grpc.health.v1.Health`) and server reflection on the same port.
//!
//! [`run`] takes a bound listener, so callers (and tests) bind `127.0.0.1:0` and know the
//! address before a single request is served.
//!
//! Layout:
//! - [`job_service`] — the `JobService` handlers over [`JobRegistry`] and
//!   [`CheckpointRegistry`].
//! - [`worker_service`] — the `WorkerService` handlers: registration and the `Attach`
//!   stream, converted to and from [`crate::control`]'s messages.
//! - [`job_file`] — the job file's checks at submission, naming the failing TOML field.
//! - [`StoreSpec`] — `embedded:PATH` / `etcd:URL,...`, as given on the command line.

pub mod job_file;
pub mod job_service;
pub mod worker_service;

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ferrite_proto::v1 as pb;
use ferrite_security::{AuthLayer, ServerSecurity};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::error::{Error, Result};
use crate::leader::{self, Role};
use crate::store::EtcdAccess;
use crate::WorkerRegistry;
use crate::{CheckpointRegistry, Controller, EmbeddedStore, EtcdStore, JobRegistry, Store};

pub use job_file::PathRoots;
use job_service::JobApi;
use worker_service::WorkerApi;

/// A worker silent this long is dropped and its job recovers (`--heartbeat-timeout`).
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server serves from.
#[derive(Clone)]
pub struct Deps {
    pub jobs: JobRegistry,
    pub checkpoints: CheckpointRegistry,
    pub control: Arc<Controller>,
    /// Leader or standby; only the leader runs the control loop and answers calls.
    pub role: watch::Receiver<Role>,
    /// Where submitted jobs' paths may point.
    pub roots: PathRoots,
}

impl Deps {
    /// Registries over one store, with the default heartbeat timeout.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_heartbeat_timeout(store, DEFAULT_HEARTBEAT_TIMEOUT)
    }

    /// Registries over one store; workers silent for `timeout` are dropped.
    pub fn with_heartbeat_timeout(store: Arc<dyn Store>, timeout: Duration) -> Self {
        let jobs = JobRegistry::new(store.clone());
        let checkpoints = CheckpointRegistry::new(store.clone());
        let workers = WorkerRegistry::new(store, timeout);
        let control = Arc::new(Controller::new(jobs.clone(), checkpoints.clone(), workers));
        Deps {
            jobs,
            checkpoints,
            control,
            role: leader::sole_leader(),
            roots: PathRoots::default(),
        }
    }

    /// Serves as leader only while `role` says so (a coordinator campaigning on etcd).
    pub fn with_role(self, role: watch::Receiver<Role>) -> Self {
        Deps { role, ..self }
    }

    /// Confines submitted jobs' paths to `roots`.
    pub fn with_roots(self, roots: PathRoots) -> Self {
        Deps { roots, ..self }
    }
}

/// Largest request message accepted (a job spec has its own, smaller limit: see
/// [`crate::job::MAX_JOB_TOML_BYTES`]).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Most concurrent calls (HTTP/2 streams) one client connection may have open.
pub const MAX_STREAMS_PER_CLIENT: u32 = 64;

/// Serves until `shutdown` completes, then stops accepting, ends open `WatchJob` streams and
/// returns once in-flight requests have been answered. TLS and tokens as `security` says.
pub async fn run(
    listener: TcpListener,
    deps: Deps,
    security: ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (stopping_tx, stopping) = watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    type JobServer = pb::job_service_server::JobServiceServer<JobApi>;
    type WorkerServer = pb::worker_service_server::WorkerServiceServer<WorkerApi>;
    health.set_serving::<JobServer>().await;
    health.set_serving::<WorkerServer>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection service: {e}")))?;
    let control = deps.control.clone();
    let role = deps.role.clone();
    // A standby refuses every call with `Unavailable` naming the leader.
    let leader_only = move |req: tonic::Request<()>| match role.borrow().refusal() {
        Some(refusal) => Err(refusal),
        None => Ok(req),
    };
    let workers = InterceptedService::new(
        WorkerServer::new(WorkerApi::new(control.clone(), stopping.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        leader_only.clone(),
    );
    let control_loop = tokio::spawn(control.run(stopping.clone(), deps.role.clone()));
    let serving = tokio::spawn(report_role(health.clone(), deps.role.clone()));
    let api = InterceptedService::new(
        JobServer::new(JobApi::new(deps, stopping)).max_decoding_message_size(MAX_MESSAGE_BYTES),
        leader_only,
    );
    let signal = async move {
        shutdown.await;
        serving.abort();
        health.set_not_serving::<JobServer>().await;
        health.set_not_serving::<WorkerServer>().await;
        // Streams see this and end, so the graceful shutdown below does not wait on them.
        let _ = stopping_tx.send(true);
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &security.tls {
        builder = builder
            .tls_config(tls.tonic().map_err(|e| Error::Internal(e.to_string()))?)
            .map_err(|e| Error::Internal(format!("TLS: {e}")))?;
    }
    builder
        .max_concurrent_streams(MAX_STREAMS_PER_CLIENT)
        .layer(AuthLayer::new(security.verifier.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(api)
        .add_service(workers)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
        .await
        .map_err(|e| Error::Internal(format!("grpc server: {e}")))?;
    let _ = control_loop.await;
    Ok(())
}

/// Health says SERVING for both APIs only while this coordinator leads; the server as a
/// whole (`""`) serves either way, so a liveness probe never restarts a standby.
async fn report_role(
    health: tonic_health::server::HealthReporter,
    mut role: watch::Receiver<Role>,
) {
    loop {
        let status = if role.borrow_and_update().is_leader() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for service in [JOB_SERVICE, WORKER_SERVICE] {
            health.set_service_status(service, status).await;
        }
        if role.changed().await.is_err() {
            return;
        }
    }
}

const JOB_SERVICE: &str = "ferrite.v1.JobService";
const WORKER_SERVICE: &str = "ferrite.v1.WorkerService";

/// Where the coordinator keeps its state: `embedded:PATH` (a redb file, created if absent)
/// or `etcd:http://HOST:PORT[,http://HOST:PORT...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    Embedded(PathBuf),
    Etcd(Vec<String>),
}

impl StoreSpec {
    /// Opens (or connects to, with `access` for etcd) the store.
    pub async fn open(&self, access: &EtcdAccess) -> Result<Arc<dyn Store>> {
        Ok(match self {
            StoreSpec::Embedded(path) => Arc::new(EmbeddedStore::open(path)?),
            StoreSpec::Etcd(endpoints) => {
                let ns = EtcdStore::DEFAULT_NAMESPACE;
                Arc::new(EtcdStore::connect_with(endpoints, ns, access).await?)
            }
        })
    }
}

impl FromStr for StoreSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(path) = s.strip_prefix("embedded:") {
            if path.is_empty() {
                return Err("`embedded:` needs a file path".into());
            }
            return Ok(StoreSpec::Embedded(PathBuf::from(path)));
        }
        if let Some(urls) = s.strip_prefix("etcd:") {
            let endpoints: Vec<String> = urls.split(',').map(str::to_owned).collect();
            if let Some(bad) = endpoints.iter().find(|u| !is_http_url(u)) {
                return Err(format!("`{bad}` is not an etcd endpoint (http://HOST:PORT)"));
            }
            return Ok(StoreSpec::Etcd(endpoints));
        }
        Err(format!("`{s}`: expected embedded:PATH or etcd:http://HOST:PORT"))
    }
}

fn is_http_url(u: &str) -> bool {
    let rest = u.strip_prefix("http://").or_else(|| u.strip_prefix("https://"));
    rest.is_some_and(|hp| {
        hp.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_specs_parse() {
        assert_eq!("embedded:/tmp/a.redb".parse(), Ok(StoreSpec::Embedded("/tmp/a.redb".into())));
        assert_eq!(
            "etcd:http://127.0.0.1:2379,http://h:1".parse(),
            Ok(StoreSpec::Etcd(vec!["http://127.0.0.1:2379".into(), "http://h:1".into()]))
        );
        for bad in ["", "embedded:", "etcd:", "etcd:127.0.0.1:2379", "redis:x", "etcd:http://h"] {
            assert!(bad.parse::<StoreSpec>().is_err(), "{bad:?} accepted");
        }
    }
}
