//! Finds a job's newest published checkpoint through the coordinator's
//! `JobService.ListCheckpoints`, and keeps the engine on the newest one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferrite_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::engine::{EngineHandle, ServedModel};
use crate::error::{InferenceError, Result};
use crate::request::ModelVersion;

/// A coordinator connection for one job.
pub struct CheckpointWatch {
    client: JobServiceClient<Channel>,
    job: String,
}

impl CheckpointWatch {
    pub async fn connect(url: &str, job: &str) -> Result<Self> {
        if job.is_empty() {
            return Err(InferenceError::invalid("job", "is empty"));
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| InferenceError::invalid("coordinator", format!("`{url}`: {e}")))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| InferenceError::Coordinator(format!("{url} is unreachable: {e}")))?;
        Ok(CheckpointWatch { client: JobServiceClient::new(channel), job: job.to_string() })
    }

    /// The job's newest published checkpoint, if any.
    pub async fn newest(&mut self) -> Result<Option<ModelVersion>> {
        let req = pb::ListCheckpointsRequest { job_id: self.job.clone() };
        let resp = self.client.list_checkpoints(req).await.map_err(|s| match s.code() {
            tonic::Code::NotFound => InferenceError::NotFound(s.message().to_string()),
            _ => InferenceError::Coordinator(s.message().to_string()),
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
        let dir = PathBuf::from(&v.path);
        let model = tokio::task::spawn_blocking(move || ServedModel::load(&dir, v))
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
