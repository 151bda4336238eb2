//! Job domain types: identifiers, the job spec, the state machine and the stored job record.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest job file accepted, in bytes.
pub const MAX_JOB_TOML_BYTES: usize = 1 << 20;
/// Largest world size accepted.
pub const MAX_WORKERS: u32 = 4096;
const MAX_NAME_CHARS: usize = 200;

/// A job's id, `job-000042`: unique within a store, assigned at submission.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// The id of the job with submission sequence number `seq`.
    pub fn from_seq(seq: u64) -> Self {
        JobId(format!("job-{seq:06}"))
    }

    /// Parses an id as received in a request.
    pub fn parse(s: &str) -> Result<Self> {
        let digits = s.strip_prefix("job-").unwrap_or("");
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 20 {
            return Err(Error::invalid("job_id", format!("`{s}` is not a job id (job-NNNNNN)")));
        }
        Ok(JobId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A worker's id, `w-000007`: unique within a store, assigned at registration.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(String);

impl WorkerId {
    pub fn new(id: impl Into<String>) -> Self {
        WorkerId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a job trains from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Pretrain,
    Finetune,
}

/// Accelerator kind of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// A job as submitted: the job file verbatim plus the fields the control plane acts on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The job file (TOML), stored untouched and handed to the workers.
    pub toml: String,
    pub name: String,
    pub kind: JobKind,
    /// World size wanted.
    pub workers: u32,
    /// Fewest workers the job may resume on after a failure (1..=workers).
    pub min_workers: u32,
    /// Higher runs first.
    pub priority: i32,
    /// Device kind required; `None` takes any (one kind per job).
    pub device: Option<DeviceKind>,
    /// Restarts after failures before the job fails for good.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
}

/// Restarts allowed when the job file does not say (`[cluster] max_restarts`).
pub const DEFAULT_MAX_RESTARTS: u32 = 5;

fn default_max_restarts() -> u32 {
    DEFAULT_MAX_RESTARTS
}

impl JobSpec {
    /// Checks the spec and fills defaults (`min_workers == 0` means `workers`).
    pub fn validated(mut self) -> Result<Self> {
        if self.toml.trim().is_empty() {
            return Err(Error::invalid("spec.toml", "the job file is empty"));
        }
        if self.toml.len() > MAX_JOB_TOML_BYTES {
            return Err(Error::invalid(
                "spec.toml",
                format!("{} bytes; at most {MAX_JOB_TOML_BYTES}", self.toml.len()),
            ));
        }
        if self.name.chars().count() > MAX_NAME_CHARS {
            return Err(Error::invalid("spec.name", format!("longer than {MAX_NAME_CHARS}")));
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(Error::invalid(
                "spec.workers",
                format!("{}; must be 1..={MAX_WORKERS}", self.workers),
            ));
        }
        if self.min_workers == 0 {
            self.min_workers = self.workers;
        }
        if self.min_workers > self.workers {
            return Err(Error::invalid(
                "spec.min_workers",
                format!("{} exceeds workers ({})", self.min_workers, self.workers),
            ));
        }
        Ok(self)
    }
}

/// Where a job is in its life.
///
/// ```text
/// Queued ──> Starting ──> Running ──> Succeeded | Failed | Cancelled
///   │          │  ▲          │
///   │          ▼  │          ▼
///   │        Recovering <────┘      (a worker was lost: wait for workers, start again)
///   └──> Cancelled                   Starting/Recovering may also go to Failed | Cancelled
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Starting,
    Running,
    Recovering,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Whether the state machine has an edge `self -> to`.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        match self {
            Queued => matches!(to, Starting | Cancelled),
            Starting => matches!(to, Running | Recovering | Failed | Cancelled),
            Running => matches!(to, Succeeded | Failed | Cancelled | Recovering),
            Recovering => matches!(to, Starting | Failed | Cancelled),
            Succeeded | Failed | Cancelled => false,
        }
    }

    /// No edge leaves a terminal state.
    pub fn is_terminal(self) -> bool {
        use JobState::*;
        match self {
            Succeeded | Failed | Cancelled => true,
            Queued | Starting | Running | Recovering => false,
        }
    }

    /// Waiting for the scheduler to give it workers.
    pub fn is_pending(self) -> bool {
        use JobState::*;
        match self {
            Queued | Recovering => true,
            Starting | Running | Succeeded | Failed | Cancelled => false,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobState::Queued => "queued",
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Recovering => "recovering",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        })
    }
}

