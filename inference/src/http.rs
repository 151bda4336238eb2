//! The HTTP edge (axum): an OpenAI-compatible `POST /v1/completions` (with server-sent events
//! when `stream` is true) and Prometheus `GET /metrics`.

use std::convert::Infallible;
use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ferrite_model::generate::LongPrompt;
use ferrite_model::sample::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::engine::EngineHandle;
use crate::error::{InferenceError, Result};
use crate::request::{Event, FinishReason, GenerateRequest, ModelVersion, Prompt};

/// Serves until `shutdown` completes, with TLS and tokens as `security` says.
pub async fn run(
    listener: TcpListener,
    engine: EngineHandle,
    security: ferrite_security::ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/metrics", get(metrics))
        .with_state(engine);
    ferrite_security::http::serve(listener, app, &security, shutdown)
        .await
        .map_err(|e| InferenceError::Coordinator(format!("http server: {e}")))
}

async fn metrics(State(engine): State<EngineHandle>) -> Response {
    let body = engine.metrics().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The body of `/v1/completions`; unknown fields are ignored, as OpenAI's clients send many.
#[derive(Deserialize)]
struct CompletionBody {
    #[serde(default)]
    model: Option<String>,
    prompt: Option<Value>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    logprobs: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    truncate_prompt: bool,
}

fn error(e: InferenceError) -> Response {
    let (status, kind, param) = match &e {
        InferenceError::InvalidArgument { field, .. } => {
            (StatusCode::BAD_REQUEST, "invalid_request_error", Some(*field))
        }
        InferenceError::ResourceExhausted(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit", None),
        InferenceError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
        InferenceError::DeadlineExceeded(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout", None),
        InferenceError::ShuttingDown | InferenceError::Coordinator(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None)
        }
        InferenceError::Tokenizer(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
        InferenceError::Model(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
    };
    let body = json!({"error": {"message": e.to_string(), "type": kind, "param": param}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn parse(body: &[u8]) -> Result<(GenerateRequest, bool, String)> {
    let b: CompletionBody = serde_json::from_slice(body)
        .map_err(|e| InferenceError::invalid("body", format!("not a completions request: {e}")))?;
    if b.n.is_some_and(|n| n != 1) {
        return Err(InferenceError::invalid("n", "only n = 1 is supported"));
    }
    let prompt = match b.prompt {
        None => Prompt::Text(String::new()),
        Some(Value::String(s)) => Prompt::Text(s),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(a)) if a.iter().all(|v| v.is_u64()) => Prompt::Tokens(
            a.iter().map(|v| v.as_u64().unwrap_or(0).min(u32::MAX as u64) as u32).collect(),
        ),
        Some(_) => {
            return Err(InferenceError::invalid(
                "prompt",
                "must be a string, one string in a list, or a list of token ids",
            ))
        }
    };
    let stop = match b.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) if a.iter().all(|v| v.is_string()) => {
            a.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect()
        }
        Some(_) => return Err(InferenceError::invalid("stop", "must be a string or strings")),
    };
    let req = GenerateRequest {
        prompt,
        max_tokens: b.max_tokens.unwrap_or(16).min(usize::MAX as u64) as usize,
        sampling: SamplingParams {
            temperature: b.temperature.unwrap_or(1.0),
            top_k: b.top_k.unwrap_or(0) as usize,
            top_p: b.top_p.unwrap_or(1.0),
            seed: b.seed.unwrap_or(0),
        },
        stop,
        logprobs: b.logprobs.is_some(),
        long_prompt: if b.truncate_prompt { LongPrompt::Truncate } else { LongPrompt::Refuse },
        deadline: None,
    };
    req.validate()?;
    Ok((req, b.stream, b.model.unwrap_or_default()))
}

fn model_name(asked: &str, v: &ModelVersion) -> String {
    if !asked.is_empty() {
        return asked.to_string();
    }
    match v.job_id.is_empty() {
        true => v.path.clone(),
        false => format!("{}@{}", v.job_id, v.step),
    }
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn completions(State(engine): State<EngineHandle>, body: Bytes) -> Response {
    let (req, stream, asked) = match parse(&body) {
        Ok(p) => p,
        Err(e) => return error(e),
    };
    let created = unix_now();
    let id = format!(
        "cmpl-{created}-{}",
        engine.metrics().requests.load(std::sync::atomic::Ordering::Relaxed)
    );
    if !stream {
        return match engine.generate(req).await {
            Ok(c) => {
                let logprobs = (!c.logprobs.is_empty())
                    .then(|| json!({"tokens": c.tokens, "token_logprobs": c.logprobs}));
                let body = json!({
                    "id": id, "object": "text_completion", "created": created,
                    "model": model_name(&asked, &c.model),
                    "checkpoint": {"job_id": c.model.job_id, "step": c.model.step},
                    "choices": [{"text": c.text, "index": 0, "logprobs": logprobs,
                        "finish_reason": finish_name(c.finish)}],
                    "usage": {"prompt_tokens": c.prompt_tokens.len(),
                        "completion_tokens": c.tokens.len(),
                        "total_tokens": c.prompt_tokens.len() + c.tokens.len()},
                });
                ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
            }
            Err(e) => error(e),
        };
    }
    let events = match engine.submit(req) {
        Ok(rx) => rx,
        Err(e) => return error(e),
    };
    let mut model = String::new();
    let mut checkpoint = json!(null);
    let sse = tokio_stream::wrappers::UnboundedReceiverStream::new(events).filter_map(move |ev| {
        let data = match ev {
            Event::Started { model: m, .. } => {
                model = model_name(&asked, &m);
                checkpoint = json!({"job_id": m.job_id, "step": m.step});
                return None;
            }
            Event::Piece { text, tokens, logprobs } => {
                let lp = (!logprobs.is_empty())
                    .then(|| json!({"tokens": tokens, "token_logprobs": logprobs}));
                json!({"id": id, "object": "text_completion", "created": created, "model": model,
                    "checkpoint": checkpoint,
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": null}]})
                .to_string()
            }
            Event::Done { finish, .. } => format!(
                "{}\n\ndata: [DONE]",
                json!({"id": id, "object": "text_completion", "created": created, "model": model,
                    "checkpoint": checkpoint,
                    "choices": [{"text": "", "index": 0, "logprobs": null,
                        "finish_reason": finish_name(finish)}]})
            ),
            Event::Failed(f) => {
                let e = InferenceError::from(f);
                json!({"error": {"message": e.to_string(), "type": "server_error"}}).to_string()
            }
        };
        Some(Ok::<_, Infallible>(Bytes::from(format!("data: {data}\n\n"))))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(sse))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
