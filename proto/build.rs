//! Compiles `proto/ferrite/v1/*.proto` into tonic/prost code plus a file descriptor set
//! (for gRPC server reflection). Needs `protoc` on PATH (or `PROTOC`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/ferrite/v1/job.proto",
        "proto/ferrite/v1/inference.proto",
        "proto/ferrite/v1/worker.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ferrite_v1_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
