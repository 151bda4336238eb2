//! The NCCL collective on one GPU (world size 1: a real communicator, the all-reduce path and
//! the id hand-off), plus what happens without NCCL, and the id's bytes (no GPU needed).
//!
//! Needs a GPU; skips like `kernels/tests/cuda_parity.rs` (fails under
//! `FERRITE_REQUIRE_GPU=1`). Without libnccl it checks that joining is one clear error.
#![cfg(feature = "cuda")]

use ferrite_kernels::cuda::CudaBackend;
use ferrite_kernels::Backend;
use ferrite_worker::collective::nccl::{nccl_available, NcclCollective, NcclId, NCCL_ID_BYTES};
use ferrite_worker::Collective;

fn gpu(test: &str) -> Option<CudaBackend> {
    ferrite_kernels::cuda::device_for_test(test)
}

/// Runs without a GPU: the id survives the trip through bytes (what the coordinator relays),
/// and a wrong length is an error, not a panic.
#[test]
fn nccl_id_round_trips_through_bytes_and_rejects_wrong_lengths() {
    let raw: Vec<u8> = (0..NCCL_ID_BYTES).map(|i| (i * 7 + 200) as u8).collect();
    let id = NcclId::from_bytes(&raw).unwrap();
    assert_eq!(id.to_bytes(), raw);
    assert_eq!(NcclId::from_bytes(&id.to_bytes()).unwrap(), id);
    let err = NcclId::from_bytes(&raw[..100]).unwrap_err();
    assert!(err.to_string().contains("128 bytes, got 100"), "{err}");
}

#[test]
fn nccl_world_of_one_averages_to_itself() {
    let Some(be) = gpu("nccl_world_of_one_averages_to_itself") else { return };
    if !nccl_available() {
        let err = NcclId::new().expect_err("no libnccl");
        eprintln!("skipping the all-reduce: {err}");
        assert!(err.to_string().contains("libnccl.so"), "{err}");
        return;
    }
    let id = NcclId::new().unwrap();
    // The bytes are what the coordinator relays to the other ranks.
    let mut nccl = NcclCollective::from_id_bytes(&be, 0, 1, &id.to_bytes()).unwrap();
    assert_eq!((nccl.rank(), nccl.world()), (0, 1));
    let host: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut buf = be.alloc(host.len()).unwrap();
    be.upload(&mut buf, &host).unwrap();
    nccl.all_reduce_mean(&be, &mut buf, 9_000).unwrap();
    let mut back = vec![0.0; host.len()];
    be.download(be.view(&buf, 0..host.len()), &mut back).unwrap();
    assert_eq!(back, host, "the mean over one rank is the rank's own buffer");
    assert_eq!(nccl.mean_scalar(2.5).unwrap(), 2.5);
    assert!(nccl.all_reduce_mean(&be, &mut buf, 20_000).is_err(), "len past the buffer");
}
