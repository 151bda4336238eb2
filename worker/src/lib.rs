//! The training role: a job's step loop, batch sampling from token shards, the
//! [`Collective`] that averages gradients between data-parallel ranks, checkpoint save and
//! resume.
//!
//! Depends on `kernels`, `model`, `data` and the wire types of `proto` (at the edge, in
//! [`agent`]); never on the coordinator (scheduling is not its business).
//!
//! Layout:
//! - [`agent`]: the worker process in the cluster: registration, the coordinator stream,
//!   one rank at a time on its own thread, cancellation and fencing.
//! - [`batch`]: counter-based sampling of training windows, so a step's batch is a pure
//!   function of (seed, step, micro-batch, row) and resume needs no sampler state.
//! - [`collective`]: the [`Collective`] trait and the single-process implementation.
//! - [`metrics`]: the worker's Prometheus metrics and their `/metrics` endpoint.
//! - [`trainer`]: [`Trainer`], the step loop with eval, metrics and checkpoints.

pub mod agent;
pub mod batch;
pub mod collective;

pub mod metrics;
pub mod trainer;

pub use collective::{Collective, Single};
pub use trainer::{StepMetrics, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] ferrite_model::ModelError),
    #[error(transparent)]
    Kernel(#[from] ferrite_kernels::KernelError),
    #[error(transparent)]
    Data(#[from] ferrite_data::Error),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("dataset: {0}")]
    Dataset(String),
    #[error("collective: {0}")]
    Collective(String),
    #[error("stopped before step {}", step + 1)]
    Stopped { step: u64 },
    #[error(
        "fenced after step {step}: the lease was not confirmed for {waited_ms} ms; not writing"
    )]
    Fenced { step: u64, waited_ms: u64 },
}

impl WorkerError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> WorkerError {
        let what = what.into();
        move |source| WorkerError::Io { what, source }
    }
}
