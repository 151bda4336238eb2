//! Tokenizers: GPT-2's (`gpt2`), character-level (`char`) and byte-level BPE trained on the
//! corpus (`bpe:<vocab_size>`), each saved to and loaded from a `tokenizer.json`.
//!
//! What `tokenizer.json` holds, by kind:
//! - `gpt2`: GPT-2's tokenizer in the Hugging Face format (vocabulary and merges derived from
//!   the r50k_base ranks in `tiktoken-rs`), so `transformers` reads a checkpoint's tokenizer.
//!   Loading recognises it by content and encodes with tiktoken, which is faster; the older
//!   `{"ferrite_tokenizer": "gpt2"}` marker file still loads.
//! - `char`: `{"ferrite_tokenizer": "char", "chars": ["\n", " ", "A", ...]}`, the characters
//!   in id order (sorted by code point).
//! - `bpe`: the Hugging Face `tokenizers` format, as that crate saves it. Any byte-level
//!   Hugging Face `tokenizer.json` loads the same way (as `gpt2` when it is GPT-2's).

mod byte_bpe;
mod char;
mod gpt2_hf;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use self::byte_bpe::ByteBpe;
use self::char::CharVocab;
use crate::error::{Error, Result};

/// The end-of-text token's text in the `gpt2` and `bpe` vocabularies.
pub const END_OF_TEXT: &str = "<|endoftext|>";

const GPT2_VOCAB_SIZE: usize = 50257;
const GPT2_EOT: u32 = 50256;

/// A tokenizer named on the command line: `gpt2`, `char` or `bpe:<vocab_size>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerSpec {
    Gpt2,
    Char,
    Bpe { vocab_size: usize },
}

impl TokenizerSpec {
    /// Whether building this tokenizer reads the corpus (`char` and `bpe` do; `gpt2` is fixed).
    pub fn needs_corpus(self) -> bool {
        match self {
            TokenizerSpec::Gpt2 => false,
            TokenizerSpec::Char | TokenizerSpec::Bpe { .. } => true,
        }
    }
}

impl FromStr for TokenizerSpec {
    type Err = Error;

    fn from_str(name: &str) -> Result<TokenizerSpec> {
        match name {
            "gpt2" => Ok(TokenizerSpec::Gpt2),
            "char" => Ok(TokenizerSpec::Char),
            _ => {
                let size = name.strip_prefix("bpe:").and_then(|n| n.parse().ok());
                match size {
                    Some(vocab_size) => Ok(TokenizerSpec::Bpe { vocab_size }),
                    None => Err(Error::UnknownTokenizer(name.to_string())),
                }
            }
        }
    }
}

impl fmt::Display for TokenizerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerSpec::Gpt2 => write!(f, "gpt2"),
            TokenizerSpec::Char => write!(f, "char"),
            TokenizerSpec::Bpe { vocab_size } => write!(f, "bpe:{vocab_size}"),
        }
    }
}

/// A tokenizer of any kind; see the module docs for the kinds and their files.
#[derive(Clone)]
pub struct Tokenizer {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Gpt2(&'static CoreBPE),
    Char(CharVocab),
    // Boxed: the Hugging Face tokenizer is large and the other kinds are small.
    Bpe(Box<ByteBpe>),
}

/// The JSON of the tokenizers whose `tokenizer.json` ferrite defines itself. `gpt2` is only
/// read (files from before `gpt2` was saved in the Hugging Face format).
#[derive(Serialize, Deserialize)]
#[serde(tag = "ferrite_tokenizer", rename_all = "lowercase")]
enum OwnFile {
    Gpt2,
    Char { chars: Vec<char> },
}

impl Tokenizer {
    /// GPT-2's byte-level BPE (r50k_base): 50257 tokens, end-of-text 50256.
    pub fn gpt2() -> Tokenizer {
        Tokenizer { kind: Kind::Gpt2(tiktoken_rs::r50k_base_singleton()) }
    }

    /// Builds the tokenizer `name` (`gpt2`, `char` or `bpe:<vocab_size>`); `char` and `bpe`
    /// learn their vocabulary from `corpus`, which `gpt2` does not read.
    pub fn by_name<I, S>(name: &str, corpus: I) -> Result<Tokenizer>
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: Send,
        S: AsRef<str> + Send,
    {
        Tokenizer::from_spec(name.parse()?, corpus)
    }

    /// [`Tokenizer::by_name`] with the name already parsed.
    pub fn from_spec<I, S>(spec: TokenizerSpec, corpus: I) -> Result<Tokenizer>
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: Send,
        S: AsRef<str> + Send,
    {
        let kind = match spec {
            TokenizerSpec::Gpt2 => return Ok(Tokenizer::gpt2()),
            TokenizerSpec::Char => Kind::Char(CharVocab::from_corpus(corpus)?),
            TokenizerSpec::Bpe { vocab_size } => {
                Kind::Bpe(Box::new(ByteBpe::train(vocab_size, corpus.into_iter())?))
            }
        };
        Ok(Tokenizer { kind })
    }

