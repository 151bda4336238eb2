//! The serving role's errors, grouped by cause; `rpc::status` maps them to gRPC codes.

use ferrite_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// A request parameter is out of range; the message names it.
    #[error("{field}: {why}")]
    InvalidArgument { field: &'static str, why: String },
    /// The waiting queue is full, or the request can never fit the KV cache budget.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The request's deadline passed before it finished.
    #[error("deadline exceeded after {0} generated tokens")]
    DeadlineExceeded(usize),
    /// No checkpoint is published (yet), or the named one is missing.
    #[error("{0}")]
    NotFound(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The coordinator could not be reached or answered with an error.
    #[error("coordinator {0}")]
    Coordinator(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] ferrite_data::Error),
}

impl InferenceError {
    pub(crate) fn invalid(field: &'static str, why: impl Into<String>) -> Self {
        InferenceError::InvalidArgument { field, why: why.into() }
    }
}

pub type Result<T, E = InferenceError> = std::result::Result<T, E>;
