//! The serving role: sampled generations from a published checkpoint, over gRPC
//! (`ferrite.v1.InferenceService`) and an OpenAI-compatible HTTP endpoint.
//!
//! Builds on `model` (batched KV-cached decode, sampling) and `data` (tokenizers); never on
//! `worker` or `coordinator` (it talks to the coordinator only through its gRPC API).
//! Generated gRPC types stay in [`rpc`]; the rest works on domain types.
//!
//! Layout:
//! - [`request`]: a generation request, its events and its completion.
//! - [`engine`]: the bounded queue and the continuous-batching scheduler thread over a KV
//!   cache bounded in bytes; checkpoint switching.
//! - [`text`]: incremental detokenization with stop sequences.
//! - [`metrics`]: Prometheus histograms and gauges.
//! - [`rpc`]: the gRPC service, conversions, status mapping, the coordinator client.
//! - [`http`]: `POST /v1/completions` (JSON or server-sent events) and `GET /metrics`.
//! - [`bench`]: the decode benchmark of `ferrite bench decode` (throughput, time to first
//!   token).

pub mod bench;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod request;
pub mod rpc;
pub mod text;

pub use engine::{Engine, EngineConfig, EngineHandle, ServedModel};
pub use error::{InferenceError, Result};
pub use request::{Completion, Event, FinishReason, GenerateRequest, ModelVersion, Prompt};
