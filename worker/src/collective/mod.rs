//! Averaging gradients between data-parallel ranks.
//!
//! - [`Collective`]: the trait the trainer calls; [`Single`] for one process.
//! - [`ring`]: [`RingCollective`], a CPU all-reduce over a TCP ring.
//! - `nccl` (feature `cuda`): `NcclCollective`, GPU all-reduce through NCCL.

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;

pub use ring::{RingAbort, RingCollective, RingConfig};

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
