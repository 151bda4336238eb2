//! Streaming writers for token and mask shards.
//!
//! A writer streams items to a temporary file beside the target, and `finish` writes the
//! header (which needs the final count), syncs the file and renames it into place. A reader
//! therefore sees either the old complete file or the new complete file, never a partial one.
//! A writer dropped without `finish` removes its temporary file.

use std::fs::{self, File};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{Header, TokenWidth, HEADER_LEN, MASK_MAGIC, TOKEN_MAGIC};
use crate::error::{Error, Result};

/// Writes a token shard (`train.bin`, `val.bin`).
pub struct ShardWriter {
    raw: RawWriter,
    width: TokenWidth,
}

impl ShardWriter {
    /// Starts writing a token shard that will appear at `path` on `finish`.
    pub fn create(path: &Path, width: TokenWidth) -> Result<ShardWriter> {
        let raw = RawWriter::create(path, TOKEN_MAGIC, width.bytes() as u32)?;
        Ok(ShardWriter { raw, width })
    }

    /// Appends tokens. An id too large for the shard's width is an error.
    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        self.raw.scratch.clear();
        match self.width {
            TokenWidth::U16 => {
                for &t in tokens {
                    let t = u16::try_from(t).map_err(|_| too_wide(t, self.width))?;
                    self.raw.scratch.extend_from_slice(&t.to_le_bytes());
                }
            }
            TokenWidth::U32 => {
                for &t in tokens {
                    self.raw.scratch.extend_from_slice(&t.to_le_bytes());
                }
            }
        }
        self.raw.write_scratch(tokens.len())
    }

    /// Tokens pushed so far.
    pub fn len(&self) -> u64 {
        self.raw.count
    }

    /// Whether no tokens were pushed yet.
    pub fn is_empty(&self) -> bool {
        self.raw.count == 0
    }

    /// Writes the header, syncs and renames the file into place; returns the token count.
    pub fn finish(self) -> Result<u64> {
        self.raw.finish()
    }
}

fn too_wide(id: u32, width: TokenWidth) -> Error {
    Error::InvalidArgument(format!(
        "token id {id} does not fit a {}-byte token shard",
        width.bytes()
    ))
}

/// Writes a loss-mask shard (`train.mask`, `val.mask`).
pub struct MaskWriter {
    raw: RawWriter,
}

impl MaskWriter {
    /// Starts writing a mask shard that will appear at `path` on `finish`.
    pub fn create(path: &Path) -> Result<MaskWriter> {
        Ok(MaskWriter { raw: RawWriter::create(path, MASK_MAGIC, 1)? })
    }

    /// Appends mask entries; each must be 0 (ignored) or 1 (loss target).
    pub fn push(&mut self, mask: &[u8]) -> Result<()> {
        if let Some(&bad) = mask.iter().find(|&&m| m > 1) {
            return Err(Error::InvalidArgument(format!("mask value {bad} is not 0 or 1")));
        }
        self.raw.scratch.clear();
        self.raw.scratch.extend_from_slice(mask);
        self.raw.write_scratch(mask.len())
    }

    /// Entries pushed so far.
    pub fn len(&self) -> u64 {
        self.raw.count
    }

    /// Whether no entries were pushed yet.
    pub fn is_empty(&self) -> bool {
        self.raw.count == 0
    }

    /// Writes the header, syncs and renames the file into place; returns the entry count.
    pub fn finish(self) -> Result<u64> {
        self.raw.finish()
    }
}

/// The part shared by both writers: temporary file, count, header, rename.
struct RawWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    /// `None` once finished, so `Drop` knows not to clean up.
    out: Option<BufWriter<File>>,
    magic: [u8; 8],
    width: u32,
    count: u64,
    /// Encoded bytes of the current push, reused so pushes do not allocate.
    scratch: Vec<u8>,
}

impl RawWriter {
    fn create(path: &Path, magic: [u8; 8], width: u32) -> Result<RawWriter> {
        let tmp_path = temp_name(path);
        let file = File::create(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        // Placeholder header; the real one is written by `finish`.
        out.write_all(&[0u8; HEADER_LEN]).map_err(|e| Error::io(&tmp_path, e))?;
        Ok(RawWriter {
            path: path.to_path_buf(),
            tmp_path,
            out: Some(out),
            magic,
            width,
            count: 0,
            scratch: Vec::new(),
        })
    }

    /// Writes `scratch`, which holds `n` encoded items.
    fn write_scratch(&mut self, n: usize) -> Result<()> {
        let out = self.out.as_mut().expect("writer used after finish");
        out.write_all(&self.scratch).map_err(|e| Error::io(&self.tmp_path, e))?;
        self.count += n as u64;
        Ok(())
    }

    fn finish(mut self) -> Result<u64> {
        let out = self.out.take().expect("writer finished twice");
        let tmp = &self.tmp_path;
        let mut file = out.into_inner().map_err(|e| Error::io(tmp, e.into_error()))?;
        let header = Header { magic: self.magic, width: self.width, count: self.count };
        file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(tmp, e))?;
        file.write_all(&header.encode()).map_err(|e| Error::io(tmp, e))?;
        file.sync_all().map_err(|e| Error::io(tmp, e))?;
        drop(file);
        fs::rename(tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        sync_parent_dir(&self.path);
        Ok(self.count)
    }
}

impl Drop for RawWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            // Unfinished: the partial file must not be mistaken for a shard.
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// `dir/.name.tmp-<pid>`: hidden, in the same directory so the rename stays on one
/// filesystem, and per process so two writers do not collide.
fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Makes the rename durable. Best effort: some filesystems refuse to sync a directory, and
/// the data itself is already synced.
fn sync_parent_dir(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}
