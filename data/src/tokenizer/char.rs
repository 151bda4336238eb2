//! The character-level tokenizer: one token per Unicode scalar value seen in the corpus.

use std::collections::{BTreeSet, HashMap};

use crate::error::{Error, Result};

/// A vocabulary of characters; a character's id is its index in sorted order.
#[derive(Clone, Debug)]
pub(crate) struct CharVocab {
    /// Strictly increasing.
    chars: Vec<char>,
    ids: HashMap<char, u32>,
}

impl CharVocab {
    /// Collects the distinct characters of `corpus`.
    pub(crate) fn from_corpus<I, S>(corpus: I) -> Result<CharVocab>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        // ASCII dominates most corpora: a flag table keeps the common case off the set.
        let mut ascii = [false; 128];
        let mut other = BTreeSet::new();
        for text in corpus {
            for c in text.as_ref().chars() {
                match ascii.get_mut(c as usize) {
                    Some(seen) => *seen = true,
                    None => {
                        other.insert(c);
                    }
                }
            }
        }
        let ascii_chars = (0u8..128).filter(|&b| ascii[b as usize]).map(char::from);
        let chars: Vec<char> = ascii_chars.chain(other).collect();
        if chars.is_empty() {
            return Err(Error::InvalidArgument(
                "char tokenizer: the corpus has no characters".into(),
            ));
        }
        Ok(CharVocab::from_sorted(chars))
    }

    /// Builds a vocabulary from a saved character list, which must be strictly increasing.
    pub(crate) fn from_saved(chars: Vec<char>) -> std::result::Result<CharVocab, String> {
        if chars.is_empty() {
            return Err("the character list is empty".into());
        }
        if let Some(i) = chars.windows(2).position(|w| w[0] >= w[1]) {
            return Err(format!(
                "the character list is not sorted without repeats at index {}: {:?} then {:?}",
                i + 1,
                chars[i],
                chars[i + 1]
            ));
        }
        Ok(CharVocab::from_sorted(chars))
    }

    fn from_sorted(chars: Vec<char>) -> CharVocab {
        let ids = chars.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
        CharVocab { chars, ids }
    }

    /// The characters in id order.
    pub(crate) fn chars(&self) -> &[char] {
        &self.chars
    }

    pub(crate) fn len(&self) -> usize {
        self.chars.len()
    }

    /// One id per character; a character outside the vocabulary is an error naming it.
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars().map(|ch| self.ids.get(&ch).copied().ok_or(Error::UnknownChar { ch })).collect()
    }

    /// The UTF-8 bytes of the characters of `ids`.
    pub(crate) fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len());
        let mut buf = [0u8; 4];
        for &id in ids {
            let ch = self
                .chars
                .get(id as usize)
                .ok_or(Error::TokenOutOfRange { id, vocab_size: self.chars.len() })?;
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
        }
        Ok(out)
    }
}
