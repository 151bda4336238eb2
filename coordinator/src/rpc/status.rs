//! Domain errors as gRPC statuses, in one place.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(code(&e), e.to_string())
    }
}

/// The gRPC code a client should see for `e`.
pub fn code(e: &Error) -> Code {
    match e {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::NotFound { .. } => Code::NotFound,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        // The request is fine; the job is not in a state that allows it.
        Error::IllegalTransition { .. } => Code::FailedPrecondition,
        // The worker was dropped and must register again.
        Error::LeaseExpired(_) => Code::FailedPrecondition,
        Error::Contended { .. } | Error::WatchLagged(_) => Code::Aborted,
        Error::Corrupt { .. } => Code::DataLoss,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Etcd(_) | Error::Io(_) if e.is_retryable() => Code::Unavailable,
        Error::Etcd(_) | Error::Io(_) | Error::Embedded(_) | Error::Internal(_) => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobId, JobState};

    #[test]
    fn caller_errors_keep_their_meaning_on_the_wire() {
        let invalid = Error::InvalidArgument { field: "spec.workers", reason: "0".into() };
        let status = Status::from(invalid);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("spec.workers"), "{}", status.message());
        let illegal = Error::IllegalTransition {
            job: JobId::from_seq(1),
            from: JobState::Succeeded,
            to: JobState::Cancelled,
        };
        assert_eq!(code(&illegal), Code::FailedPrecondition);
        assert_eq!(code(&Error::corrupt("jobs/x", "bad")), Code::DataLoss);
        assert_eq!(code(&Error::Unavailable("gone".into())), Code::Unavailable);
        let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(code(&Error::Io(timed_out)), Code::Unavailable);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(code(&Error::Io(denied)), Code::Internal);
    }
}
