//! Reading text files in bounded chunks whose edges do not change the tokenization.
//!
//! GPT-2-style pre-tokenizers (tiktoken's and Hugging Face's ByteLevel) split text with a
//! regex into pieces that are either all whitespace or (an optional space plus) no
//! whitespace, and BPE never merges across pieces. In a whitespace run followed by a
//! non-whitespace character, the run's last character always starts a new piece: the
//! `\s+(?!\S)` alternative stops one short of the end of such a run. So cutting the text just
//! before that character gives the same pieces on both sides as the whole text does, and
//! chunk-by-chunk encoding equals whole-file encoding. [`is_safe_cut`] finds such places.
//!
//! A file with no safe cut for [`MAX_CHUNK_FACTOR`] times the target chunk size (one giant
//! line with no whitespace) is cut at a character boundary instead; only there can the
//! tokens differ from encoding the whole file.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How far past the target size a chunk may grow while looking for a safe cut.
const MAX_CHUNK_FACTOR: usize = 8;

/// The chunks of one text file, each valid UTF-8 and about `target` bytes (more when no safe
/// cut comes sooner). Yields `Err` once, for the first I/O or UTF-8 error, then ends.
pub(crate) struct FileChunks<'a> {
    path: PathBuf,
    target: usize,
    /// Added tokens of the tokenizer (see the module docs).
    guards: &'a [String],
    /// `None` until the first read.
    file: Option<File>,
    eof: bool,
    done: bool,
    /// Bytes read but not yet yielded.
    buf: Vec<u8>,
    /// Offset in the file of `buf[0]`.
    offset: u64,
}

impl<'a> FileChunks<'a> {
    pub(crate) fn new(path: &Path, target: usize, guards: &'a [String]) -> FileChunks<'a> {
        FileChunks {
            path: path.to_path_buf(),
            target: target.max(1),
            guards,
            file: None,
            eof: false,
            done: false,
            buf: Vec::new(),
            offset: 0,
        }
    }

    fn next_chunk(&mut self) -> Result<Option<String>> {
        let mut want = self.target;
        let cut = loop {
            self.fill(want)?;
            if self.eof {
                break self.buf.len();
            }
            if let Some(p) = last_safe_cut(&self.buf, self.guards) {
                break p;
            }
            if self.buf.len() >= MAX_CHUNK_FACTOR * self.target {
                break last_char_boundary(&self.buf);
            }
            want = self.buf.len() + self.target;
        };
        if cut == 0 {
            return Ok(None);
        }
        let rest = self.buf.split_off(cut);
        let chunk = std::mem::replace(&mut self.buf, rest);
        let start = self.offset;
        self.offset += cut as u64;
        String::from_utf8(chunk).map(Some).map_err(|e| Error::NotUtf8 {
            path: self.path.clone(),
            offset: start + e.utf8_error().valid_up_to() as u64,
        })
    }

    /// Reads until `buf` holds at least `want` bytes or the file ends.
    fn fill(&mut self, want: usize) -> Result<()> {
        if self.file.is_none() {
            self.file = Some(File::open(&self.path).map_err(|e| Error::io(&self.path, e))?);
        }
        let file = self.file.as_mut().expect("opened above");
        while !self.eof && self.buf.len() < want {
            let missing = (want - self.buf.len()) as u64;
            let n = file
                .by_ref()
                .take(missing)
                .read_to_end(&mut self.buf)
                .map_err(|e| Error::io(&self.path, e))?;
            self.eof = n == 0;
        }
        Ok(())
    }
}

impl Iterator for FileChunks<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        if self.done {
            return None;
        }
        let next = self.next_chunk().transpose();
        self.done = !matches!(next, Some(Ok(_)));
        next
    }
}

