//! Reading finetuning examples from JSONL files: one `{"prompt": ..., "completion": ...}`
//! object per line. Blank lines are skipped; other fields on an object are ignored.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use serde::Deserialize;

use super::inputs::InputFile;
use crate::error::{Error, Result};

/// One prompt/completion pair, and where it came from.
#[derive(Deserialize)]
pub(crate) struct Example {
    pub prompt: String,
    pub completion: String,
    /// Index of its file in the list given to [`Examples::new`].
    #[serde(skip)]
    pub file: usize,
    /// Line number in the file, from 1.
    #[serde(skip)]
    pub line: u64,
    /// Bytes of the file read for this example: its line and any blank lines before it.
    #[serde(skip)]
    pub bytes: u64,
}

/// The examples of several files in order. Yields `Err` once, for the first unreadable file
/// or malformed line, then ends.
pub(crate) struct Examples<'a> {
    files: &'a [InputFile],
    /// The file being read and its index.
    current: Option<(usize, FileExamples)>,
    next_file: usize,
    done: bool,
}

impl<'a> Examples<'a> {
    pub(crate) fn new(files: &'a [InputFile]) -> Examples<'a> {
        Examples { files, current: None, next_file: 0, done: false }
    }

    fn next_example(&mut self) -> Result<Option<Example>> {
        loop {
            let (index, file) = match &mut self.current {
                Some((index, file)) => (*index, file),
                None => {
                    let Some(input) = self.files.get(self.next_file) else {
                        return Ok(None);
                    };
                    let file = FileExamples::open(&input.path)?;
                    self.current = Some((self.next_file, file));
                    self.next_file += 1;
                    continue;
                }
            };
            match file.next_example()? {
                Some(example) => return Ok(Some(Example { file: index, ..example })),
                None => self.current = None,
            }
        }
    }
}

impl Iterator for Examples<'_> {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Result<Example>> {
        if self.done {
            return None;
        }
        let next = self.next_example().transpose();
        self.done = !matches!(next, Some(Ok(_)));
        next
    }
}

/// The examples of one file.
struct FileExamples {
    path: PathBuf,
    reader: BufReader<File>,
    line: u64,
    /// Bytes read since the last example returned.
    unreported: u64,
    buf: Vec<u8>,
}

impl FileExamples {
    fn open(path: &std::path::Path) -> Result<FileExamples> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(FileExamples {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            line: 0,
            unreported: 0,
            buf: Vec::new(),
        })
    }

    fn next_example(&mut self) -> Result<Option<Example>> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| Error::io(&self.path, e))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            self.unreported += n as u64;
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let mut example: Example = serde_json::from_slice(&self.buf).map_err(|e| {
                Error::BadJsonl { path: self.path.clone(), line: self.line, reason: reason(&e) }
            })?;
            example.line = self.line;
            example.bytes = std::mem::take(&mut self.unreported);
            return Ok(Some(example));
        }
    }
}

/// serde_json's message without its "at line 1 column N" suffix (the line is always 1 here,
/// and the caller reports the file's line), plus the column.
fn reason(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(m, _)| m);
    let what = match e.classify() {
        serde_json::error::Category::Data => {
            "not a {\"prompt\": string, \"completion\": string} \
                                              object"
        }
        _ => "not valid JSON",
    };
    format!("{what}: {msg} (column {})", e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples_of(text: &str) -> Vec<Result<Example>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ft.jsonl");
        std::fs::write(&path, text).unwrap();
        let files = [InputFile { path, len: text.len() as u64 }];
        Examples::new(&files).collect()
    }

    fn error_of(text: &str) -> String {
        let results = examples_of(text);
        match results.last() {
            Some(Err(e)) => {
                assert!(matches!(e, Error::BadJsonl { .. }), "{e}");
                e.to_string()
            }
            _ => panic!("expected an error for {text:?}"),
        }
    }

    #[test]
    fn reads_examples_skipping_blank_lines_and_extra_fields() {
        let text = "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n  \n\
                    {\"prompt\": \"c\", \"completion\": \"d\", \"id\": 7}";
        let examples: Vec<Example> = examples_of(text).into_iter().map(Result::unwrap).collect();
        assert_eq!(examples.len(), 2);
        assert_eq!((examples[0].prompt.as_str(), examples[0].completion.as_str()), ("a", "b"));
        let first_line = text.find('\n').unwrap() as u64 + 1;
        assert_eq!((examples[1].line, examples[1].bytes), (4, text.len() as u64 - first_line));
    }

    #[test]
    fn malformed_lines_name_file_and_line_number() {
        let good = "{\"prompt\": \"a\", \"completion\": \"b\"}\n";
        let bad_json = error_of(&format!("{good}{good}{{\"prompt\": \"a\"\n"));
        assert!(bad_json.contains("ft.jsonl:3:") && bad_json.contains("not valid JSON"));
        let missing = error_of(&format!("{good}{{\"prompt\": \"a\"}}\n"));
        assert!(missing.contains("ft.jsonl:2:") && missing.contains("missing field `completion`"));
        let wrong_type = error_of("{\"prompt\": 5, \"completion\": \"b\"}");
        assert!(wrong_type.contains("ft.jsonl:1:") && wrong_type.contains("invalid type"));
        let not_object = error_of(&format!("{good}[1, 2]\n"));
        assert!(not_object.contains("ft.jsonl:2:"), "{not_object}");
        let not_utf8 = examples_of("{\"prompt\": \"\u{e9}\", \"completion\": \"b\"}\n");
        assert!(not_utf8[0].is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.jsonl");
        std::fs::write(&path, b"{\"prompt\": \"caf\xe9\", \"completion\": \"b\"}\n").unwrap();
        let files = [InputFile { path, len: 0 }];
        let err = Examples::new(&files).next().unwrap().err().unwrap();
        assert!(err.to_string().contains("latin1.jsonl:1:"), "{err}");
    }
}
