//! The gRPC edge: `ferrite.v1.InferenceService` with the standard health service and server
//! reflection on one port, plus the coordinator client that finds published checkpoints.
//! Generated types do not leave this module.
//!
//! - [`convert`]: request/reply conversions, naming the bad field.
//! - [`status`]: [`InferenceError`](crate::InferenceError) to `tonic::Status`, in one place.
//! - [`service`]: the handlers and [`run`].
//! - [`coordinator`]: `JobService.ListCheckpoints` for `--coordinator URL --job ID`.

pub mod convert;
pub mod coordinator;
pub mod service;
pub mod status;

pub use service::run;
