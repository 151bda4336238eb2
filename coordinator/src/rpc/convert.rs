//! `ferrite.v1` <-> domain conversions. Incoming messages are checked here (required fields,
//! known enum values) and answer [`Error::InvalidArgument`] naming the field; range checks
//! live with the domain types (`JobSpec::validated`) so every entry point shares them.

use ferrite_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::job::{
    Checkpoint, DeviceKind, Job, JobId, JobKind, JobSpec, JobState, StateChange, WorkerId,
};
use crate::members::WorkerCapabilities;

/// The value of a message field that must be present.
pub fn required<T>(field: &'static str, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| Error::invalid(field, "required"))
}

impl TryFrom<pb::JobSpec> for JobSpec {
    type Error = Error;

    fn try_from(spec: pb::JobSpec) -> Result<Self> {
        let kind = match pb::JobKind::try_from(spec.kind) {
            Ok(pb::JobKind::Pretrain) => JobKind::Pretrain,
            Ok(pb::JobKind::Finetune) => JobKind::Finetune,
            Ok(pb::JobKind::Unspecified) => {
                return Err(Error::invalid("spec.kind", "required (pretrain or finetune)"))
            }
            Err(_) => return Err(Error::invalid("spec.kind", format!("unknown {}", spec.kind))),
        };
        Ok(JobSpec {
            toml: spec.toml,
            name: spec.name,
            kind,
            workers: spec.workers,
            min_workers: spec.min_workers,
            priority: spec.priority,
            device: device_from_proto("spec.device", spec.device)?,
            max_restarts: crate::job::DEFAULT_MAX_RESTARTS,
        })
    }
}

impl From<&JobSpec> for pb::JobSpec {
    fn from(spec: &JobSpec) -> Self {
        let kind = match spec.kind {
            JobKind::Pretrain => pb::JobKind::Pretrain,
            JobKind::Finetune => pb::JobKind::Finetune,
        };
        pb::JobSpec {
            toml: spec.toml.clone(),
            name: spec.name.clone(),
            kind: kind as i32,
            workers: spec.workers,
            min_workers: spec.min_workers,
            priority: spec.priority,
            device: device_to_proto(spec.device) as i32,
        }
    }
}

/// `UNSPECIFIED` is "any" (`None`).
pub fn device_from_proto(field: &'static str, value: i32) -> Result<Option<DeviceKind>> {
    match pb::DeviceKind::try_from(value) {
        Ok(pb::DeviceKind::Unspecified) => Ok(None),
        Ok(pb::DeviceKind::Cpu) => Ok(Some(DeviceKind::Cpu)),
        Ok(pb::DeviceKind::Cuda) => Ok(Some(DeviceKind::Cuda)),
        Err(_) => Err(Error::invalid(field, format!("unknown device kind {value}"))),
    }
}

fn device_to_proto(device: Option<DeviceKind>) -> pb::DeviceKind {
    match device {
        None => pb::DeviceKind::Unspecified,
        Some(DeviceKind::Cpu) => pb::DeviceKind::Cpu,
        Some(DeviceKind::Cuda) => pb::DeviceKind::Cuda,
    }
}

/// A job state from a request (e.g. a `ListJobs` filter); `UNSPECIFIED` is refused.
pub fn state_from_proto(field: &'static str, value: i32) -> Result<JobState> {
    match pb::JobState::try_from(value) {
        Ok(pb::JobState::Queued) => Ok(JobState::Queued),
        Ok(pb::JobState::Starting) => Ok(JobState::Starting),
        Ok(pb::JobState::Running) => Ok(JobState::Running),
        Ok(pb::JobState::Recovering) => Ok(JobState::Recovering),
        Ok(pb::JobState::Succeeded) => Ok(JobState::Succeeded),
        Ok(pb::JobState::Failed) => Ok(JobState::Failed),
        Ok(pb::JobState::Cancelled) => Ok(JobState::Cancelled),
        Ok(pb::JobState::Unspecified) | Err(_) => {
            Err(Error::invalid(field, format!("{value} is not a job state")))
        }
    }
}

impl From<JobState> for pb::JobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Queued => pb::JobState::Queued,
            JobState::Starting => pb::JobState::Starting,
            JobState::Running => pb::JobState::Running,
            JobState::Recovering => pb::JobState::Recovering,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

