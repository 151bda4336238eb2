//! Averaging gradients between data-parallel ranks.
//!
//! - [`Collective`]: the trait the trainer calls; [`Single`] for one process.
//! - [`bucket`]: [`Bucketer`], which groups gradients into buckets as backward completes them.
//! - [`ring`]: [`RingCollective`], a CPU all-reduce over a TCP ring; `pipeline` moves its data,
//!   through `shm`'s shared-memory segments on links whose two ranks share a host.
//! - `nccl` (feature `cuda`): `NcclCollective`, GPU all-reduce through NCCL.
//! - [`rendezvous`]: [`IdSlot`], where a GPU rank waits for rank 0's NCCL id.

pub mod bucket;
#[cfg(feature = "cuda")]
pub mod nccl;
mod pipeline;
pub mod rendezvous;
pub mod ring;
mod shm;

pub use bucket::Bucketer;
pub use rendezvous::IdSlot;
pub use ring::{RingAbort, RingCollective, RingConfig};

use std::ops::Range;

use ferrite_kernels::Backend;

use crate::WorkerError;

/// All-reduce between the ranks of one job. Every rank calls the same methods in the same
/// order; implementations leave every rank with bitwise identical results.
pub trait Collective<B: Backend>: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `buf[..len]` on every rank by the mean over ranks.
    fn all_reduce_mean(&mut self, be: &B, buf: &mut B::Buf, len: usize) -> Result<(), WorkerError>;
    /// Mean of one number over ranks (losses for reporting).
    fn mean_scalar(&mut self, x: f64) -> Result<f64, WorkerError>;

    /// Starts averaging one bucket, the elements of `buf` in `ranges`, while the caller goes
    /// on (backward writing other parts of `buf`). The buckets started before one
    /// [`Collective::finish_buckets`] must cover `buf[..len]` exactly once. The default
    /// starts nothing and leaves it all to `finish_buckets`.
    fn start_bucket(
        &mut self,
        _be: &B,
        _buf: &B::Buf,
        _ranges: &[Range<usize>],
    ) -> Result<(), WorkerError> {
        Ok(())
    }

    /// Waits for the buckets started since the last call and leaves `buf[..len]` holding the
    /// mean over ranks, as [`Collective::all_reduce_mean`] would.
    fn finish_buckets(&mut self, be: &B, buf: &mut B::Buf, len: usize) -> Result<(), WorkerError> {
        self.all_reduce_mean(be, buf, len)
    }
}

/// One process, nothing to exchange.
pub struct Single;

impl<B: Backend> Collective<B> for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _: &B, _: &mut B::Buf, _: usize) -> Result<(), WorkerError> {
        Ok(())
    }
    fn mean_scalar(&mut self, x: f64) -> Result<f64, WorkerError> {
        Ok(x)
    }
}
