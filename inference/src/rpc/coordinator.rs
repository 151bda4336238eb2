//! Finds a job's newest published checkpoint through the coordinator's
//! `JobService.ListCheckpoints`, and keeps the engine on the newest one. Given several
//! coordinator URLs it asks the leading one, and finds the new leader after a failover.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferrite_proto::v1 as pb;
use ferrite_security::{connect, AuthChannel, Credentials};
use pb::job_service_client::JobServiceClient;

use crate::engine::{EngineHandle, ServedModel};
use crate::error::{InferenceError, Result};
use crate::request::ModelVersion;

/// How long a call waits for a coordinator to lead (an election after a failover).
const LEADER_PATIENCE: Duration = Duration::from_secs(15);

/// A coordinator connection for one job.
pub struct CheckpointWatch {
    urls: Vec<String>,
    creds: Credentials,
    client: Option<JobServiceClient<AuthChannel>>,
    job: String,
}

impl CheckpointWatch {
    /// `urls`: one coordinator URL, or several comma-separated (the leader is followed).
    pub async fn connect(urls: &str, job: &str, creds: Credentials) -> Result<Self> {
        if job.is_empty() {
            return Err(InferenceError::invalid("job", "is empty"));
        }
        let urls = connect::parse_urls(urls, &creds)
            .map_err(|e| InferenceError::invalid("coordinator", e))?;
        let mut watch = CheckpointWatch { urls, creds, client: None, job: job.to_string() };
        watch.client().await?;
        Ok(watch)
    }

    /// A client of the leading coordinator, connecting (again) when there is none.
    async fn client(&mut self) -> Result<JobServiceClient<AuthChannel>> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let (url, channel) =
            connect::connect(&self.urls, connect::JOB_SERVICE, LEADER_PATIENCE, &self.creds)
                .await
                .map_err(|e| {
                    InferenceError::Coordinator(format!(
                        "{} is unreachable: {e}",
                        self.urls.join(",")
                    ))
                })?;
        if self.urls.len() > 1 {
            tracing::info!(coordinator = %url, "following the leading coordinator");
        }
        let client = JobServiceClient::new(self.creds.authed(channel));
        self.client = Some(client.clone());
        Ok(client)
    }

    /// The job's newest published checkpoint, if any.
    pub async fn newest(&mut self) -> Result<Option<ModelVersion>> {
        let req = pb::ListCheckpointsRequest { job_id: self.job.clone() };
        let answer = self.client().await?.list_checkpoints(req).await;
        let resp = answer.map_err(|s| match s.code() {
            tonic::Code::NotFound => InferenceError::NotFound(s.message().to_string()),
            code => {
                // The leader may have changed (a standby answers Unavailable) or gone: find
                // the leader again on the next call.
                if matches!(code, tonic::Code::Unavailable | tonic::Code::Unknown) {
                    self.client = None;
                }
                InferenceError::Coordinator(s.message().to_string())
            }
        })?;
        let newest = resp.into_inner().checkpoints.into_iter().max_by_key(|c| c.step);
        Ok(newest.map(|c| ModelVersion { job_id: c.job_id, step: c.step, path: c.path }))
    }

    /// Loads the newest checkpoint when it is newer than the served one; returns whether it
    /// switched.
    pub async fn refresh(&mut self, engine: &EngineHandle) -> Result<bool> {
        let Some(v) = self.newest().await? else { return Ok(false) };
        let current = engine.model().map(|m| m.version.step);
        if current.is_some_and(|s| s >= v.step) {
            return Ok(false);
        }
        let (dir, dtype) = (PathBuf::from(&v.path), engine.dtype());
        let model = tokio::task::spawn_blocking(move || ServedModel::load(&dir, v, dtype))
            .await
            .map_err(|e| InferenceError::Coordinator(format!("loading task: {e}")))??;
        engine.set_model(Arc::new(model));
        Ok(true)
    }

    /// Polls every `every` until the process ends; errors are logged and retried.
    pub async fn follow(mut self, engine: EngineHandle, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.refresh(&engine).await {
                tracing::warn!(error = %e, job = %self.job, "checking for a newer checkpoint");
            }
        }
    }
}
