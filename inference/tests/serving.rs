//! The serving role end to end over gRPC, on a tiny random model: batching does not change
//! seeded output, served output equals local generation, cancellation frees a slot, the queue
//! is bounded, bad parameters are named, and a newly published checkpoint is picked up while
//! a request keeps the weights it started with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrite_data::Tokenizer;
use ferrite_inference::metrics::Metrics;
use ferrite_inference::rpc::coordinator::CheckpointWatch;
use ferrite_inference::{Engine, EngineConfig, EngineHandle, ModelVersion, ServedModel};
use ferrite_kernels::CpuBackend;
use ferrite_model::checkpoint::{self, TrainerState};
use ferrite_model::generate::{Generator, WeightDtype};
use ferrite_model::sample::SamplingParams;
use ferrite_model::{Gpt, GptConfig, JobSpec};
use ferrite_proto::v1 as pb;
use pb::inference_service_client::InferenceServiceClient;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const CORPUS: &str = "the quick brown fox jumps over the lazy dog. ";

const JOB: &str = r#"
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 48
[data]
dir = "data"
[train]
batch_size = 1
max_steps = 1
[output]
dir = "out"
"#;

/// A checkpoint of a random model (weights scaled up so outputs vary) under `root`.
fn checkpoint(root: &Path, step: u64, seed: u64) -> PathBuf {
    let tok = Tokenizer::by_name("char", [CORPUS]).unwrap();
    std::fs::create_dir_all(root).unwrap();
    let tok_path = root.join("tokenizer.json");
    tok.save(&tok_path).unwrap();
    let cfg = GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        block_size: 48,
        vocab_size: tok.vocab_size(),
    };
    let be = CpuBackend::new(1).unwrap();
    let mut gpt = Gpt::new(&be, cfg, 1, 48).unwrap();
    gpt.init_gpt2(&be, seed).unwrap();
    gpt.params.iter_mut().for_each(|x| *x *= 12.0);
    let state = TrainerState {
        step,
        data_position: step,
        seed,
        val_loss: None,
        job: JobSpec::parse(JOB).unwrap(),
    };
    checkpoint::save(&be, &gpt, &state, &tok_path, &root.join("checkpoints")).unwrap()
}

fn load(dir: &Path, step: u64) -> Arc<ServedModel> {
    let v = ModelVersion { job_id: "job-1".into(), step, path: dir.display().to_string() };
    Arc::new(ServedModel::load(dir, v, WeightDtype::F32).unwrap())
}

fn engine(model: Option<Arc<ServedModel>>, cfg: EngineConfig) -> Engine {
    Engine::start(cfg, model, Arc::new(Metrics::default())).unwrap()
}

fn small(max_batch: usize, max_queue: usize) -> EngineConfig {
    EngineConfig {
        max_batch,
        max_queue,
        kv_cache_bytes: 64 << 20,
        prefill_chunk: 5,
        threads: 2,
        dtype: WeightDtype::F32,
    }
}

/// Serves `engine` over gRPC on a free port and returns a connected client.
async fn serve(engine: EngineHandle) -> InferenceServiceClient<Channel> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let insecure = ferrite_security::ServerSecurity::insecure();
    tokio::spawn(ferrite_inference::rpc::run(listener, engine, insecure, std::future::pending()));
    InferenceServiceClient::connect(format!("http://{addr}")).await.unwrap()
}

fn request(prompt: &str, max_tokens: u32, temperature: f32, seed: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(prompt.into())),
        max_tokens,
        temperature: Some(temperature),
        top_k: 0,
        top_p: Some(1.0),
        seed,
        stop: vec![],
        logprobs: true,
        truncate_prompt: false,
    }
}

fn requests() -> Vec<pb::GenerateRequest> {
    vec![
        request("the quick", 30, 0.9, 1),
        request("lazy dog", 40, 0.0, 0),
        request("fox jumps over the lazy dog. the quick brown", 25, 1.2, 7),
        pb::GenerateRequest { top_k: 5, top_p: Some(0.8), ..request("o", 60, 1.0, 3) },
        request("the", 12, 0.7, 1),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_seeded_requests_match_one_by_one_and_local_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), 5, 1);
    let e = engine(Some(load(&dir, 5)), small(8, 16));
    let client = serve(e.handle()).await;

    let mut alone = Vec::new();
    for r in requests() {
        alone.push(client.clone().generate(r).await.unwrap().into_inner());
    }
    let together = futures_join(client.clone(), requests()).await;
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}: batched tokens differ");
        assert_eq!(a.text, b.text, "request {i}");
        assert_eq!(a.logprobs, b.logprobs, "request {i}: logprobs differ");
        assert_eq!(a.model.as_ref().unwrap().step, 5);
    }
    assert_eq!(alone[1].finish_reason, pb::FinishReason::Length as i32);

    // A stop sequence taken from inside a text cuts that text at its first occurrence.
    let full = &alone[0].text;
    let stop: String = full.chars().skip(6).take(2).collect();
    let cut = full.find(&stop).unwrap();
    let r = pb::GenerateRequest { stop: vec![stop.clone()], ..requests()[0].clone() };
    let stopped = client.clone().generate(r).await.unwrap().into_inner();
    assert_eq!(stopped.text, full[..cut], "stop {stop:?}");
    assert_eq!(stopped.finish_reason, pb::FinishReason::Stop as i32);
    assert_eq!(stopped.tokens[..], alone[0].tokens[..stopped.tokens.len()]);
    assert!(stopped.tokens.len() <= cut + 1);

    // The local generator (what `ferrite generate` runs) samples the same tokens.
    for (i, ids) in local_tokens(&dir, WeightDtype::F32).iter().enumerate() {
        assert_eq!(*ids, alone[i].tokens, "request {i}: served differs from local");
    }
}

