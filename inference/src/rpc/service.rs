//! `InferenceService` handlers over the [`EngineHandle`], and the server's [`run`].

use std::future::Future;
use std::pin::Pin;

use ferrite_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use super::convert;
use ferrite_security::{AuthLayer, ServerSecurity};

use crate::engine::EngineHandle;
use crate::error::{InferenceError, Result};
use crate::request::{Event, GenerateRequest};

pub struct InferenceApi {
    engine: EngineHandle,
}

impl InferenceApi {
    pub fn new(engine: EngineHandle) -> Self {
        InferenceApi { engine }
    }
}

fn domain_request(req: Request<pb::GenerateRequest>) -> Result<GenerateRequest, Status> {
    let timeout = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(convert::grpc_timeout);
    Ok(convert::request(req.into_inner(), timeout)?)
}

type ChunkStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::inference_service_server::InferenceService for InferenceApi {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let req = domain_request(req)?;
        let c = self.engine.generate(req).await?;
        Ok(Response::new(convert::completion(c)))
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = domain_request(req)?;
        let mut events = self.engine.submit(req)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let (mut model, mut prompt) = (None, Vec::new());
            while let Some(ev) = events.recv().await {
                let chunk = match ev {
                    Event::Started { model: m, prompt_tokens } => {
                        (model, prompt) = (Some(convert::version(&m)), prompt_tokens);
                        continue;
                    }
                    Event::Piece { text, tokens, logprobs } => Ok(pb::GenerateChunk {
                        text,
                        tokens,
                        logprobs,
                        model: model.clone(),
                        finish_reason: pb::FinishReason::Unspecified as i32,
                        prompt_tokens: std::mem::take(&mut prompt),
                        kept_tokens: 0,
                    }),
                    Event::Done { finish, kept_tokens } => Ok(pb::GenerateChunk {
                        model: model.clone(),
                        finish_reason: convert::finish(finish) as i32,
                        kept_tokens: kept_tokens as u32,
                        ..Default::default()
                    }),
                    Event::Failed(f) => Err(Status::from(InferenceError::from(f))),
                };
                // A closed stream (the client went away) drops `events`: the engine frees
                // the slot at its next step.
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Largest request accepted (a prompt of a few hundred thousand tokens' text).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Most concurrent calls (HTTP/2 streams) one client connection may have open.
pub const MAX_STREAMS_PER_CLIENT: u32 = 64;

/// Serves `InferenceService`, health and reflection until `shutdown` completes, with TLS and
/// tokens as `security` says.
pub async fn run(
    listener: TcpListener,
    engine: EngineHandle,
    security: ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    type Server = pb::inference_service_server::InferenceServiceServer<InferenceApi>;
    health.set_serving::<Server>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| InferenceError::Coordinator(format!("reflection service: {e}")))?;
    let signal = async move {
        shutdown.await;
        health.set_not_serving::<Server>().await;
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &security.tls {
        let config = tls.tonic().map_err(|e| InferenceError::Coordinator(e.to_string()))?;
        builder = builder
            .tls_config(config)
            .map_err(|e| InferenceError::Coordinator(format!("TLS: {e}")))?;
    }
    let api = Server::new(InferenceApi::new(engine)).max_decoding_message_size(MAX_MESSAGE_BYTES);
    builder
        .max_concurrent_streams(MAX_STREAMS_PER_CLIENT)
        .layer(AuthLayer::new(security.verifier.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
        .await
        .map_err(|e| InferenceError::Coordinator(format!("grpc server: {e}")))
}