    /// Loads a `tokenizer.json` written by [`Tokenizer::save`], or any byte-level Hugging
    /// Face tokenizer file. A file that encodes exactly as GPT-2 (see
    /// `Gpt2Vocab::matches_hf_file`) loads as `gpt2`.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let bad = |reason: String| Error::BadTokenizerFile { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let kind = if json.get("ferrite_tokenizer").is_some() {
            match serde_json::from_value(json).map_err(|e| bad(e.to_string()))? {
                OwnFile::Gpt2 => Kind::Gpt2(tiktoken_rs::r50k_base_singleton()),
                OwnFile::Char { chars } => Kind::Char(CharVocab::from_saved(chars).map_err(bad)?),
            }
        } else if gpt2_hf::vocab().matches_hf_file(&json) {
            Kind::Gpt2(tiktoken_rs::r50k_base_singleton())
        } else {
            let hf = tokenizers::Tokenizer::from_str(&text)
                .map_err(|e| bad(format!("not a Hugging Face tokenizer: {e}")))?;
            Kind::Bpe(Box::new(ByteBpe::from_hf(hf).map_err(bad)?))
        };
        Ok(Tokenizer { kind })
    }

    /// Writes this tokenizer's `tokenizer.json` to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let own = |file: &OwnFile| {
            serde_json::to_string_pretty(file).expect("plain data always serialises")
        };
        let json = match &self.kind {
            Kind::Gpt2(_) => {
                gpt2_hf::vocab().hf_tokenizer().to_string(true).map_err(Error::Tokenizers)?
            }
            Kind::Char(vocab) => own(&OwnFile::Char { chars: vocab.chars().to_vec() }),
            Kind::Bpe(bpe) => bpe.hf().to_string(true).map_err(Error::Tokenizers)?,
        };
        std::fs::write(path, json + "\n").map_err(|e| Error::io(path, e))
    }

    /// The kind of tokenizer: `gpt2`, `char` or `bpe`.
    pub fn kind(&self) -> &'static str {
        match self.kind {
            Kind::Gpt2(_) => "gpt2",
            Kind::Char(_) => "char",
            Kind::Bpe(_) => "bpe",
        }
    }

    /// The token ids of `text`.
    ///
    /// For `gpt2`, a literal `<|endoftext|>` in the text is encoded as ordinary text; for
    /// `bpe` the Hugging Face tokenizer turns it into the end-of-text id. For `char`, a
    /// character outside the vocabulary is an error naming it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
            Kind::Char(vocab) => vocab.encode(text),
            Kind::Bpe(bpe) => bpe.encode(text),
        }
    }

    /// The text of `ids`. Byte sequences that are not UTF-8 (a model can sample any ids)
    /// become U+FFFD; use [`Tokenizer::decode_bytes`] to get them exactly.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes = self.decode_bytes(ids)?;
        Ok(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The raw bytes of `ids`, which need not be complete UTF-8: a streaming printer can
    /// hold back a partial character until the next token completes it. An id outside the
    /// vocabulary is an error naming it.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match &self.kind {
            Kind::Gpt2(bpe) => bpe
                .decode_bytes(ids)
                .map_err(|e| Error::TokenOutOfRange { id: e.token, vocab_size: GPT2_VOCAB_SIZE }),
            Kind::Char(vocab) => vocab.decode_bytes(ids),
            Kind::Bpe(bpe) => bpe.decode_bytes(ids),
        }
    }

    /// Number of ids; every id is below this.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Gpt2(_) => GPT2_VOCAB_SIZE,
            Kind::Char(vocab) => vocab.len(),
            Kind::Bpe(bpe) => bpe.vocab_size(),
        }
    }

    /// Texts that [`Tokenizer::encode`] turns into one token wherever they occur, before
    /// ordinary tokenization (the Hugging Face tokenizer's added tokens); empty for `gpt2`
    /// and `char`.
    pub(crate) fn added_tokens(&self) -> Vec<String> {
        match &self.kind {
            Kind::Gpt2(_) | Kind::Char(_) => Vec::new(),
            Kind::Bpe(bpe) => bpe.added_tokens(),
        }
    }

    /// The end-of-text id, where the tokenizer has one (`char` does not).
    pub fn eot(&self) -> Option<u32> {
        match &self.kind {
            Kind::Gpt2(_) => Some(GPT2_EOT),
            Kind::Char(_) => None,
            Kind::Bpe(bpe) => bpe.eot(),
        }
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.vocab_size())
            .field("eot", &self.eot())
            .finish()
    }
}
