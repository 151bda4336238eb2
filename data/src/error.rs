//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `ferrite-data`, grouped by cause.
///
/// Errors about a file on disk always name the file; errors about one line of an input name
/// the line too.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- The operating system refused a read or write.
    // Messages carry the inner error's text themselves (no `source()` chain), so a chain
    // printer such as anyhow's does not repeat it.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    // --- A file exists but its contents are wrong.
    /// A token or mask shard whose header or size is inconsistent.
    #[error("{path}: {reason}")]
    BadShard { path: PathBuf, reason: String },
    /// A `tokenizer.json` that cannot be understood.
    #[error("{path}: {reason}")]
    BadTokenizerFile { path: PathBuf, reason: String },
    /// A dataset directory whose files do not fit together.
    #[error("dataset {dir}: {reason}")]
    BadDataset { dir: PathBuf, reason: String },
    /// A text input that is not UTF-8; `offset` is the byte offset of the first bad byte.
    #[error("{path}: not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { path: PathBuf, offset: u64 },
    /// A JSONL line that is not a `{"prompt": "...", "completion": "..."}` object.
    /// `line` counts from 1.
    #[error("{path}:{line}: {reason}")]
    BadJsonl { path: PathBuf, line: u64, reason: String },

    // --- Text or ids the tokenizer cannot handle.
    #[error("character {ch:?} (U+{:04X}) is not in the tokenizer's vocabulary", u32::from(*ch))]
    UnknownChar { ch: char },
    #[error("token id {id} is out of range for a vocabulary of {vocab_size}")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    /// An error reported by the Hugging Face `tokenizers` crate.
    #[error("tokenizer: {0}")]
    Tokenizers(tokenizers::Error),
    /// Text of an input file that the tokenizer could not encode.
    #[error("{path}: {error}")]
    Encode { path: PathBuf, error: Box<Error> },

    // --- The caller asked for something that cannot be done.
    #[error(
        "unknown tokenizer {0:?}: expected gpt2, char, bpe:<vocab_size> or a tokenizer.json path"
    )]
    UnknownTokenizer(String),
    #[error("{0}")]
    InvalidArgument(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Error {
        Error::Io { path: path.into(), error }
    }
}
