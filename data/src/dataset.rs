//! A prepared dataset directory, opened as one value.
//!
//! ```text
//! DIR/tokenizer.json   the tokenizer (see `tokenizer`)
//! DIR/train.bin        token shard
//! DIR/val.bin          token shard
//! DIR/train.mask       loss mask for train.bin (finetuning data only)
//! DIR/val.mask         loss mask for val.bin   (present exactly when train.mask is)
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::shard::{MaskShard, TokenShard, TokenWidth};
use crate::tokenizer::Tokenizer;

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TRAIN_TOKENS: &str = "train.bin";
pub const VAL_TOKENS: &str = "val.bin";
pub const TRAIN_MASK: &str = "train.mask";
pub const VAL_MASK: &str = "val.mask";

/// The shards and tokenizer of a dataset directory.
pub struct Dataset {
    pub train: TokenShard,
    pub val: TokenShard,
    pub train_mask: Option<MaskShard>,
    pub val_mask: Option<MaskShard>,
    pub tokenizer: Tokenizer,
}

impl Dataset {
    /// Opens every file of the dataset in `dir` and checks that they fit together: both token
    /// shards have one width, wide enough for the vocabulary; masks are both present or both
    /// absent, each as long as its token shard.
    ///
    /// Token ids are not checked against the vocabulary size: that would read every token.
    pub fn open(dir: &Path) -> Result<Dataset> {
        let bad = |reason: String| Error::BadDataset { dir: dir.to_path_buf(), reason };
        let tokenizer = Tokenizer::load(&dir.join(TOKENIZER_FILE))?;
        let train = TokenShard::open(&dir.join(TRAIN_TOKENS))?;
        let val = TokenShard::open(&dir.join(VAL_TOKENS))?;
        if train.width() != val.width() {
            return Err(bad(format!(
                "{TRAIN_TOKENS} has {}-byte tokens but {VAL_TOKENS} has {}-byte tokens",
                train.width().bytes(),
                val.width().bytes()
            )));
        }
        let needed = TokenWidth::for_vocab(tokenizer.vocab_size());
        if needed.bytes() > train.width().bytes() {
            return Err(bad(format!(
                "the vocabulary of {} tokens needs {}-byte tokens but the shards have {}",
                tokenizer.vocab_size(),
                needed.bytes(),
                train.width().bytes()
            )));
        }

        let (train_mask, val_mask) = match (mask_path(dir, TRAIN_MASK), mask_path(dir, VAL_MASK)) {
            (None, None) => (None, None),
            (Some(t), Some(v)) => (Some(MaskShard::open(&t)?), Some(MaskShard::open(&v)?)),
            (Some(_), None) => return Err(bad(format!("{TRAIN_MASK} without {VAL_MASK}"))),
            (None, Some(_)) => return Err(bad(format!("{VAL_MASK} without {TRAIN_MASK}"))),
        };
        for (mask, tokens) in [(&train_mask, &train), (&val_mask, &val)] {
            if let Some(mask) = mask {
                if mask.len() != tokens.len() {
                    return Err(bad(format!(
                        "{} has {} entries but {} has {} tokens",
                        mask.path().display(),
                        mask.len(),
                        tokens.path().display(),
                        tokens.len()
                    )));
                }
            }
        }
        Ok(Dataset { train, val, train_mask, val_mask, tokenizer })
    }
}

