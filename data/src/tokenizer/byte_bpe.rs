//! Byte-level BPE through the Hugging Face `tokenizers` crate: trained on a corpus by
//! `bpe:<vocab_size>`, or loaded from any byte-level `tokenizer.json`.

use std::collections::HashSet;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use super::END_OF_TEXT;
use crate::error::{Error, Result};

/// Bytes plus the end-of-text token: the smallest vocabulary `bpe:N` can train.
pub(crate) const MIN_VOCAB: usize = 257;

/// A byte-level BPE tokenizer and the byte string of each of its ids.
#[derive(Clone)]
pub(crate) struct ByteBpe {
    hf: tokenizers::Tokenizer,
    /// `id_bytes[id]`: the raw bytes token `id` stands for; `None` for an unused id.
    id_bytes: Vec<Option<Box<[u8]>>>,
    eot: Option<u32>,
}

impl ByteBpe {
    /// Trains a byte-level BPE with `vocab_size` tokens (at most; a small corpus may run out
    /// of pairs to merge first). Id 0 is `<|endoftext|>`; all 256 single bytes are tokens.
    ///
    /// `corpus` is consumed once; the trainer only keeps counts of distinct words, so it can
    /// stream a corpus larger than memory.
    pub(crate) fn train<I, S>(vocab_size: usize, corpus: I) -> Result<ByteBpe>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < MIN_VOCAB {
            return Err(Error::InvalidArgument(format!(
                "bpe:{vocab_size}: a byte-level BPE needs a vocabulary of at least {MIN_VOCAB} \
                 (256 bytes and end-of-text)"
            )));
        }
        let alphabet: HashSet<char> = (0..=255u8).map(byte_to_char).collect();
        let trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(0)
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .initial_alphabet(alphabet)
            .build();
        let mut hf = tokenizers::Tokenizer::new(BPE::default());
        // No prefix space: encoding must not add anything, so decoding gives the text back.
        hf.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        hf.with_decoder(Some(ByteLevel::new(false, true, true)));
        hf.train(&mut TrainerWrapper::BpeTrainer(trainer), corpus).map_err(Error::Tokenizers)?;
        ByteBpe::from_hf(hf).map_err(Error::InvalidArgument)
    }

    /// Wraps a tokenizer read from a `tokenizer.json`; it must be byte-level, so every id
    /// stands for a byte string. On error, says why not.
    pub(crate) fn from_hf(mut hf: tokenizers::Tokenizer) -> std::result::Result<ByteBpe, String> {
        if !matches!(hf.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return Err("not a byte-level tokenizer (its decoder is not ByteLevel), which \
                        ferrite needs to decode tokens to bytes"
                .into());
        }
        // Ferrite encodes plain token streams: no truncation or padding from the file.
        hf.with_truncation(None).map_err(|e| e.to_string())?;
        hf.with_padding(None);

        let added = hf.get_added_tokens_decoder();
        let vocab = hf.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut id_bytes: Vec<Option<Box<[u8]>>> = vec![None; size];
        for (token, id) in vocab {
            let bytes = match added.get(&id) {
                Some(added) => added.content.as_bytes().into(),
                None => token
                    .chars()
                    .map(char_to_byte)
                    .collect::<Option<Box<[u8]>>>()
                    .ok_or_else(|| format!("token {id} ({token:?}) is not byte-level"))?,
            };
            id_bytes[id as usize] = Some(bytes);
        }
        let eot = hf.token_to_id(END_OF_TEXT);
        Ok(ByteBpe { hf, id_bytes, eot })
    }

    pub(crate) fn hf(&self) -> &tokenizers::Tokenizer {
        &self.hf
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.id_bytes.len()
    }

    pub(crate) fn added_tokens(&self) -> Vec<String> {
        self.hf.get_added_tokens_decoder().into_values().map(|t| t.content).collect()
    }

    pub(crate) fn eot(&self) -> Option<u32> {
        self.eot
    }

    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.hf.encode_fast(text, false).map_err(Error::Tokenizers)?;
        Ok(encoding.get_ids().to_vec())
    }

    pub(crate) fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let bytes = self
                .id_bytes
                .get(id as usize)
                .and_then(Option::as_deref)
                .ok_or(Error::TokenOutOfRange { id, vocab_size: self.vocab_size() })?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }
}

/// GPT-2's byte-to-character map, which byte-level vocabularies are written in: printable
/// Latin-1 bytes stand for themselves, the other 68 bytes (controls, space, DEL, NBSP, soft
/// hyphen) map in increasing order to U+0100..U+0143.
pub(crate) fn byte_to_char(b: u8) -> char {
    let code = match b {
        b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF => u32::from(b),
        0..=0x20 => 0x100 + u32::from(b),
        0x7F..=0xA0 => 0x100 + 33 + u32::from(b - 0x7F),
        0xAD => 0x100 + 67,
    };
    char::from_u32(code).expect("U+0000..U+0143 are scalar values")
}

/// The inverse of [`byte_to_char`]; `None` for a character outside the map.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = u32::from(c);
    match code {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(code as u8),
        0x100..=0x120 => Some((code - 0x100) as u8),
        0x121..=0x142 => Some((code - 0x121 + 0x7F) as u8),
        0x143 => Some(0xAD),
        _ => None,
    }
}
