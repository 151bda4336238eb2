//! Memory-mapped readers for token and mask shards.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{Header, TokenWidth, HEADER_LEN, MASK_MAGIC, TOKEN_MAGIC};
use crate::error::{Error, Result};

/// A token shard (`train.bin`, `val.bin`), memory-mapped read-only.
///
/// Reading is allocation-free; the operating system pages the file in as it is touched, so a
/// shard larger than memory works.
pub struct TokenShard {
    map: Mapped,
    width: TokenWidth,
}

impl TokenShard {
    /// Opens and checks a token shard: magic, version, width (2 or 4) and exact file size.
    pub fn open(path: &Path) -> Result<TokenShard> {
        let (map, header) = Mapped::open(path, TOKEN_MAGIC, &[2, 4])?;
        let width = TokenWidth::from_bytes(header.width).expect("width checked by decode");
        Ok(TokenShard { map, width })
    }

    /// The file this shard was opened from.
    pub fn path(&self) -> &Path {
        &self.map.path
    }

    /// Bytes per token in the file.
    pub fn width(&self) -> TokenWidth {
        self.width
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Whether the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Token `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`, like slice indexing.
    pub fn get(&self, i: usize) -> u32 {
        let mut one = [0u32];
        self.read_into(i, &mut one);
        one[0]
    }

    /// Copies tokens `start..start + out.len()` into `out`, without allocating.
    ///
    /// # Panics
    /// If the range runs past the end of the shard, like slice indexing.
    pub fn read_into(&self, start: usize, out: &mut [u32]) {
        let bytes = self.map.items(start, out.len(), self.width.bytes());
        match self.width {
            TokenWidth::U16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = u32::from(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            TokenWidth::U32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }

    /// All tokens, copied into a vector (for small shards and tests).
    pub fn to_vec(&self) -> Vec<u32> {
        let mut out = vec![0; self.len()];
        self.read_into(0, &mut out);
        out
    }
}

/// A loss-mask shard (`train.mask`, `val.mask`): one byte per token, 1 when the token counts
/// as a loss target and 0 when it is ignored.
pub struct MaskShard {
    map: Mapped,
}

impl MaskShard {
    /// Opens and checks a mask shard: magic, version, width (1) and exact file size.
    pub fn open(path: &Path) -> Result<MaskShard> {
        let (map, _) = Mapped::open(path, MASK_MAGIC, &[1])?;
        Ok(MaskShard { map })
    }

    /// The file this shard was opened from.
    pub fn path(&self) -> &Path {
        &self.map.path
    }

    /// Number of mask entries (equal to the number of tokens it goes with).
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Whether the shard holds no entries.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Mask entry `i`: 1 for a loss target, 0 for an ignored token.
    ///
    /// # Panics
    /// If `i >= self.len()`, like slice indexing.
    pub fn get(&self, i: usize) -> u8 {
        self.map.items(i, 1, 1)[0]
    }

    /// Copies entries `start..start + out.len()` into `out`, without allocating.
    ///
    /// # Panics
    /// If the range runs past the end of the shard, like slice indexing.
    pub fn read_into(&self, start: usize, out: &mut [u8]) {
        out.copy_from_slice(self.map.items(start, out.len(), 1));
    }

    /// All entries, copied into a vector (for small shards and tests).
    pub fn to_vec(&self) -> Vec<u8> {
        self.map.items(0, self.len(), 1).to_vec()
    }
}

/// A checked, mapped shard file of either kind.
struct Mapped {
    path: PathBuf,
    map: Mmap,
    /// Number of items after the header.
    len: usize,
}

impl Mapped {
    fn open(path: &Path, magic: [u8; 8], widths: &[u32]) -> Result<(Mapped, Header)> {
        let bad = |reason: String| Error::BadShard { path: path.to_path_buf(), reason };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < HEADER_LEN as u64 {
            return Err(bad(format!(
                "truncated: {file_len} bytes, shorter than the {HEADER_LEN}-byte header"
            )));
        }
        // SAFETY: the mapping is read-only. Shards are written once under a temporary name
        // and renamed into place, never modified in place, so the mapped bytes do not change
        // under us; a file replaced by a later `prepare` keeps the old inode alive.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header_bytes: &[u8; HEADER_LEN] =
            map[..HEADER_LEN].try_into().expect("length checked above");
        // Check against the mapped length, which is what we will read.
        let header = Header::decode(path, header_bytes, magic, widths, map.len() as u64)?;
        let len = usize::try_from(header.count)
            .map_err(|_| bad(format!("{} items do not fit this machine", header.count)))?;
        Ok((Mapped { path: path.to_path_buf(), map, len }, header))
    }

    /// The bytes of items `start..start + n`, each `width` bytes wide.
    fn items(&self, start: usize, n: usize, width: usize) -> &[u8] {
        assert!(
            start.checked_add(n).is_some_and(|end| end <= self.len),
            "shard {}: items {start}..{} out of range for length {}",
            self.path.display(),
            start.saturating_add(n),
            self.len
        );
        &self.map[HEADER_LEN + start * width..HEADER_LEN + (start + n) * width]
    }
}
