//! The coordinator's HTTP edge (`ferrite coordinator --http-listen`, axum): Prometheus
//! `GET /metrics`, a JSON API for people and scripts, and the dashboard at `/ui`.
//!
//! Everything here reads: the registries and the control loop's in-memory view (attached
//! workers, recent step metrics). Nothing changes cluster state; job changes go through
//! the gRPC `JobService`.
//!
//! Routes:
//! - `GET /metrics` — jobs by state, workers alive, heartbeat age per worker, and per job:
//!   step, step time, tokens/s, MFU, checkpoints ([`metrics`]).
//! - `GET /api/jobs`, `GET /api/jobs/{id}`, `GET /api/jobs/{id}/metrics?since=STEP`,
//!   `GET /api/workers` — JSON ([`api`]).
//! - `GET /ui` — one self-contained page (no external scripts, so it works offline) that
//!   polls the JSON API and draws each job's loss curve as inline SVG.
//!
//! Layout:
//! - [`api`] — the JSON views of jobs, workers and step metrics.
//! - [`metrics`] — the text exposition format and the MFU estimate.

pub mod api;
pub mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::job::JobId;
use crate::server::Deps;

/// A CPU worker's assumed peak, FLOP/s: the `gemm` crate's f32 matmul on two Zen 5 cores
/// with AVX-512 (DESIGN.md's reference numbers, 464 GFLOP/s), rounded.
pub const DEFAULT_PEAK_FLOPS: f64 = 0.5e12;

/// What the HTTP edge is told besides the registries.
#[derive(Clone, Copy, Debug)]
pub struct HttpConfig {
    /// One worker's peak FLOP/s, the denominator of MFU (`--peak-tflops`).
    pub peak_flops_per_worker: f64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { peak_flops_per_worker: DEFAULT_PEAK_FLOPS }
    }
}

/// Shared by the handlers.
#[derive(Clone)]
pub(crate) struct App {
    deps: Deps,
    cfg: HttpConfig,
    /// Training FLOPs per token of each job's model, once worked out (`None`: cannot be,
    /// e.g. the data's tokenizer is unreadable here).
    flops: Arc<Mutex<HashMap<JobId, Option<f64>>>>,
}

/// The dashboard: HTML, CSS and JavaScript in one file, no external resources.
const UI_HTML: &str = include_str!("ui.html");

/// Serves until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    deps: Deps,
    cfg: HttpConfig,
    security: ferrite_security::ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = App { deps, cfg, flops: Arc::default() };
    let router = Router::new()
        .route("/", get(|| async { Redirect::temporary("/ui") }))
        .route("/ui", get(ui))
        .route("/metrics", get(prometheus))
        .route("/api/jobs", get(api_jobs))
        .route("/api/jobs/{id}", get(api_job))
        .route("/api/jobs/{id}/metrics", get(api_job_metrics))
        .route("/api/workers", get(api_workers))
        .with_state(app);
    ferrite_security::http::serve(listener, router, &security, shutdown)
        .await
        .map_err(|e| Error::Internal(format!("http server: {e}")))
}

async fn ui() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], UI_HTML).into_response()
}

async fn prometheus(State(app): State<App>) -> Response {
    match metrics::render(&app).await {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
        Err(e) => error(e),
    }
}

async fn api_jobs(State(app): State<App>) -> Response {
    json(api::jobs(&app).await)
}

async fn api_job(State(app): State<App>, Path(id): Path<String>) -> Response {
    json(api::job(&app, &id).await)
}

async fn api_job_metrics(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let since = query.as_deref().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("since="));
    let since = match since.map(str::parse::<u64>) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => return error(Error::invalid("since", "expected a step number")),
    };
    json(api::job_metrics(&app, &id, since).await)
}

async fn api_workers(State(app): State<App>) -> Response {
    json(api::workers(&app).await)
}

fn json(value: Result<serde_json::Value>) -> Response {
    match value {
        Ok(v) => ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Err(e) => error(e),
    }
}

/// The error as `{"error": "..."}` with the HTTP status of its cause.
fn error(e: Error) -> Response {
    let status = match &e {
        Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
        Error::NotFound { .. } => StatusCode::NOT_FOUND,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = serde_json::json!({ "error": e.to_string() }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
