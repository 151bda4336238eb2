//! NCCL all-reduce between GPU ranks, through `cudarc::nccl` (feature `cuda`).
//!
//! Rendezvous: rank 0 makes an [`NcclId`] ([`NcclId::new`]), whose 128 bytes
//! ([`NcclId::to_bytes`]) reach every other rank through the coordinator (rank 0's worker
//! reports them as `NcclUniqueId`, the coordinator relays them to the other ranks' workers as
//! `Rendezvous`, see `agent.rs`); each rank then calls [`NcclCollective::new`] (or
//! [`NcclCollective::from_id_bytes`]) with its rank, the world size and the id. That call
//! blocks until all `world` ranks have joined.
//!
//! The collective runs on the backend's stream, so it is ordered after the backward kernels
//! that wrote the gradients and before the optimizer kernels that read them, without a host
//! synchronisation. NCCL's ring all-reduce leaves every rank with the same bits.
//!
//! libnccl is loaded at run time; cudarc panics when it is missing, so its presence is
//! checked first and a missing library is one clear error.

use std::ffi::c_char;

use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id, ReduceOp};
use ferrite_kernels::cuda::CudaBackend;

use super::Collective;
use crate::WorkerError;

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`), as the wire carries it.
pub const NCCL_ID_BYTES: usize = ferrite_proto::v1::NCCL_UNIQUE_ID_BYTES;

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> WorkerError {
    WorkerError::Collective(format!("NCCL: {what}: {e:?}"))
}

/// Whether libnccl can be loaded.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the candidate names; calls nothing from the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn require_nccl() -> Result<(), WorkerError> {
    if nccl_available() {
        Ok(())
    } else {
        Err(WorkerError::Collective(
            "the NCCL library was not found: cudarc loads libnccl.so, while NCCL installs \
             libnccl.so.2 (link libnccl.so to it in a folder on LD_LIBRARY_PATH; \
             scripts/gpu-check.sh does)"
                .into(),
        ))
    }
}

/// The rendezvous token of one NCCL communicator, made by rank 0.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:02x?}…)", &self.0[..8])
    }
}

impl NcclId {
    /// A fresh id (rank 0 only): NCCL's bootstrap listens on this host and writes its
    /// address into the id.
    pub fn new() -> Result<Self, WorkerError> {
        require_nccl()?;
        let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(NcclId(id.internal().map(|c| c as u8)))
    }

    /// The id as bytes, to hand to the other ranks.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// The id from the bytes rank 0 sent; exactly [`NCCL_ID_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WorkerError> {
        let arr: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            WorkerError::Collective(format!(
                "an NCCL unique id is {NCCL_ID_BYTES} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(NcclId(arr))
    }

    fn to_nccl(self) -> Id {
        Id::uninit(self.0.map(|b| b as c_char))
    }
}

/// One rank of an NCCL communicator on a [`CudaBackend`]'s device and stream.
pub struct NcclCollective {
    comm: Comm,
    rank: usize,
    world: usize,
    /// One f64 on the device, for [`Collective::mean_scalar`].
    scalar: CudaSlice<f64>,
}

// SAFETY: the communicator is used by one thread at a time (every method takes &mut self);
// NCCL allows a communicator to move between threads, it only forbids concurrent calls.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the communicator `id` as `rank` of `world` on `be`'s device; blocks until every
    /// rank has joined.
    pub fn new(
        be: &CudaBackend,
        rank: usize,
        world: usize,
        id: &NcclId,
    ) -> Result<Self, WorkerError> {
        if world == 0 || rank >= world {
            return Err(WorkerError::Collective(format!("rank {rank} of a world of {world}")));
        }
        require_nccl()?;
        // NCCL picks the device from the calling thread's current context.
        be.context().bind_to_thread().map_err(|e| {
            WorkerError::Collective(format!("binding the CUDA context for NCCL: {e:?}"))
        })?;
        let scalar = be
            .stream()
            .alloc_zeros::<f64>(1)
            .map_err(|e| WorkerError::Collective(format!("allocating NCCL scratch: {e:?}")))?;
        let comm = Comm::from_rank(be.stream().clone(), rank, world, id.to_nccl())
            .map_err(|e| nccl_err(&format!("joining as rank {rank} of {world}"), e))?;
        Ok(NcclCollective { comm, rank, world, scalar })
    }

    /// [`NcclCollective::new`] from the id bytes rank 0 sent.
    pub fn from_id_bytes(
        be: &CudaBackend,
        rank: usize,
        world: usize,
        id: &[u8],
    ) -> Result<Self, WorkerError> {
        Self::new(be, rank, world, &NcclId::from_bytes(id)?)
    }
}

impl Collective<CudaBackend> for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(
        &mut self,
        be: &CudaBackend,
        buf: &mut CudaSlice<f32>,
        len: usize,
    ) -> Result<(), WorkerError> {
        if len > buf.len() {
            return Err(WorkerError::Collective(format!(
                "all-reduce of {len} floats from a buffer of {}",
                buf.len()
            )));
        }
        be.check()?;
        be.context()
            .bind_to_thread()
            .map_err(|e| WorkerError::Collective(format!("binding the CUDA context: {e:?}")))?;
        let mut view = buf.slice_mut(..len);
        self.comm
            .all_reduce_in_place(&mut view, &ReduceOp::Avg)
            .map_err(|e| nccl_err("all-reduce", e))?;
        Ok(())
    }

    fn mean_scalar(&mut self, x: f64) -> Result<f64, WorkerError> {
        let stream = self.comm.stream();
        let err = |what: &str, e: cudarc::driver::DriverError| {
            WorkerError::Collective(format!("NCCL scalar {what}: {e:?}"))
        };
        stream.memcpy_htod(&[x], &mut self.scalar).map_err(|e| err("upload", e))?;
        self.comm
            .all_reduce_in_place(&mut self.scalar, &ReduceOp::Avg)
            .map_err(|e| nccl_err("all-reduce of a scalar", e))?;
        let mut out = [0.0f64];
        stream.memcpy_dtoh(&self.scalar, &mut out).map_err(|e| err("download", e))?;
        stream.synchronize().map_err(|e| err("synchronize", e))?;
        Ok(out[0])
    }
}