impl From<&StateChange> for pb::StateChange {
    fn from(c: &StateChange) -> Self {
        let from = c.from.map_or(pb::JobState::Unspecified, pb::JobState::from);
        pb::StateChange {
            from: from as i32,
            to: pb::JobState::from(c.to) as i32,
            reason: c.reason.clone(),
            at_unix_ms: c.at_unix_ms,
        }
    }
}

impl From<&Job> for pb::Job {
    fn from(job: &Job) -> Self {
        pb::Job {
            id: job.id.to_string(),
            spec: Some(pb::JobSpec::from(&job.spec)),
            state: pb::JobState::from(job.state) as i32,
            reason: job.reason.clone(),
            attempt: job.attempt,
            workers: job.workers.iter().map(WorkerId::to_string).collect(),
            submitted_unix_ms: job.submitted_unix_ms,
            updated_unix_ms: job.updated_unix_ms,
            // `pb::StateChange::from` is the generated getter of its `from` field, hence `into`.
            history: job.history.iter().map(Into::into).collect(),
        }
    }
}

impl From<&Checkpoint> for pb::Checkpoint {
    fn from(c: &Checkpoint) -> Self {
        pb::Checkpoint {
            job_id: c.job_id.to_string(),
            step: c.step,
            path: c.path.clone(),
            val_loss: c.val_loss,
            created_unix_ms: c.created_unix_ms,
        }
    }
}

impl TryFrom<pb::Checkpoint> for Checkpoint {
    type Error = Error;

    fn try_from(c: pb::Checkpoint) -> Result<Self> {
        let job_id = JobId::parse(&c.job_id)
            .map_err(|_| Error::invalid("checkpoint.job_id", format!("`{}`", c.job_id)))?;
        Ok(Checkpoint {
            job_id,
            step: c.step,
            path: c.path,
            val_loss: c.val_loss,
            created_unix_ms: c.created_unix_ms,
        })
    }
}

impl TryFrom<pb::WorkerCapabilities> for WorkerCapabilities {
    type Error = Error;

    fn try_from(c: pb::WorkerCapabilities) -> Result<Self> {
        let field = "capabilities.device_kind";
        let device = required(field, device_from_proto(field, c.device_kind)?)?;
        Ok(WorkerCapabilities {
            device,
            device_count: c.device_count,
            memory_bytes: c.memory_bytes,
            threads: c.threads,
            collective_addr: c.collective_addr,
            hostname: c.hostname,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire_spec() -> pb::JobSpec {
        pb::JobSpec {
            toml: "[model]\n".into(),
            name: "n".into(),
            kind: pb::JobKind::Finetune as i32,
            workers: 2,
            min_workers: 1,
            priority: -3,
            device: pb::DeviceKind::Cuda as i32,
        }
    }

    fn field_of(r: Result<impl std::fmt::Debug>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn job_spec_round_trips() {
        let spec = JobSpec::try_from(wire_spec()).unwrap();
        assert_eq!((spec.kind, spec.device), (JobKind::Finetune, Some(DeviceKind::Cuda)));
        assert_eq!(pb::JobSpec::from(&spec), wire_spec());
    }

    #[test]
    fn unknown_or_missing_enums_name_the_field() {
        let no_kind = pb::JobSpec { kind: 0, ..wire_spec() };
        assert_eq!(field_of(JobSpec::try_from(no_kind)), "spec.kind");
        let bad_kind = pb::JobSpec { kind: 42, ..wire_spec() };
        assert_eq!(field_of(JobSpec::try_from(bad_kind)), "spec.kind");
        let bad_device = pb::JobSpec { device: -1, ..wire_spec() };
        assert_eq!(field_of(JobSpec::try_from(bad_device)), "spec.device");
        assert_eq!(field_of(state_from_proto("states", 0)), "states");
        assert_eq!(field_of(state_from_proto("states", 99)), "states");
        let caps = pb::WorkerCapabilities { device_kind: 0, ..Default::default() };
        assert_eq!(field_of(WorkerCapabilities::try_from(caps)), "capabilities.device_kind");
        let ckpt = pb::Checkpoint { job_id: "nope".into(), ..Default::default() };
        assert_eq!(field_of(Checkpoint::try_from(ckpt)), "checkpoint.job_id");
        assert_eq!(field_of(required::<u8>("spec", None)), "spec");
    }

    #[test]
    fn every_state_survives_the_wire() {
        for n in 1..=7 {
            let state = state_from_proto("s", n).unwrap();
            assert_eq!(pb::JobState::from(state) as i32, n);
        }
    }
}