/// Whether cutting `text` before byte `p` leaves the pre-tokenizer's pieces unchanged:
/// `text[p]` is whitespace (ASCII, so `p` is also a character boundary) and the character
/// after it is not, and no guard starts right after `p` or ends right before its whitespace
/// run. See the module docs.
pub(crate) fn is_safe_cut(text: &[u8], p: usize, guards: &[String]) -> bool {
    let is_ws = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0B | 0x0C);
    if !(p > 0
        && p + 1 < text.len()
        && is_ws(text[p])
        && char_at(text, p + 1).is_some_and(|c| !c.is_whitespace()))
    {
        return false;
    }
    if guards.is_empty() {
        return true;
    }
    let after = &text[p + 1..];
    let run_start = text[..p].iter().rposition(|&b| !is_ws(b)).map_or(0, |i| i + 1);
    let before = &text[..run_start];
    guards.iter().all(|g| {
        let g = g.as_bytes();
        // A guard cut off by the end of the buffer counts as present.
        let starts_after = after.starts_with(g) || g.starts_with(after);
        !starts_after && !before.ends_with(g)
    })
}

/// The last safe cut in `text`, if any.
fn last_safe_cut(text: &[u8], guards: &[String]) -> Option<usize> {
    (1..text.len()).rev().find(|&p| is_safe_cut(text, p, guards))
}

/// Where to end the training split inside a chunk: the first safe cut at or after byte `at`,
/// else the first character boundary at or after it.
pub(crate) fn split_point(text: &str, at: usize, guards: &[String]) -> usize {
    if at == 0 || at >= text.len() {
        return at.min(text.len());
    }
    let bytes = text.as_bytes();
    (at..bytes.len())
        .find(|&p| is_safe_cut(bytes, p, guards))
        .unwrap_or_else(|| (at..=text.len()).find(|&p| text.is_char_boundary(p)).unwrap())
}

/// The start of the last (possibly incomplete) character of `buf`, or `buf.len()` when that
/// would be 0, so a cut always makes progress.
fn last_char_boundary(buf: &[u8]) -> usize {
    let is_continuation = |b: u8| b & 0xC0 == 0x80;
    let start = (0..buf.len()).rev().find(|&i| !is_continuation(buf[i])).unwrap_or(0);
    if start == 0 {
        buf.len()
    } else {
        start
    }
}

