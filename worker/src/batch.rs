//! Training and evaluation batches drawn from token shards.
//!
//! Window starts are a pure function of (seed, stream, step, micro-batch, global row):
//! rank r of w, micro-batch m, local row i reads global row (m·w + r)·B + i. So two ranks of
//! batch B see exactly the rows of one rank of batch 2B (or of one rank with two
//! micro-batches), and resuming at step s needs nothing but s.

use ferrite_data::{MaskShard, TokenShard};
use ferrite_kernels::IGNORE_INDEX;
use ferrite_model::rng::{mix, Rng};

use crate::WorkerError;

/// Which split a batch comes from; each has its own random stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

pub struct Sampler<'a> {
    tokens: &'a TokenShard,
    mask: Option<&'a MaskShard>,
    seed: u64,
    split: Split,
    window: Vec<u32>,
    window_mask: Vec<u8>,
}

impl<'a> Sampler<'a> {
    pub fn new(
        tokens: &'a TokenShard,
        mask: Option<&'a MaskShard>,
        seed: u64,
        split: Split,
        t: usize,
    ) -> Result<Self, WorkerError> {
        if tokens.len() < t + 2 {
            return Err(WorkerError::Dataset(format!(
                "{:?} split has {} tokens, fewer than block_size + 2 = {}",
                split,
                tokens.len(),
                t + 2
            )));
        }
        Ok(Sampler {
            tokens,
            mask,
            seed,
            split,
            window: vec![0; t + 1],
            window_mask: vec![1; t + 1],
        })
    }

    /// Fills tokens and targets (b, t) for one micro-batch of one rank.
    #[allow(clippy::too_many_arguments)]
    pub fn fill(
        &mut self,
        step: u64,
        micro: usize,
        rank: usize,
        world: usize,
        b: usize,
        tokens: &mut [i32],
        targets: &mut [i32],
    ) {
        let t = self.window.len() - 1;
        let starts = (self.tokens.len() - t) as u64;
        let stream = match self.split {
            Split::Train => 0x7261_696e,
            Split::Val => 0x7661_6c21,
        };
        for i in 0..b {
            let row = ((micro * world + rank) * b + i) as u64;
            let key = mix(mix(step ^ mix(stream)) ^ row);
            let start = Rng::stream(self.seed, key).below(starts) as usize;
            self.tokens.read_into(start, &mut self.window);
            if let Some(m) = self.mask {
                m.read_into(start, &mut self.window_mask);
            }
            for j in 0..t {
                tokens[i * t + j] = self.window[j] as i32;
                targets[i * t + j] = if self.window_mask[j + 1] == 0 {
                    IGNORE_INDEX
                } else {
                    self.window[j + 1] as i32
                };
            }
        }
    }
}
