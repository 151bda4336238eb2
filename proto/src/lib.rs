//! The `ferrite.v1` gRPC API: generated tonic/prost code for `JobService` and
//! `WorkerService`, and the file descriptor set for server reflection.
//!
//! Owns: the `.proto` files under `proto/ferrite/v1/` and nothing else.
//! Must not depend on: any other ferrite crate, nor hold logic. Convert these types to domain
//! types at the edge (`coordinator`, `worker`, `inference`), so the core never imports them.
//!
//! Layout:
//! - `proto/ferrite/v1/job.proto` — `JobService`, job spec/state, metrics, checkpoints.
//! - `proto/ferrite/v1/worker.proto` — `WorkerService`: registration and the `Attach` stream.
//! - `proto/ferrite/v1/inference.proto` — `InferenceService`: `Generate`, `GenerateStream`.
//! - [`v1`] — the generated code (`build.rs` runs `tonic-prost-build`).

/// Generated code for package `ferrite.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ferrite.v1");

    /// Encoded `FileDescriptorSet` of every `ferrite.v1` file, for `tonic-reflection`.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("ferrite_v1_descriptor");

    /// Length of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`): `NcclUniqueId.id` and
    /// `Rendezvous.nccl_unique_id` carry exactly this many bytes.
    pub const NCCL_UNIQUE_ID_BYTES: usize = 128;
}

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn job_spec_round_trips_through_the_wire_format() {
        let spec = v1::JobSpec {
            toml: "[model]\nn_layer = 4\n".into(),
            name: "shakespeare".into(),
            kind: v1::JobKind::Pretrain as i32,
            workers: 4,
            min_workers: 2,
            priority: 5,
            device: v1::DeviceKind::Cuda as i32,
        };
        let back = v1::JobSpec::decode(spec.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(back, spec);
        assert_eq!(back.kind(), v1::JobKind::Pretrain);
    }

    #[test]
    fn descriptor_set_names_both_services() {
        let text = String::from_utf8_lossy(v1::FILE_DESCRIPTOR_SET);
        assert!(text.contains("JobService") && text.contains("WorkerService"));
    }
}
