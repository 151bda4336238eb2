//! The coordinator's gRPC server in-process on 127.0.0.1:0 with an embedded store (the
//! control loop runs behind it), and a client channel to it.

use std::sync::Arc;

use ferrite_coordinator::server::{self, Deps};
use ferrite_coordinator::{EmbeddedStore, Store};
use ferrite_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;

pub struct Harness {
    pub client: JobServiceClient<Channel>,
    pub channel: Channel,
    pub deps: Deps,
    pub stop: Option<oneshot::Sender<()>>,
    pub served: JoinHandle<ferrite_coordinator::Result<()>>,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(dir.path().join("s.redb")).unwrap());
        let deps = Deps::new(store);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let insecure = ferrite_security::ServerSecurity::insecure();
        let served = tokio::spawn(server::run(listener, deps.clone(), insecure, async {
            let _ = stopped.await;
        }));
        let channel =
            Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        Harness {
            client: JobServiceClient::new(channel.clone()),
            channel,
            deps,
            stop: Some(stop),
            served,
            dir,
        }
    }

    pub fn job_toml(&self) -> String {
        let data = self.dir.path().join("data");
        format!(
            "[model]\nn_layer = 2\nn_head = 4\nn_embd = 128\nblock_size = 64\n\
             [data]\ndir = {:?}\n[output]\ndir = \"out\"\n\
             [cluster]\nworkers = 2\npriority = 1\n",
            data.display().to_string()
        )
    }

    pub fn spec(&self) -> pb::JobSpec {
        pb::JobSpec { toml: self.job_toml(), ..Default::default() }
    }

    pub async fn submit(&mut self, spec: pb::JobSpec) -> Result<pb::Job, tonic::Status> {
        let req = pb::SubmitJobRequest { spec: Some(spec) };
        Ok(self.client.submit_job(req).await?.into_inner().job.unwrap())
    }

    pub async fn list(&mut self, states: Vec<i32>) -> Vec<pb::Job> {
        let req = pb::ListJobsRequest { states };
        self.client.list_jobs(req).await.unwrap().into_inner().jobs
    }
}

/// The status must be InvalidArgument and its message must name `field`.
pub fn assert_invalid(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let status = result.expect_err("should be rejected");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&format!("`{field}`")),
        "{field} not named: {}",
        status.message()
    );
}
