//! `WorkerService` in-process, with generated clients standing in for GPU workers: the NCCL
//! rendezvous (rank 0's unique id relayed to the other ranks of its attempt) and what a
//! malformed id gets. No GPU is needed: the coordinator only moves the id's bytes.

mod common;

use std::time::Duration;

use common::server::Harness;
use ferrite_proto::v1 as pb;
use pb::coordinator_message::Body as Down;
use pb::worker_message::Body as Up;
use pb::worker_service_client::WorkerServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

/// A registered worker's `Attach` stream, driven by hand.
struct FakeWorker {
    id: String,
    up: mpsc::UnboundedSender<pb::WorkerMessage>,
    down: Streaming<pb::CoordinatorMessage>,
}

impl FakeWorker {
    async fn register(client: &mut WorkerServiceClient<Channel>, port: u16) -> String {
        let capabilities = pb::WorkerCapabilities {
            device_kind: pb::DeviceKind::Cuda as i32,
            device_count: 1,
            memory_bytes: 80 << 30,
            threads: 1,
            collective_addr: format!("127.0.0.1:{port}"),
            hostname: format!("gpu-{port}"),
        };
        let req = pb::RegisterWorkerRequest { capabilities: Some(capabilities) };
        client.register_worker(req).await.unwrap().into_inner().worker_id
    }

    /// Attaches as `id`; `running` names the rank it still runs (a reattach).
    async fn attach(
        client: &mut WorkerServiceClient<Channel>,
        id: &str,
        running: Option<&pb::Assignment>,
    ) -> FakeWorker {
        let (up, rx) = mpsc::unbounded_channel();
        let mut hello = pb::AttachHello { worker_id: id.into(), ..Default::default() };
        if let Some(a) = running {
            (hello.job_id, hello.attempt, hello.rank) = (a.job_id.clone(), a.attempt, a.rank);
        }
        up.send(pb::WorkerMessage { body: Some(Up::Hello(hello)) }).unwrap();
        let down = client.attach(UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
        FakeWorker { id: id.into(), up, down }
    }

    fn send(&self, body: Up) {
        self.up.send(pb::WorkerMessage { body: Some(body) }).unwrap();
    }

    /// The next message other than a heartbeat acknowledgement, if one comes `within`. Sends
    /// a heartbeat first, so a slow test run never loses the worker.
    async fn next(&mut self, within: Duration) -> Option<Result<Down, tonic::Status>> {
        let _ = self.up.send(pb::WorkerMessage {
            body: Some(Up::Heartbeat(pb::Heartbeat { sent_unix_ms: 1 })),
        });
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.down.next()).await.ok()??;
            match msg.map(|m| m.body) {
                Ok(Some(Down::HeartbeatAck(_))) | Ok(None) => continue,
                Ok(Some(body)) => return Some(Ok(body)),
                Err(status) => return Some(Err(status)),
            }
        }
    }

    async fn assignment(&mut self) -> pb::Assignment {
        match self.next(Duration::from_secs(20)).await {
            Some(Ok(Down::Assignment(a))) => a,
            other => panic!("{}: expected an assignment, got {other:?}", self.id),
        }
    }

    async fn rendezvous(&mut self) -> pb::Rendezvous {
        match self.next(Duration::from_secs(10)).await {
            Some(Ok(Down::Rendezvous(r))) => r,
            other => panic!("{}: expected a rendezvous, got {other:?}", self.id),
        }
    }

    /// Nothing but heartbeat acknowledgements for a while.
    async fn hears_nothing(&mut self) {
        if let Some(msg) = self.next(Duration::from_millis(500)).await {
            panic!("{}: expected nothing, got {msg:?}", self.id);
        }
    }
}

fn nccl_id(a: &pb::Assignment, id: Vec<u8>) -> Up {
    Up::NcclId(pb::NcclUniqueId { job_id: a.job_id.clone(), attempt: a.attempt, id })
}

#[tokio::test]
async fn rank_0s_nccl_id_reaches_every_other_rank_of_its_attempt() {
    let mut h = Harness::start().await;
    let mut client = WorkerServiceClient::new(h.channel.clone());
    let mut workers = Vec::new();
    for port in [7001, 7002, 7003] {
        let id = FakeWorker::register(&mut client, port).await;
        workers.push(FakeWorker::attach(&mut client, &id, None).await);
    }
    let toml = h.job_toml().replace("workers = 2", "workers = 3");
    let spec = pb::JobSpec { toml, device: pb::DeviceKind::Cuda as i32, ..h.spec() };
    let job = h.submit(spec).await.unwrap();

    let mut ranks = Vec::new();
    for w in &mut workers {
        ranks.push(w.assignment().await);
    }
    assert!(ranks.iter().all(|a| a.job_id == job.id && a.world_size == 3));
    // Index workers by rank.
    let mut by_rank: Vec<(pb::Assignment, FakeWorker)> = ranks.into_iter().zip(workers).collect();
    by_rank.sort_by_key(|(a, _)| a.rank);
    let [(a0, mut w0), (a1, mut w1), (a2, mut w2)]: [_; 3] = by_rank.try_into().ok().unwrap();

    // A rank other than 0 cannot set the id.
    w1.send(nccl_id(&a1, vec![0xee; pb::NCCL_UNIQUE_ID_BYTES]));
    w2.hears_nothing().await;

    let id: Vec<u8> = (0..pb::NCCL_UNIQUE_ID_BYTES).map(|i| (i * 31 + 5) as u8).collect();
    w0.send(nccl_id(&a0, id.clone()));
    for (a, w) in [(&a1, &mut w1), (&a2, &mut w2)] {
        let r = w.rendezvous().await;
        assert_eq!((r.job_id.as_str(), r.attempt), (a.job_id.as_str(), a.attempt));
        assert_eq!(r.nccl_unique_id, id, "rank {} got other bytes", a.rank);
    }
    w0.hears_nothing().await;

    // A worker that reattaches naming its rank (its old stream went quiet, or this is a
    // restarted coordinator that rank 0 has already told again) is told again.
    let mut again = FakeWorker::attach(&mut client, &w1.id, Some(&a1)).await;
    assert_eq!(again.rendezvous().await.nccl_unique_id, id);
    drop(w1);
}

#[tokio::test]
async fn a_malformed_nccl_id_ends_the_stream_naming_the_field() {
    let h = Harness::start().await;
    let mut client = WorkerServiceClient::new(h.channel.clone());
    let id = FakeWorker::register(&mut client, 7001).await;
    let mut w = FakeWorker::attach(&mut client, &id, None).await;
    let short = pb::NcclUniqueId { job_id: "job-000001".into(), attempt: 1, id: vec![1; 100] };
    w.send(Up::NcclId(short));
    match w.next(Duration::from_secs(10)).await {
        Some(Err(status)) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("`nccl_id.id`"), "{}", status.message());
            assert!(status.message().contains("128 bytes, got 100"), "{}", status.message());
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}
