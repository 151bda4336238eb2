//! The crate's one error type, grouped by cause.

use crate::job::{JobId, JobState};
use crate::store::LeaseId;

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- The caller asked for something that cannot be done. ---
    /// A request field is missing or out of range; `field` names it.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// No such job, checkpoint, worker, ...
    #[error("{kind} `{id}` not found")]
    NotFound { kind: &'static str, id: String },
    /// A create found the thing already there (with different contents).
    #[error("{kind} `{id}` already exists")]
    AlreadyExists { kind: &'static str, id: String },
    /// The job's state machine has no edge `from -> to`.
    #[error("job {job}: illegal transition {from} -> {to}")]
    IllegalTransition { job: JobId, from: JobState, to: JobState },

    // --- Concurrency and time. ---
    /// Compare-and-swap lost the race this many times in a row.
    #[error("`{key}` changed concurrently; gave up after {attempts} attempts")]
    Contended { key: String, attempts: u32 },
    /// The lease expired (or was revoked) before it was used or kept alive.
    #[error("lease {0} has expired or does not exist")]
    LeaseExpired(LeaseId),
    /// A watcher fell this many events behind; re-list, then watch again.
    #[error("watch fell {0} events behind")]
    WatchLagged(u64),

    // --- Stored data. ---
    /// A record in the store does not decode; the store is not trusted to hold our format.
    #[error("corrupt record at `{key}`: {reason}")]
    Corrupt { key: String, reason: String },

    // --- Backends. ---
    /// The embedded (redb) store failed.
    #[error("embedded store: {0}")]
    Embedded(#[from] redb::Error),
    /// The etcd client failed.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// File-system error outside the database itself.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A background task of the store is gone (panicked, or the runtime shut down), or a
    /// watch stream was closed by the server.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A bug: an invariant of this crate did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether the same call may succeed if simply tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::InvalidArgument { .. }
            | Error::NotFound { .. }
            | Error::AlreadyExists { .. }
            | Error::IllegalTransition { .. }
            | Error::LeaseExpired(_)
            | Error::Corrupt { .. }
            | Error::Embedded(_)
            | Error::Internal(_) => false,
            Error::Contended { .. } | Error::WatchLagged(_) | Error::Unavailable(_) => true,
            Error::Etcd(e) => etcd_is_retryable(e),
            Error::Io(e) => io_is_retryable(e),
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field, reason: reason.into() }
    }

    pub(crate) fn corrupt(key: &str, reason: impl std::fmt::Display) -> Self {
        Error::Corrupt { key: key.to_owned(), reason: reason.to_string() }
    }
}

/// etcd failures worth retrying: the network, or a server that is busy or electing a leader.
fn etcd_is_retryable(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
        ),
        _ => false,
    }
}

fn io_is_retryable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

// redb reports through several error types; all of them fold into `redb::Error`.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Embedded(redb::Error::from(e))
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
