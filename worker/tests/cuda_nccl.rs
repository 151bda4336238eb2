//! The NCCL collective on one GPU (world size 1: a real communicator, the all-reduce path and
//! the id hand-off; stopping a rank while it joins a world of 2 or after it joined), plus what
//! happens without NCCL, and the id's bytes (no GPU needed).
//!
//! Needs a GPU; skips like `kernels/tests/cuda_parity.rs` (fails under
//! `FERRITE_REQUIRE_GPU=1`). Without libnccl it checks that joining is one clear error.
#![cfg(feature = "cuda")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_kernels::cuda::CudaBackend;
use ferrite_kernels::Backend;
use ferrite_worker::collective::nccl::{nccl_available, NcclCollective, NcclId, NCCL_ID_BYTES};
use ferrite_worker::Collective;

fn gpu(test: &str) -> Option<CudaBackend> {
    ferrite_kernels::cuda::device_for_test(test)
}

/// The GPU, when there is one and libnccl too.
fn gpu_with_nccl(test: &str) -> Option<CudaBackend> {
    let be = gpu(test)?;
    if !nccl_available() {
        eprintln!("skipping {test}: no libnccl");
        return None;
    }
    Some(be)
}

fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
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
    let mut nccl = NcclCollective::from_id_bytes(&be, 0, 1, &id.to_bytes(), no_stop()).unwrap();
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

/// Rank 0 of a world of 2 whose peer never comes: joining waits (the communicator is
/// non-blocking) until the rank is stopped, then returns `Stopped` at once, not after NCCL's
/// bootstrap timeout; a cancelled GPU job frees its workers even when a peer died before
/// joining.
#[test]
fn nccl_join_without_its_peer_ends_on_stop() {
    let Some(be) = gpu_with_nccl("nccl_join_without_its_peer_ends_on_stop") else { return };
    let stop = no_stop();
    let setter = stop.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        setter.store(true, Ordering::Relaxed);
    });
    let started = Instant::now();
    let err = NcclCollective::new(&be, 0, 2, &NcclId::new().unwrap(), stop).err().expect("no peer");
    let took = started.elapsed();
    t.join().unwrap();
    assert!(matches!(err, ferrite_worker::WorkerError::Stopped { .. }), "{err}");
    assert!(took < Duration::from_secs(5), "joining ended {took:?} after the start");
    // The device is still usable: a fresh communicator of one works.
    let mut one = NcclCollective::new(&be, 0, 1, &NcclId::new().unwrap(), no_stop()).unwrap();
    assert_eq!(one.mean_scalar(1.5).unwrap(), 1.5);
}

/// A stopped rank's communicator is aborted by the watchdog: the next collective is an error
/// saying so, not a hang.
#[test]
fn nccl_stop_aborts_a_joined_communicator() {
    let Some(be) = gpu_with_nccl("nccl_stop_aborts_a_joined_communicator") else { return };
    let stop = no_stop();
    let mut nccl = NcclCollective::new(&be, 0, 1, &NcclId::new().unwrap(), stop.clone()).unwrap();
    assert_eq!(nccl.mean_scalar(3.0).unwrap(), 3.0);
    stop.store(true, Ordering::Relaxed);
    std::thread::sleep(ferrite_worker::collective::nccl::WATCH_EVERY * 5);
    let err = nccl.mean_scalar(3.0).unwrap_err();
    assert!(err.to_string().contains("aborted: the rank was stopped"), "{err}");
}