/// The tokens the local generator (what `ferrite generate` runs) samples for `requests()`.
fn local_tokens(dir: &Path, dtype: WeightDtype) -> Vec<Vec<u32>> {
    let tok = Tokenizer::load(&dir.join("tokenizer.json")).unwrap();
    let mut local = Generator::from_checkpoint(dir, 1, dtype).unwrap();
    let mut all = Vec::new();
    for r in requests() {
        let Some(pb::generate_request::Prompt::Text(text)) = &r.prompt else { unreachable!() };
        let p = SamplingParams {
            temperature: r.temperature.unwrap(),
            top_k: r.top_k as usize,
            top_p: r.top_p.unwrap(),
            seed: r.seed,
        };
        let out = local.generate(&tok.encode(text).unwrap(), r.max_tokens as usize, &p, |_| true);
        all.push(out.unwrap().iter().map(|s| s.token).collect());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_f16_weights_matches_local_f16_generation_and_batching() {
    served_matches_local(WeightDtype::F16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_bf16_weights_matches_local_bf16_generation_and_batching() {
    if !ferrite_kernels::cpu::amx::available() {
        eprintln!("skipped: this CPU has no AMX-BF16, which bf16 weights need");
        return;
    }
    served_matches_local(WeightDtype::Bf16).await;
}

/// Concurrent requests served on `dtype` weights (batched into shared steps) sample what
/// the local generator samples for each alone.
async fn served_matches_local(dtype: WeightDtype) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), 5, 1);
    let v = ModelVersion { job_id: "job-1".into(), step: 5, path: dir.display().to_string() };
    let model = Arc::new(ServedModel::load(&dir, v, dtype).unwrap());
    assert_eq!(model.model.dtype(), dtype);
    let e = engine(Some(model), EngineConfig { dtype, ..small(8, 16) });
    let client = serve(e.handle()).await;
    let together = futures_join(client.clone(), requests()).await;
    for (i, ids) in local_tokens(&dir, dtype).iter().enumerate() {
        assert_eq!(*ids, together[i].tokens, "request {i}: served {dtype} differs from local");
    }
}

async fn futures_join(
    client: InferenceServiceClient<Channel>,
    reqs: Vec<pb::GenerateRequest>,
) -> Vec<pb::GenerateResponse> {
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(r).await.unwrap().into_inner() })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_frees_its_slot_and_a_full_queue_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), 1, 2);
    // One slot, one queue place.
    let e = engine(Some(load(&dir, 1)), small(1, 1));
    let mut client = serve(e.handle()).await;

    // A long stream takes the slot.
    let mut long =
        client.generate_stream(request("the", 60_000, 1.0, 1)).await.unwrap().into_inner();
    assert_eq!(long.message().await.unwrap().unwrap().tokens.len(), 1, "the stream is running");
    let metrics = e.handle().metrics().clone();
    // The next request waits in the queue; one more is refused.
    let mut queued_client = client.clone();
    let queued =
        tokio::spawn(async move { queued_client.generate(request("dog", 5, 0.0, 0)).await });
    wait_for(|| metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed) == 1).await;
    let full = client.generate(request("fox", 5, 0.0, 0)).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("queue"), "{}", full.message());

    // Cancelling the stream frees the slot: the queued request runs and completes.
    drop(long);
    let done = tokio::time::timeout(Duration::from_secs(20), queued).await.unwrap().unwrap();
    assert_eq!(done.unwrap().into_inner().tokens.len(), 5);
}

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached in 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_rejected_naming_the_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), 1, 3);
    let e = engine(Some(load(&dir, 1)), small(4, 4));
    let mut client = serve(e.handle()).await;
    let cases = [
        ("top_p", pb::GenerateRequest { top_p: Some(0.0), ..request("a", 5, 1.0, 0) }),
        ("top_p", pb::GenerateRequest { top_p: Some(1.5), ..request("a", 5, 1.0, 0) }),
        ("temperature", request("a", 5, -1.0, 0)),
        ("temperature", request("a", 5, f32::NAN, 0)),
        ("max_tokens", request("a", 0, 1.0, 0)),
        ("max_tokens", request("a", 1_000_000, 1.0, 0)),
        ("prompt", pb::GenerateRequest { prompt: None, ..request("a", 5, 1.0, 0) }),
        ("prompt", request(&"the lazy dog ".repeat(10), 5, 1.0, 0)),
        (
            "prompt",
            pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::Tokens(pb::TokenIds { ids: vec![999] })),
                ..request("", 5, 1.0, 0)
            },
        ),
        ("stop", pb::GenerateRequest { stop: vec!["x".into(); 17], ..request("a", 5, 1.0, 0) }),
    ];
    for (field, r) in cases {
        let s = client.generate(r.clone()).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
        assert!(s.message().starts_with(field), "{field}: {}", s.message());
        let s = client.generate_stream(r).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{field} (stream): {s:?}");
    }
    // The too-long prompt is accepted when the request asks to truncate it.
    let long = pb::GenerateRequest {
        truncate_prompt: true,
        ..request(&"the lazy dog ".repeat(10), 5, 1.0, 0)
    };
    let ok = client.generate(long).await.unwrap().into_inner();
    assert_eq!((ok.tokens.len(), ok.prompt_tokens.len()), (5, 130));
    // A deadline that passes mid-generation ends the request with DeadlineExceeded.
    let mut r = Request::new(request("the", 60_000, 1.0, 0));
    r.set_timeout(Duration::from_millis(300));
    let mut s = client.generate_stream(r).await.unwrap().into_inner();
    let err = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a 60000-token stream ended within its deadline"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled), "{err:?}");
}

