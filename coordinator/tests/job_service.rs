//! The coordinator's gRPC server in-process on 127.0.0.1:0 with an embedded store, driven by
//! generated clients: `JobService`, health and reflection on one port.

mod common;

use common::server::{assert_invalid, Harness};
use ferrite_coordinator::{Checkpoint, JobId};
use ferrite_proto::v1 as pb;
use pb::watch_job_response::Event;
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test]
async fn submit_takes_cluster_fields_from_the_file_and_wire_overrides() {
    let mut h = Harness::start().await;
    let job = h.submit(h.spec()).await.unwrap();
    let spec = job.spec.unwrap();
    assert_eq!(job.state, pb::JobState::Queued as i32);
    // The model's default `min_workers` is 1.
    assert_eq!((spec.workers, spec.min_workers, spec.priority), (2, 1, 1));
    assert_eq!(spec.kind, pb::JobKind::Pretrain as i32);
    assert_eq!(spec.toml, h.job_toml(), "the job file is stored untouched");

    let wire = pb::JobSpec {
        name: "renamed".into(),
        priority: 9,
        workers: 2,
        device: pb::DeviceKind::Cpu as i32,
        ..h.spec()
    };
    let spec = h.submit(wire).await.unwrap().spec.unwrap();
    assert_eq!((spec.name.as_str(), spec.priority), ("renamed", 9));
    assert_eq!(spec.device, pb::DeviceKind::Cpu as i32);
}

#[tokio::test]
async fn every_rejected_request_names_its_field_and_stores_nothing() {
    let mut h = Harness::start().await;
    let req = pb::SubmitJobRequest { spec: None };
    assert_invalid(h.client.submit_job(req).await, "spec");
    let empty = pb::JobSpec { toml: " ".into(), ..h.spec() };
    assert_invalid(h.submit(empty).await, "spec.toml");
    let disagrees = pb::JobSpec { workers: 3, ..h.spec() };
    assert_invalid(h.submit(disagrees).await, "spec.workers");
    let finetune = pb::JobSpec { kind: pb::JobKind::Finetune as i32, ..h.spec() };
    assert_invalid(h.submit(finetune).await, "spec.kind");
    let device = pb::JobSpec { device: 7, ..h.spec() };
    assert_invalid(h.submit(device).await, "spec.device");
    let heads = pb::JobSpec { toml: h.job_toml().replace("n_head = 4", "n_head = 3"), ..h.spec() };
    assert_invalid(h.submit(heads).await, "model.n_embd");
    assert!(h.list(vec![]).await.is_empty(), "a rejected job was stored");

    let get = pb::GetJobRequest { job_id: "42".into() };
    assert_invalid(h.client.get_job(get).await, "job_id");
    let list = pb::ListJobsRequest { states: vec![0] };
    assert_invalid(h.client.list_jobs(list).await, "states");
    let cancel = pb::CancelJobRequest { job_id: "job-000001".into(), reason: "x".repeat(5000) };
    assert_invalid(h.client.cancel_job(cancel).await, "reason");
    let ckpts = pb::ListCheckpointsRequest { job_id: String::new() };
    assert_invalid(h.client.list_checkpoints(ckpts).await, "job_id");
    let watch = pb::WatchJobRequest { job_id: "job-x".into(), include_metrics: false };
    assert_invalid(h.client.watch_job(watch).await, "job_id");

    let missing = pb::GetJobRequest { job_id: "job-000077".into() };
    let status = h.client.get_job(missing).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn list_filters_by_state_and_cancel_of_a_finished_job_fails() {
    let mut h = Harness::start().await;
    let a = h.submit(h.spec()).await.unwrap();
    let b = h.submit(h.spec()).await.unwrap();
    let cancel = pb::CancelJobRequest { job_id: a.id.clone(), reason: String::new() };
    let cancelled = h.client.cancel_job(cancel.clone()).await.unwrap();
    let cancelled = cancelled.into_inner().job.unwrap();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    assert_eq!(cancelled.reason, "cancelled by operator");
    let again = h.client.cancel_job(cancel).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);

    let ids = |jobs: Vec<pb::Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let queued = h.list(vec![pb::JobState::Queued as i32]).await;
    assert_eq!(ids(queued), vec![b.id.clone()]);
    assert_eq!(ids(h.list(vec![]).await), vec![a.id, b.id]);
}

#[tokio::test]
async fn checkpoints_are_listed_by_step() {
    let mut h = Harness::start().await;
    let job = h.submit(h.spec()).await.unwrap();
    for step in [200, 100] {
        let ckpt = Checkpoint {
            job_id: JobId::parse(&job.id).unwrap(),
            step,
            path: format!("/ckpt/{step}"),
            val_loss: Some(1.5),
            created_unix_ms: 0,
        };
        h.deps.checkpoints.record(ckpt).await.unwrap();
    }
    let req = pb::ListCheckpointsRequest { job_id: job.id.clone() };
    let list = h.client.list_checkpoints(req).await.unwrap().into_inner();
    let steps: Vec<_> = list.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![100, 200]);
    let unknown = pb::ListCheckpointsRequest { job_id: "job-000099".into() };
    let status = h.client.list_checkpoints(unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn watch_streams_snapshot_then_changes_and_ends_at_a_terminal_state() {
    let mut h = Harness::start().await;
    let job = h.submit(h.spec()).await.unwrap();
    let req = pb::WatchJobRequest { job_id: job.id.clone(), include_metrics: true };
    let mut events = h.client.watch_job(req).await.unwrap().into_inner();
    match events.next().await.unwrap().unwrap().event {
        Some(Event::Snapshot(j)) => assert_eq!(j.state, pb::JobState::Queued as i32),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    let id = JobId::parse(&job.id).unwrap();
    h.deps.jobs.note(&id, "waiting for 2 cpu workers").await.unwrap();
    match events.next().await.unwrap().unwrap().event {
        Some(Event::Snapshot(j)) => assert_eq!(j.reason, "waiting for 2 cpu workers"),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    h.deps.jobs.cancel(&id, "enough").await.unwrap();
    match events.next().await.unwrap().unwrap().event {
        Some(Event::StateChange(c)) => {
            assert_eq!(c.from, pb::JobState::Queued as i32);
            assert_eq!(c.to, pb::JobState::Cancelled as i32);
            assert_eq!(c.reason, "enough");
        }
        other => panic!("expected a state change, got {other:?}"),
    }
    assert!(events.next().await.is_none(), "the stream ends after Cancelled");
}

#[tokio::test]
async fn shutdown_ends_open_watches_and_the_server_returns() {
    let mut h = Harness::start().await;
    let job = h.submit(h.spec()).await.unwrap();
    let req = pb::WatchJobRequest { job_id: job.id, include_metrics: false };
    let mut events = h.client.watch_job(req).await.unwrap().into_inner();
    events.next().await.unwrap().unwrap();
    h.stop.take().unwrap().send(()).unwrap();
    let end = events.next().await;
    assert!(matches!(&end, None | Some(Err(_))), "stream kept going: {end:?}");
    let served = tokio::time::timeout(std::time::Duration::from_secs(10), h.served).await;
    served.expect("server returned").unwrap().unwrap();
}

#[tokio::test]
async fn health_and_reflection_answer_on_the_same_port() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let h = Harness::start().await;
    let mut health = HealthClient::new(h.channel.clone());
    for service in ["", "ferrite.v1.JobService"] {
        let req = HealthCheckRequest { service: service.into() };
        let status = health.check(req).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(h.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies =
        reflection.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("expected a service list, got {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["ferrite.v1.JobService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
}
