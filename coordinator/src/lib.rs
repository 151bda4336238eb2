//! Ferrite's control plane: jobs, scheduling, worker membership, the state store and the
//! checkpoint registry.
//!
//! Owns: every piece of cluster state (jobs, their state machine and history, worker leases,
//! published checkpoints) and the decision of which job runs on which workers.
//! Must not depend on: `ferrite-worker` (the control plane never links the training role),
//! nor run math. It uses `ferrite-model` only to parse and validate job files at submission,
//! so `ferrite train` and the cluster accept the same files (and, with `ferrite-data`'s
//! tokenizer for the vocabulary, to estimate a model's FLOPs for MFU). Generated gRPC types
//! (`ferrite-proto`) are used only at the edge, [`rpc`] and [`server`]; everything else works
//! on domain types.
//!
//! Layout:
//! - [`error`] — the crate's one error enum and its retryability.
//! - [`job`] — domain types: [`JobId`], [`JobSpec`], [`JobState`] and its transitions, [`Job`].
//! - [`store`] — the [`Store`] trait with [`EmbeddedStore`] (redb file, the default) and
//!   [`EtcdStore`]; one conformance suite in `tests/store_conformance.rs` covers both.
//! - [`scheduler`] — a pure `schedule(&ClusterView) -> Vec<Action>`.
//! - [`jobs`] — the job registry over a store: submit, transitions, assignments.
//! - [`checkpoints`] — the checkpoint registry: record, list, newest.
//! - [`members`] — worker membership held by store leases.
//! - [`leader`] — leader election on etcd (the embedded store has one coordinator).
//! - [`control`] — the control loop: worker sessions, scheduling passes, failure handling,
//!   job events; domain messages to and from workers.
//! - [`rpc`] — the edge to `ferrite.v1`: conversions and the error -> `Status` mapping.
//! - [`server`] — the gRPC server: `JobService` for operators, `WorkerService` for workers,
//!   health and reflection, `run(listener, deps, shutdown)`.
//! - [`http`] — the HTTP edge: Prometheus `/metrics`, the JSON API under `/api` and the
//!   dashboard at `/ui`, `run(listener, deps, config, shutdown)`.

pub mod checkpoints;
pub mod control;
pub mod error;
pub mod http;
pub mod job;
pub mod jobs;
mod keys;
pub mod leader;
pub mod members;
pub mod rpc;
pub mod scheduler;
pub mod server;
pub mod store;

pub use checkpoints::CheckpointRegistry;
pub use control::Controller;
pub use error::{Error, Result};
pub use job::WorkerId;
pub use job::{Checkpoint, DeviceKind, Job, JobId, JobKind, JobSpec, JobState, StateChange};
pub use jobs::JobRegistry;
pub use members::{MemberEvent, WorkerCapabilities, WorkerInfo, WorkerRegistry};
pub use scheduler::{schedule, Action, ClusterView, FreeWorker, PendingJob, QueueingStrategy};
pub use store::{EmbeddedStore, EtcdStore, Store, StoreExt};