/// A coordinator's `JobService` that only lists the checkpoints the test publishes.
#[derive(Clone, Default)]
struct FakeCoordinator {
    published: Arc<Mutex<Vec<pb::Checkpoint>>>,
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for FakeCoordinator {
    async fn submit_job(&self, _: Request<pb::SubmitJobRequest>) -> Reply<pb::SubmitJobResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_job(&self, _: Request<pb::GetJobRequest>) -> Reply<pb::GetJobResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_jobs(&self, _: Request<pb::ListJobsRequest>) -> Reply<pb::ListJobsResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn cancel_job(&self, _: Request<pb::CancelJobRequest>) -> Reply<pb::CancelJobResponse> {
        Err(Status::unimplemented("fake"))
    }
    type WatchJobStream = tokio_stream::Empty<Result<pb::WatchJobResponse, Status>>;
    async fn watch_job(&self, _: Request<pb::WatchJobRequest>) -> Reply<Self::WatchJobStream> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Reply<pb::ListCheckpointsResponse> {
        if req.into_inner().job_id != "job-1" {
            return Err(Status::not_found("no such job"));
        }
        let checkpoints = self.published.lock().unwrap().clone();
        Ok(Response::new(pb::ListCheckpointsResponse { checkpoints }))
    }
}

fn published(dir: &Path, step: u64) -> pb::Checkpoint {
    pb::Checkpoint {
        job_id: "job-1".into(),
        step,
        path: dir.display().to_string(),
        val_loss: None,
        created_unix_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_to_a_newly_published_checkpoint_while_a_request_keeps_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let old = checkpoint(&tmp.path().join("a"), 10, 4);
    let new = checkpoint(&tmp.path().join("b"), 20, 5);
    let coord = FakeCoordinator::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let svc = pb::job_service_server::JobServiceServer::new(coord.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let e = engine(None, small(4, 4));
    let mut client = serve(e.handle()).await;
    let none = ferrite_security::Credentials::none();
    let mut watch = CheckpointWatch::connect(&url, "job-1", none).await.unwrap();
    // Nothing published yet: requests are NotFound.
    assert!(!watch.refresh(&e.handle()).await.unwrap());
    let s = client.generate(request("the", 5, 0.0, 0)).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");

    coord.published.lock().unwrap().push(published(&old, 10));
    assert!(watch.refresh(&e.handle()).await.unwrap());
    let reference = client.generate(request("the", 150, 1.0, 9)).await.unwrap().into_inner();
    assert_eq!(reference.model.as_ref().unwrap().step, 10);

    // A long request starts on step 10 ...
    let long = request("the", 60_000, 1.0, 9);
    let mut stream = client.generate_stream(long).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.model.as_ref().unwrap().step, 10);
    // ... step 20 is published and picked up while it runs ...
    coord.published.lock().unwrap().push(published(&new, 20));
    assert!(watch.refresh(&e.handle()).await.unwrap());
    let after = client.generate(request("the", 150, 1.0, 9)).await.unwrap().into_inner();
    assert_eq!(after.model.as_ref().unwrap().step, 20);
    assert_ne!(after.tokens, reference.tokens, "new weights, new text");
    // ... and the long request still runs on step 10, token for token as it would alone.
    let mut tokens = first.tokens.clone();
    while tokens.len() < reference.tokens.len() {
        let c = stream.message().await.unwrap().expect("still running");
        assert_eq!(c.model.as_ref().unwrap().step, 10);
        tokens.extend(c.tokens);
    }
    assert_eq!(tokens[..reference.tokens.len()], reference.tokens[..]);
}
