//! `ferrite-data` owns everything between text on disk and token ids in memory: the
//! tokenizers, the binary token and loss-mask shard formats, the dataset directory that
//! bundles them, and `prepare`, which turns text or JSONL files into such a directory.
//!
//! It must not depend on the numeric crates (`ferrite-kernels`, `ferrite-model`) nor on any
//! service crate: training reads a [`Dataset`]; nothing here knows about models or jobs.
//!
//! Layout:
//! - [`tokenizer`]: [`Tokenizer`] (`gpt2`, `char`, `bpe:<vocab_size>`) and its
//!   `tokenizer.json`.
//! - [`shard`]: the 32-byte-header shard format, memory-mapped readers ([`TokenShard`],
//!   [`MaskShard`]) and streaming writers ([`ShardWriter`], [`MaskWriter`]).
//! - [`dataset`]: a prepared directory opened as one [`Dataset`].
//! - [`prepare`]: streaming text/JSONL → dataset directory.
//! - [`error`]: the crate's one [`Error`] type.

pub mod dataset;
pub mod error;
pub mod prepare;
pub mod shard;
pub mod tokenizer;

#[cfg(test)]
mod test_support;

pub use dataset::Dataset;
pub use error::{Error, Result};
pub use prepare::{prepare, InputFormat, PrepareOptions, PrepareSummary};
pub use shard::{MaskShard, MaskWriter, ShardWriter, TokenShard, TokenWidth};
pub use tokenizer::{Tokenizer, TokenizerSpec, END_OF_TEXT};