/// `dir/name` if it exists.
fn mask_path(dir: &Path, name: &str) -> Option<PathBuf> {
    let path = dir.join(name);
    path.exists().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{MaskWriter, ShardWriter};

    fn write_tokens(path: &Path, width: TokenWidth, tokens: &[u32]) {
        let mut w = ShardWriter::create(path, width).unwrap();
        w.push(tokens).unwrap();
        w.finish().unwrap();
    }

    fn write_mask(path: &Path, mask: &[u8]) {
        let mut w = MaskWriter::create(path).unwrap();
        w.push(mask).unwrap();
        w.finish().unwrap();
    }

    /// A char dataset over "abc" with 4 train and 2 val tokens.
    fn char_dataset(dir: &Path) {
        Tokenizer::by_name("char", ["abc"]).unwrap().save(&dir.join(TOKENIZER_FILE)).unwrap();
        write_tokens(&dir.join(TRAIN_TOKENS), TokenWidth::U16, &[0, 1, 2, 0]);
        write_tokens(&dir.join(VAL_TOKENS), TokenWidth::U16, &[2, 1]);
    }

    fn assert_bad_dataset(result: Result<Dataset>, what: &str) {
        match result {
            Err(e @ Error::BadDataset { .. }) => {
                assert!(e.to_string().contains(what), "expected {what:?} in: {e}")
            }
            Err(e) => panic!("expected BadDataset, got {e}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn opens_a_dataset_without_masks() {
        let dir = tempfile::tempdir().unwrap();
        char_dataset(dir.path());
        let ds = Dataset::open(dir.path()).unwrap();
        assert_eq!(ds.train.to_vec(), vec![0, 1, 2, 0]);
        assert_eq!(ds.val.len(), 2);
        assert!(ds.train_mask.is_none() && ds.val_mask.is_none());
        assert_eq!(ds.tokenizer.vocab_size(), 3);
    }

    #[test]
    fn opens_a_dataset_with_masks_of_matching_length() {
        let dir = tempfile::tempdir().unwrap();
        char_dataset(dir.path());
        write_mask(&dir.path().join(TRAIN_MASK), &[0, 0, 1, 1]);
        write_mask(&dir.path().join(VAL_MASK), &[0, 1]);
        let ds = Dataset::open(dir.path()).unwrap();
        assert_eq!(ds.train_mask.unwrap().to_vec(), vec![0, 0, 1, 1]);
        assert_eq!(ds.val_mask.unwrap().to_vec(), vec![0, 1]);
    }

    #[test]
    fn rejects_mask_length_mismatch_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        char_dataset(dir.path());
        write_mask(&dir.path().join(TRAIN_MASK), &[0, 0, 1]);
        write_mask(&dir.path().join(VAL_MASK), &[0, 1]);
        assert_bad_dataset(Dataset::open(dir.path()), "train.mask has 3 entries");
    }

    #[test]
    fn rejects_a_train_mask_without_a_val_mask() {
        let dir = tempfile::tempdir().unwrap();
        char_dataset(dir.path());
        write_mask(&dir.path().join(TRAIN_MASK), &[0, 0, 1, 1]);
        assert_bad_dataset(Dataset::open(dir.path()), "train.mask without val.mask");
    }

    #[test]
    fn rejects_shards_of_different_widths() {
        let dir = tempfile::tempdir().unwrap();
        char_dataset(dir.path());
        write_tokens(&dir.path().join(VAL_TOKENS), TokenWidth::U32, &[2, 1]);
        assert_bad_dataset(Dataset::open(dir.path()), "4-byte tokens");
    }

    #[test]
    fn rejects_shards_too_narrow_for_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        // 70000 distinct characters need 4-byte ids.
        let chars: String = (0x4E00u32..0x4E00 + 70_000).filter_map(char::from_u32).collect();
        let tok = Tokenizer::by_name("char", [chars.as_str()]).unwrap();
        assert!(tok.vocab_size() > 65536);
        tok.save(&dir.path().join(TOKENIZER_FILE)).unwrap();
        write_tokens(&dir.path().join(TRAIN_TOKENS), TokenWidth::U16, &[0]);
        write_tokens(&dir.path().join(VAL_TOKENS), TokenWidth::U16, &[0]);
        assert_bad_dataset(Dataset::open(dir.path()), "needs 4-byte tokens");
    }

    #[test]
    fn missing_val_shard_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        char_dataset(dir.path());
        std::fs::remove_file(dir.path().join(VAL_TOKENS)).unwrap();
        let err = Dataset::open(dir.path()).err().expect("error");
        assert!(err.to_string().contains("val.bin"), "{err}");
    }
}
