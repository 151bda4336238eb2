//! Domain errors to gRPC status codes, in one place.

use tonic::{Code, Status};

use crate::error::InferenceError;

impl From<InferenceError> for Status {
    fn from(e: InferenceError) -> Status {
        let code = match &e {
            InferenceError::InvalidArgument { .. } => Code::InvalidArgument,
            InferenceError::ResourceExhausted(_) => Code::ResourceExhausted,
            InferenceError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            InferenceError::NotFound(_) => Code::NotFound,
            InferenceError::ShuttingDown => Code::Unavailable,
            InferenceError::Coordinator(_) => Code::Unavailable,
            InferenceError::Model(_) => Code::Internal,
            InferenceError::Tokenizer(_) => Code::InvalidArgument,
        };
        Status::new(code, e.to_string())
    }
}