/// The character starting at byte `i`, if a complete valid one does.
fn char_at(bytes: &[u8], i: usize) -> Option<char> {
    let len = match bytes[i] {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => return None,
    };
    let slice = bytes.get(i..i + len)?;
    std::str::from_utf8(slice).ok()?.chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{generated_corpus, varied_strings};
    use crate::tokenizer::Tokenizer;

    fn chunks_of(text: &[u8], target: usize) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.txt");
        std::fs::write(&path, text).unwrap();
        FileChunks::new(&path, target, &[]).collect::<Result<Vec<_>>>().unwrap()
    }

    #[test]
    fn chunks_concatenate_to_the_file() {
        let text = generated_corpus(300, 5);
        for target in [1, 7, 64, 1000, 1 << 20] {
            let chunks = chunks_of(text.as_bytes(), target);
            assert_eq!(chunks.concat(), text, "target {target}");
            if target >= 64 {
                let max = chunks.iter().map(String::len).max().unwrap();
                assert!(max <= MAX_CHUNK_FACTOR * target, "chunk of {max} for {target}");
            }
        }
    }

    /// Text with whitespace runs of every kind, CRLF and non-ASCII, to exercise every cut.
    fn mixed_text(seed: u64) -> String {
        let mut text = generated_corpus(100, seed);
        for s in varied_strings(100) {
            text.push_str(&s);
            text.push(' ');
        }
        text
    }

    /// Encodes `text` chunk by chunk, checking first that every chunk edge is a safe cut
    /// (no fallback cut, which is allowed to change the tokens).
    fn encode_in_chunks(tok: &Tokenizer, text: &str, target: usize) -> Vec<u32> {
        let guards = tok.added_tokens();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.txt");
        std::fs::write(&path, text).unwrap();
        let chunks: Vec<String> =
            FileChunks::new(&path, target, &guards).collect::<Result<_>>().unwrap();
        assert!(chunks.len() > 10, "target {target}: only {} chunks", chunks.len());
        let mut edge = 0;
        for c in &chunks[..chunks.len() - 1] {
            edge += c.len();
            let safe = is_safe_cut(text.as_bytes(), edge, &guards);
            assert!(safe, "target {target}: fallback at {edge}");
        }
        chunks.iter().flat_map(|c| tok.encode(c).unwrap()).collect()
    }

    #[test]
    fn chunked_gpt2_encoding_equals_whole_text_encoding() {
        let tok = Tokenizer::gpt2();
        let text = mixed_text(6);
        let whole = tok.encode(&text).unwrap();
        for target in [40, 100, 333] {
            assert!(encode_in_chunks(&tok, &text, target) == whole, "target {target}");
        }
    }

    #[test]
    fn chunked_bpe_encoding_equals_whole_text_encoding() {
        let text = mixed_text(8);
        let tok = Tokenizer::by_name("bpe:300", [text.as_str()]).unwrap();
        let whole = tok.encode(&text).unwrap();
        for target in [40, 100, 333] {
            assert!(encode_in_chunks(&tok, &text, target) == whole, "target {target}");
        }
    }

    #[test]
    fn text_without_whitespace_is_cut_at_character_boundaries() {
        let text = "日本語".repeat(100);
        let chunks = chunks_of(text.as_bytes(), 10);
        assert!(chunks.len() > 1);
        assert_eq!(chunks.concat(), text);
    }

    #[test]
    fn invalid_utf8_names_the_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.txt");
        std::fs::write(&path, b"hello world\ncaf\xe9 au lait\n").unwrap();
        let results: Vec<_> = FileChunks::new(&path, 4, &[]).collect();
        let err = results.last().unwrap().as_ref().unwrap_err();
        assert!(matches!(err, Error::NotUtf8 { offset: 15, .. }), "{err}");
        assert!(err.to_string().contains("latin1.txt"), "{err}");
        assert!(results[..results.len() - 1].iter().all(Result::is_ok));
    }

    #[test]
    fn missing_file_is_one_error_naming_it() {
        let results: Vec<_> = FileChunks::new(Path::new("/nonexistent/x.txt"), 4, &[]).collect();
        assert_eq!(results.len(), 1);
        assert!(results[0].as_ref().unwrap_err().to_string().contains("/nonexistent/x.txt"));
    }

    #[test]
    fn split_point_prefers_a_safe_cut_at_or_after_the_target() {
        let text = "abc def\nghi";
        assert_eq!(split_point(text, 0, &[]), 0);
        assert_eq!(split_point(text, 2, &[]), 3);
        assert_eq!(split_point(text, 4, &[]), 7);
        assert_eq!(split_point(text, 11, &[]), 11);
        // No safe cut after byte 4: fall back to the next character boundary.
        assert_eq!(split_point("ab ééé", 4, &[]), 5);
    }

    #[test]
    fn safe_cuts_are_before_the_last_whitespace_of_a_run() {
        let text = b"ab  \n cd";
        let cuts: Vec<usize> = (0..text.len()).filter(|&p| is_safe_cut(text, p, &[])).collect();
        assert_eq!(cuts, vec![5]);
    }

    #[test]
    fn no_cut_touches_a_whitespace_run_beside_an_added_token() {
        let guards = ["<|endoftext|>".to_string()];
        let safe = |text: &str| {
            let b = text.as_bytes();
            (0..b.len()).filter(|&p| is_safe_cut(b, p, &guards)).collect::<Vec<_>>()
        };
        assert_eq!(safe("a  <|endoftext|>"), Vec::<usize>::new());
        assert_eq!(safe("a  <|endof"), Vec::<usize>::new());
        assert_eq!(safe("<|endoftext|> \n b"), Vec::<usize>::new());
        assert_eq!(safe("<|endoftext|>x b"), vec![14]);
    }
}