/// One recorded move between states (`from == to` never happens).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateChange {
    /// `None` for the submission itself.
    pub from: Option<JobState>,
    pub to: JobState,
    pub reason: String,
    pub at_unix_ms: i64,
}

/// A job as stored: spec, state, assignment and history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    /// Submission order; FIFO within a priority follows it.
    pub seq: u64,
    pub spec: JobSpec,
    pub state: JobState,
    /// Why the job is where it is (latest transition or scheduler note).
    pub reason: String,
    /// Starts so far: 1 after the first start, +1 per recovery.
    pub attempt: u32,
    /// Worker ids by rank for the current attempt; empty while pending.
    pub workers: Vec<WorkerId>,
    pub submitted_unix_ms: i64,
    pub updated_unix_ms: i64,
    /// Every state change, oldest first; the first is the submission.
    pub history: Vec<StateChange>,
}

/// A published checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub job_id: JobId,
    pub step: u64,
    /// Directory holding the safetensors weights, config.json and optimizer state.
    pub path: String,
    pub val_loss: Option<f32>,
    pub created_unix_ms: i64,
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub(crate) fn now_unix_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Starting,
        JobState::Running,
        JobState::Recovering,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    #[test]
    fn happy_path_and_recovery_edges_exist() {
        use JobState::*;
        for (a, b) in [
            (Queued, Starting),
            (Starting, Running),
            (Running, Succeeded),
            (Running, Recovering),
            (Recovering, Starting),
            (Queued, Cancelled),
        ] {
            assert!(a.can_become(b), "{a} -> {b}");
        }
    }

    #[test]
    fn terminal_states_have_no_exits_and_nothing_skips_starting() {
        for from in ALL.into_iter().filter(|s| s.is_terminal()) {
            assert!(ALL.iter().all(|&to| !from.can_become(to)), "{from} has an exit");
        }
        for to in [JobState::Running, JobState::Succeeded, JobState::Failed] {
            assert!(!JobState::Queued.can_become(to), "queued -> {to}");
        }
        assert!(ALL.iter().all(|&s| !s.can_become(s)), "self loop");
        assert!(ALL.iter().all(|&s| !s.can_become(JobState::Queued)));
    }

    fn spec() -> JobSpec {
        JobSpec {
            toml: "[model]\n".into(),
            name: "t".into(),
            kind: JobKind::Pretrain,
            workers: 4,
            min_workers: 0,
            priority: 0,
            device: None,
            max_restarts: DEFAULT_MAX_RESTARTS,
        }
    }

    #[test]
    fn validation_defaults_min_workers_and_names_bad_fields() {
        assert_eq!(spec().validated().unwrap().min_workers, 4);
        let field = |s: JobSpec| match s.validated() {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        assert_eq!(field(JobSpec { workers: 0, ..spec() }), "spec.workers");
        assert_eq!(field(JobSpec { min_workers: 5, ..spec() }), "spec.min_workers");
        assert_eq!(field(JobSpec { toml: " \n".into(), ..spec() }), "spec.toml");
        let huge = "#".repeat(MAX_JOB_TOML_BYTES + 1);
        assert_eq!(field(JobSpec { toml: huge, ..spec() }), "spec.toml");
    }

    #[test]
    fn job_ids_parse_strictly() {
        assert_eq!(JobId::parse("job-000042").unwrap(), JobId::from_seq(42));
        for bad in ["", "job-", "42", "job-4x", "../job-1", "job-1/2"] {
            assert!(JobId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
