//! Token shards (`train.bin`, `val.bin`) and loss-mask shards (`train.mask`, `val.mask`).
//!
//! Both share one layout: a fixed 32-byte header, then the items, little-endian.
//!
//! ```text
//! offset  size  field
//!      0     8  magic: b"FERRTOK\0" (tokens) or b"FERRMSK\0" (masks)
//!      8     4  format version, u32 = 1
//!     12     4  item width in bytes, u32: 2 or 4 for tokens, 1 for masks
//!     16     8  item count, u64
//!     24     8  reserved, zero
//!     32     .  count * width bytes of items
//! ```
//!
//! A file's size must be exactly `32 + count * width`; anything else is rejected on open.

mod read;
mod write;

#[cfg(test)]
mod tests;

pub use read::{MaskShard, TokenShard};
pub use write::{MaskWriter, ShardWriter};

use std::path::Path;

use crate::error::{Error, Result};

/// Size of the header in bytes.
pub const HEADER_LEN: usize = 32;
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Magic of a token shard.
pub const TOKEN_MAGIC: [u8; 8] = *b"FERRTOK\0";
/// Magic of a loss-mask shard.
pub const MASK_MAGIC: [u8; 8] = *b"FERRMSK\0";

/// How many bytes each token takes in a token shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenWidth {
    U16,
    U32,
}

impl TokenWidth {
    /// The narrowest width that holds every id of a vocabulary of `vocab_size` tokens.
    pub fn for_vocab(vocab_size: usize) -> TokenWidth {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    /// The largest token id this width can store.
    pub fn max_id(self) -> u32 {
        match self {
            TokenWidth::U16 => u32::from(u16::MAX),
            TokenWidth::U32 => u32::MAX,
        }
    }

    fn from_bytes(bytes: u32) -> Option<TokenWidth> {
        match bytes {
            2 => Some(TokenWidth::U16),
            4 => Some(TokenWidth::U32),
            _ => None,
        }
    }
}

/// The decoded fields of a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    magic: [u8; 8],
    width: u32,
    count: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&self.magic);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.width.to_le_bytes());
        out[16..24].copy_from_slice(&self.count.to_le_bytes());
        out
    }

    /// Parses and checks a header read from `path`, whose total size is `file_len` bytes.
    ///
    /// `widths` are the item widths allowed for this kind of shard.
    fn decode(
        path: &Path,
        bytes: &[u8; HEADER_LEN],
        expected_magic: [u8; 8],
        widths: &[u32],
        file_len: u64,
    ) -> Result<Header> {
        let bad = |reason: String| Error::BadShard { path: path.to_path_buf(), reason };
        let magic: [u8; 8] = bytes[0..8].try_into().expect("8-byte slice");
        if magic != expected_magic {
            return Err(bad(format!(
                "bad magic {}: expected {}{}",
                show_magic(&magic),
                show_magic(&expected_magic),
                kind_hint(&magic),
            )));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4-byte slice"));
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "unsupported format version {version} (this build reads version {FORMAT_VERSION})"
            )));
        }
        let width = u32::from_le_bytes(bytes[12..16].try_into().expect("4-byte slice"));
        if !widths.contains(&width) {
            return Err(bad(format!("bad item width {width} (expected one of {widths:?})")));
        }
        let count = u64::from_le_bytes(bytes[16..24].try_into().expect("8-byte slice"));
        if bytes[24..32].iter().any(|&b| b != 0) {
            return Err(bad("reserved header bytes 24..32 are not zero".into()));
        }
        let expected_len = count
            .checked_mul(u64::from(width))
            .and_then(|n| n.checked_add(HEADER_LEN as u64))
            .ok_or_else(|| bad(format!("header count {count} overflows the file size")))?;
        if file_len < expected_len {
            return Err(bad(format!(
                "truncated: header says {count} items of {width} bytes ({expected_len} bytes \
                 in all) but the file has {file_len} bytes"
            )));
        }
        if file_len > expected_len {
            return Err(bad(format!(
                "oversized: header says {count} items of {width} bytes ({expected_len} bytes \
                 in all) but the file has {file_len} bytes"
            )));
        }
        Ok(Header { magic, width, count })
    }
}

/// Shows a magic as text with escapes, e.g. `"FERRTOK\0"`.
fn show_magic(magic: &[u8; 8]) -> String {
    format!("\"{}\"", magic.escape_ascii())
}

/// A hint when a file of the other shard kind was opened by mistake.
fn kind_hint(found: &[u8; 8]) -> &'static str {
    match *found {
        TOKEN_MAGIC => " (this is a token shard)",
        MASK_MAGIC => " (this is a loss-mask shard)",
        _ => "",
    }
}
