//! GPT-2's tokenizer in the Hugging Face `tokenizer.json` format, derived from tiktoken's
//! r50k_base ranks, and the check that recognises such a file when one is loaded.
//!
//! tiktoken stores only a rank per token; Hugging Face's BPE wants a vocabulary and an
//! ordered list of merges. A token's id is its rank; its merge is the last step of BPE run
//! on its own bytes with only the lower ranks available, which leaves exactly two pieces.
//! Merges listed in rank order make Hugging Face's BPE apply them in tiktoken's order.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use super::byte_bpe::byte_to_char;
use super::{END_OF_TEXT, GPT2_EOT, GPT2_VOCAB_SIZE};

/// GPT-2's vocabulary as Hugging Face writes it.
pub(crate) struct Gpt2Vocab {
    /// `tokens[id]`: the token's bytes in the byte-level alphabet; the last is
    /// `<|endoftext|>` itself.
    tokens: Vec<String>,
    /// The (left, right) ids of each merge, in the order BPE applies them.
    merges: Vec<(u32, u32)>,
}

/// The vocabulary and merges, derived once per process from tiktoken's ranks.
pub(crate) fn vocab() -> &'static Gpt2Vocab {
    static VOCAB: OnceLock<Gpt2Vocab> = OnceLock::new();
    VOCAB.get_or_init(|| derive(tiktoken_rs::r50k_base_singleton()))
}

fn derive(bpe: &CoreBPE) -> Gpt2Vocab {
    // Every id below end-of-text is an ordinary token whose rank is its id.
    let bytes: Vec<Vec<u8>> = (0..GPT2_EOT)
        .map(|id| bpe.decode_bytes(&[id]).expect("r50k_base has ids 0..50256"))
        .collect();
    let ranks: HashMap<&[u8], u32> =
        bytes.iter().enumerate().map(|(id, b)| (b.as_slice(), id as u32)).collect();
    let merges = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| b.len() > 1)
        .map(|(id, b)| last_merge(b, id as u32, &ranks))
        .collect();
    let mut tokens: Vec<String> =
        bytes.iter().map(|b| b.iter().map(|&x| byte_to_char(x)).collect()).collect();
    tokens.push(END_OF_TEXT.to_string());
    Gpt2Vocab { tokens, merges }
}

/// The two ids that BPE on `token`'s bytes joins last, using only ranks below `rank`.
///
/// The merge loop is tiktoken's: join the adjacent pair whose concatenation has the lowest
/// rank (the leftmost on a tie) until no concatenation ranks below `rank`.
fn last_merge(token: &[u8], rank: u32, ranks: &HashMap<&[u8], u32>) -> (u32, u32) {
    // The pieces are token[bounds[i]..bounds[i + 1]].
    let mut bounds: Vec<usize> = (0..=token.len()).collect();
    while bounds.len() > 3 {
        let best = (0..bounds.len() - 2)
            .filter_map(|i| ranks.get(&token[bounds[i]..bounds[i + 2]]).map(|&r| (r, i)))
            .filter(|&(r, _)| r < rank)
            .min();
        match best {
            Some((_, i)) => {
                bounds.remove(i + 1);
            }
            None => break,
        }
    }
    // tiktoken's vocabulary is closed under this: every token of more than one byte is the
    // join of two lower-ranked tokens.
    assert_eq!(bounds.len(), 3, "r50k_base token {rank} is not two lower-ranked tokens");
    (ranks[&token[..bounds[1]]], ranks[&token[bounds[1]..]])
}

impl Gpt2Vocab {
    /// The Hugging Face tokenizer: byte-level BPE with GPT-2's pre-tokenizer (no prefix
    /// space) and decoder, and `<|endoftext|>` as added token 50256.
    pub(crate) fn hf_tokenizer(&self) -> tokenizers::Tokenizer {
        let vocab: Vocab =
            self.tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
        let merges = self
            .merges
            .iter()
            .map(|&(a, b)| (self.token(a).to_string(), self.token(b).to_string()))
            .collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .expect("merges are between tokens of the vocabulary");
        let byte_level = ByteLevel::new(false, true, true);
        let mut hf = tokenizers::Tokenizer::new(model);
        hf.with_pre_tokenizer(Some(byte_level));
        hf.with_post_processor(Some(byte_level));
        hf.with_decoder(Some(byte_level));
        // Already in the vocabulary, so it keeps id 50256.
        hf.add_special_tokens(&[AddedToken::from(END_OF_TEXT, true)]);
        hf
    }

    fn token(&self, id: u32) -> &str {
        &self.tokens[id as usize]
    }

    /// Whether `json`, a Hugging Face `tokenizer.json`, encodes and decodes exactly as GPT-2:
    /// the same vocabulary and merges, no normalizer, a ByteLevel pre-tokenizer without a
    /// prefix space and with GPT-2's split regex, a ByteLevel decoder, and end-of-text as
    /// its only added token. Hugging Face's own `gpt2` file passes.
    pub(crate) fn matches_hf_file(&self, json: &Value) -> bool {
        let model = &json["model"];
        let null_or = |v: &Value, ok: &Value| v.is_null() || v == ok;
        let byte_level = |v: &Value| v["type"] == "ByteLevel";
        model["type"] == "BPE"
            && model["dropout"].is_null()
            && model["unk_token"].is_null()
            && null_or(&model["continuing_subword_prefix"], &Value::from(""))
            && null_or(&model["end_of_word_suffix"], &Value::from(""))
            && null_or(&model["byte_fallback"], &Value::Bool(false))
            && json["normalizer"].is_null()
            && byte_level(&json["pre_tokenizer"])
            && json["pre_tokenizer"]["add_prefix_space"] == false
            && null_or(&json["pre_tokenizer"]["use_regex"], &Value::Bool(true))
            && byte_level(&json["decoder"])
            && (json["post_processor"].is_null() || byte_level(&json["post_processor"]))
            && self.only_added_token_is_eot(&json["added_tokens"])
            && self.same_vocab(&model["vocab"])
            && self.same_merges(&model["merges"])
    }

    fn only_added_token_is_eot(&self, added: &Value) -> bool {
        match added.as_array().map(Vec::as_slice) {
            Some([eot]) => eot["id"] == GPT2_EOT && eot["content"] == END_OF_TEXT,
            _ => false,
        }
    }

    fn same_vocab(&self, vocab: &Value) -> bool {
        let Some(vocab) = vocab.as_object() else {
            return false;
        };
        vocab.len() == GPT2_VOCAB_SIZE
            && self
                .tokens
                .iter()
                .enumerate()
                .all(|(id, t)| vocab.get(t).and_then(Value::as_u64) == Some(id as u64))
    }

    /// Merges are `["a", "b"]` pairs (what `tokenizers` writes since 0.20) or `"a b"`
    /// strings (older files, such as Hugging Face's published GPT-2).
    fn same_merges(&self, merges: &Value) -> bool {
        let Some(merges) = merges.as_array() else {
            return false;
        };
        merges.len() == self.merges.len()
            && merges.iter().zip(&self.merges).all(|(m, &(a, b))| {
                let (a, b) = (self.token(a), self.token(b));
                match m {
                    Value::Array(pair) => pair.len() == 2 && pair[0] == a && pair[1] == b,
                    // Byte-level tokens never contain a space (it maps to 'Ġ').
                    Value::String(s) => s.split_once(' ') == Some((a, b)),
                    _ => false,
                }
            })
    }
}
