//! GPT configuration.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The vocabulary is padded to a multiple of this internally (aligned matmul tiles); the
/// padding never shows outside the model: logits past `vocab_size` are dropped and
/// checkpoints store the true vocabulary.
pub const VOCAB_ALIGN: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Longest context (the position embedding's length).
    pub block_size: usize,
    pub vocab_size: usize,
}

impl GptConfig {
    /// GPT-2 small (124M) with the given vocabulary.
    pub fn gpt2_small(vocab_size: usize) -> Self {
        GptConfig { n_layer: 12, n_head: 12, n_embd: 768, block_size: 1024, vocab_size }
    }

    pub fn padded_vocab(&self) -> usize {
        self.vocab_size.div_ceil(VOCAB_ALIGN) * VOCAB_ALIGN
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Checks that a model of this shape can be built; errors name the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &'static str, why: String| Err(ModelError::Config { field, why });
        if self.n_layer == 0 {
            return bad("n_layer", "must be at least 1".into());
        }
        if self.n_head == 0 {
            return bad("n_head", "must be at least 1".into());
        }
        if self.n_embd == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return bad(
                "n_embd",
                format!("{} is not a positive multiple of n_head = {}", self.n_embd, self.n_head),
            );
        }
        if self.block_size == 0 || self.block_size > ferrite_kernels::cpu::MAX_SEQ_LEN {
            return bad(
                "block_size",
                format!("{} is outside 1..={}", self.block_size, ferrite_kernels::cpu::MAX_SEQ_LEN),
            );
        }
        if self.vocab_size == 0 || self.vocab_size > i32::MAX as usize {
            return bad("vocab_size", format!("{} is out of range", self.vocab_size));
        }
        Ok(())
    }

    /// Parameters counted as GPT-2 papers do: the tied LM head once, true vocabulary.
    pub fn num_params(&self) -> usize {
        let (c, l) = (self.n_embd, self.n_layer);
        self.vocab_size * c + self.block_size * c + l * (12 * c * c + 13 * c) + 2 * c
    }

    /// Training FLOPs per token: 6 per parameter touched by a token (forward and backward
    /// matmuls, position embedding excluded) plus attention's 6·2·L·T·C for a context of `t`
    /// (PaLM's appendix B accounting, as nanoGPT's MFU estimate).
    pub fn train_flops_per_token(&self, t: usize) -> f64 {
        let n = (self.num_params() - self.block_size * self.n_embd) as f64;
        6.0 * n + 12.0 * (self.n_layer * t * self.n_embd) as f64
    }
}
