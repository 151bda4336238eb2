//! The GPT model over a kernels [`Backend`](ferrite_kernels::Backend): configuration,
//! parameter layout, forward and backward, initialisation, the job file format.
//!
//! Depends on `kernels` (the math) and `data` (tokenizers); never on networking.
//!
//! Layout:
//! - [`config`]: [`GptConfig`], vocabulary padding, FLOP accounting.
//! - [`layout`]: where each tensor lives in the one contiguous parameter buffer.
//! - [`gpt`]: [`Gpt`], forward/backward/AdamW step.
//! - [`checkpoint`]: Hugging Face-compatible checkpoint folders, save, load, prune.
//! - [`job`]: the TOML job file (`[model]`, `[data]`, `[train]`, `[output]`).
//! - [`sample`]: temperature, top-k, top-p sampling with a counter-based RNG.
//! - [`generate`]: KV-cached decoding on the CPU.
//! - [`schedule`]: warmup + cosine learning rate.
//! - [`rng`]: a small serialisable RNG.

pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod gpt;
pub mod job;
pub mod layout;
pub mod rng;
pub mod sample;
pub mod schedule;

pub use config::GptConfig;
pub use gpt::{Gpt, Loss};
pub use job::JobSpec;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {field}: {why}")]
    Config { field: &'static str, why: String },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("checkpoint {0}")]
    Checkpoint(String),
    #[error("sampling: {0}")]
    Sampling(String),
    #[error("job file: {0}")]
    Job(String),
    #[error(transparent)]
    Kernel(#[from] ferrite_kernels::KernelError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}
