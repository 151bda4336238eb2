//! `prepare`: text or JSONL files in, a dataset directory (see `dataset`) out.
//!
//! Everything streams: files are read in chunks of about `chunk_bytes` and tokens go
//! straight to [`ShardWriter`]s, so a corpus larger than memory works. It takes up to two
//! passes over the inputs:
//! 1. (`char`, `bpe:N` and every JSONL input) build the tokenizer from the corpus, and for
//!    JSONL count and check the examples before anything is written;
//! 2. tokenize and write the shards.
//!
//! Text: each file's tokens are followed by the end-of-text token where the tokenizer has
//! one. The validation split is the last `val_fraction` of the corpus bytes, cut at a place
//! that does not change the tokenization (see `chunks`), so train followed by val is exactly
//! the tokens of the whole corpus.
//!
//! JSONL: an example's tokens are `encode(prompt) ++ encode(completion) ++ [eot]` (no eot for
//! `char`), with mask 0 on the prompt tokens and 1 on the rest. The last `val_fraction` of the
//! examples (at least one, when there are two or more and the fraction is not 0) go to val.

mod chunks;
mod inputs;
mod jsonl;
mod progress;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use self::chunks::{split_point, FileChunks};
use self::inputs::InputFile;
use self::jsonl::Examples;
use self::progress::Progress;
use crate::dataset::{TOKENIZER_FILE, TRAIN_MASK, TRAIN_TOKENS, VAL_MASK, VAL_TOKENS};
use crate::error::{Error, Result};
use crate::shard::{MaskWriter, ShardWriter, TokenWidth};
use crate::tokenizer::{Tokenizer, TokenizerSpec};

/// What the input files contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// Plain UTF-8 text; each file is one document.
    Text,
    /// One `{"prompt": "...", "completion": "..."}` object per line.
    Jsonl,
}

/// What to prepare, from what, and where.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// `gpt2`, `char`, `bpe:<vocab_size>`, or the path of an existing `tokenizer.json`.
    pub tokenizer: String,
    /// Fraction of the data that goes to `val.bin`, in `[0, 1)`.
    pub val_fraction: f64,
    /// The dataset directory to write; created if missing.
    pub out: PathBuf,
    /// Files, or directories walked recursively in sorted order (hidden entries skipped).
    pub inputs: Vec<PathBuf>,
    pub format: InputFormat,
    /// Target bytes per read of a text file.
    pub chunk_bytes: usize,
}

impl PrepareOptions {
    /// Options with the defaults: 10% validation, text format, 1 MiB chunks.
    pub fn new(tokenizer: &str, out: &Path, inputs: Vec<PathBuf>) -> PrepareOptions {
        PrepareOptions {
            tokenizer: tokenizer.to_string(),
            val_fraction: 0.1,
            out: out.to_path_buf(),
            inputs,
            format: InputFormat::Text,
            chunk_bytes: 1 << 20,
        }
    }
}

/// What `prepare` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareSummary {
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub vocab_size: usize,
    /// `gpt2`, `char` or `bpe`.
    pub tokenizer: &'static str,
    pub input_files: usize,
    pub input_bytes: u64,
    /// Examples in each split (JSONL only; 0 for text).
    pub train_examples: u64,
    pub val_examples: u64,
}

/// Tokenizes `opts.inputs` into the dataset directory `opts.out`, calling
/// `progress(bytes_done, bytes_total)` as it goes; the total counts the input bytes once per
/// pass. Non-UTF-8 input fails the whole run with an error naming the file and offset.
///
/// Existing shards in `opts.out` are replaced only when the new ones are complete.
pub fn prepare(
    opts: &PrepareOptions,
    progress: impl FnMut(u64, u64) + Send,
) -> Result<PrepareSummary> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::InvalidArgument(format!(
            "val_fraction {} is not in [0, 1)",
            opts.val_fraction
        )));
    }
    let files = inputs::collect(&opts.inputs, &opts.out)?;
    let input_bytes: u64 = files.iter().map(|f| f.len).sum();
    if input_bytes == 0 {
        return Err(Error::InvalidArgument(format!("the inputs {:?} are empty", opts.inputs)));
    }
    let source = TokenizerSource::parse(&opts.tokenizer)?;
    let passes = match opts.format {
        InputFormat::Jsonl => 2,
        InputFormat::Text if source.needs_corpus() => 2,
        InputFormat::Text => 1,
    };
    let mut progress = Progress::new(progress, input_bytes, passes);
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;

    let (tokenizer, counts) = match opts.format {
        InputFormat::Text => prepare_text(opts, &files, &source, &mut progress)?,
        InputFormat::Jsonl => prepare_jsonl(opts, &files, &source, &mut progress)?,
    };
    tokenizer.save(&opts.out.join(TOKENIZER_FILE))?;
    progress.finish();
    Ok(PrepareSummary {
        train_tokens: counts.train_tokens,
        val_tokens: counts.val_tokens,
        vocab_size: tokenizer.vocab_size(),
        tokenizer: tokenizer.kind(),
        input_files: files.len(),
        input_bytes,
        train_examples: counts.train_examples,
        val_examples: counts.val_examples,
    })
}

#[derive(Default)]
struct Counts {
    train_tokens: u64,
    val_tokens: u64,
    train_examples: u64,
    val_examples: u64,
}

fn prepare_text<F: FnMut(u64, u64) + Send>(
    opts: &PrepareOptions,
    files: &[InputFile],
    source: &TokenizerSource,
    progress: &mut Progress<F>,
) -> Result<(Tokenizer, Counts)> {
    let tokenizer = if source.needs_corpus() {
        // No guards yet: where the chunks end matters little for counting words.
        let chunks = files.iter().flat_map(|f| FileChunks::new(&f.path, opts.chunk_bytes, &[]));
        let chunks = chunks.inspect(|chunk| {
            if let Ok(text) = chunk {
                progress.advance(text.len() as u64);
            }
        });
        let tokenizer = first_pass(source, chunks)?;
        progress.end_pass();
        tokenizer
    } else {
        source.without_corpus()?
    };

    let guards = tokenizer.added_tokens();
    let width = TokenWidth::for_vocab(tokenizer.vocab_size());
    let mut train = Split::create(&opts.out, TRAIN_TOKENS, None, width)?;
    let mut val = Split::create(&opts.out, VAL_TOKENS, None, width)?;
    let total: u64 = files.iter().map(|f| f.len).sum();
    // Byte offset in the concatenated corpus where val begins (moved on to a safe cut).
    let val_start = ((1.0 - opts.val_fraction) * total as f64).floor() as u64;
    let mut offset = 0u64;
    let mut in_val = false;
    for file in files {
        let encode = |text: &str| {
            tokenizer
                .encode(text)
                .map_err(|e| Error::Encode { path: file.path.clone(), error: Box::new(e) })
        };
        for chunk in FileChunks::new(&file.path, opts.chunk_bytes, &guards) {
            let chunk = chunk?;
            let end = offset + chunk.len() as u64;
            if !in_val && end > val_start {
                let cut = split_point(&chunk, (val_start - offset) as usize, &guards);
                train.push(&encode(&chunk[..cut])?, None)?;
                val.push(&encode(&chunk[cut..])?, None)?;
                in_val = true;
            } else {
                let side = if in_val { &mut val } else { &mut train };
                side.push(&encode(&chunk)?, None)?;
            }
            offset = end;
            progress.advance(chunk.len() as u64);
        }
        if let Some(eot) = tokenizer.eot() {
            let side = if in_val { &mut val } else { &mut train };
            side.push(&[eot], None)?;
        }
    }
    let train_tokens = train.finish()?;
    let val_tokens = val.finish()?;
    // Masks left from an earlier JSONL run would not match the new shards.
    for stale in [TRAIN_MASK, VAL_MASK] {
        let path = opts.out.join(stale);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(path, e)),
            _ => {}
        }
    }
    Ok((tokenizer, Counts { train_tokens, val_tokens, ..Counts::default() }))
}

fn prepare_jsonl<F: FnMut(u64, u64) + Send>(
    opts: &PrepareOptions,
    files: &[InputFile],
    source: &TokenizerSource,
    progress: &mut Progress<F>,
) -> Result<(Tokenizer, Counts)> {
    // The first pass always runs: it counts the examples for the split and checks every
    // line before anything is written.
    let mut examples = 0u64;
    let texts = Examples::new(files).flat_map(|example| match example {
        Ok(ex) => {
            examples += 1;
            progress.advance(ex.bytes);
            vec![Ok(ex.prompt), Ok(ex.completion)]
        }
        Err(e) => vec![Err(e)],
    });
    let tokenizer = first_pass(source, texts)?;
    progress.end_pass();
    if examples == 0 {
        return Err(Error::InvalidArgument(format!("no examples in {:?}", opts.inputs)));
    }
    let val_examples = val_example_count(examples, opts.val_fraction);
    let train_examples = examples - val_examples;

    let width = TokenWidth::for_vocab(tokenizer.vocab_size());
    let mut train = Split::create(&opts.out, TRAIN_TOKENS, Some(TRAIN_MASK), width)?;
    let mut val = Split::create(&opts.out, VAL_TOKENS, Some(VAL_MASK), width)?;
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for (i, example) in Examples::new(files).enumerate() {
        let example = example?;
        let encode = |text: &str| {
            tokenizer.encode(text).map_err(|e| Error::BadJsonl {
                path: files[example.file].path.clone(),
                line: example.line,
                reason: e.to_string(),
            })
        };
        ids.clear();
        ids.extend(encode(&example.prompt)?);
        let prompt_len = ids.len();
        ids.extend(encode(&example.completion)?);
        ids.extend(tokenizer.eot());
        // The model predicts token i from tokens before it: only completion tokens (and the
        // end-of-text after them) are targets.
        mask.clear();
        mask.resize(prompt_len, 0);
        mask.resize(ids.len(), 1);
        let side = if (i as u64) < train_examples { &mut train } else { &mut val };
        side.push(&ids, Some(&mask))?;
        progress.advance(example.bytes);
    }
    let counts = Counts {
        train_tokens: train.finish()?,
        val_tokens: val.finish()?,
        train_examples,
        val_examples,
    };
    Ok((tokenizer, counts))
}

/// How many of `n` examples go to val: `val_fraction` of them, rounded, but at least one and
/// leaving at least one for train when `n >= 2` and the fraction is not 0.
fn val_example_count(n: u64, val_fraction: f64) -> u64 {
    if val_fraction <= 0.0 || n < 2 {
        return 0;
    }
    ((val_fraction * n as f64).round() as u64).clamp(1, n - 1)
}

/// Reads `texts` to the end (or its first error) and returns the tokenizer: learned from the
/// texts when it needs a corpus, else built or loaded as usual.
fn first_pass<I>(source: &TokenizerSource, texts: I) -> Result<Tokenizer>
where
    I: Iterator<Item = Result<String>> + Send,
{
    let mut error = None;
    let texts = texts.map_while(|text| text.map_err(|e| error = Some(e)).ok());
    let tokenizer = match source {
        TokenizerSource::Build(spec) if spec.needs_corpus() => Tokenizer::from_spec(*spec, texts),
        _ => {
            texts.for_each(drop);
            source.without_corpus()
        }
    };
    // An input error ends the corpus early; report it rather than what came of that.
    match error {
        Some(e) => Err(e),
        None => tokenizer,
    }
}

/// Where the tokenizer comes from: built by name, or loaded from a file.
enum TokenizerSource {
    Build(TokenizerSpec),
    Load(PathBuf),
}

impl TokenizerSource {
    fn parse(name: &str) -> Result<TokenizerSource> {
        match name.parse::<TokenizerSpec>() {
            Ok(spec) => Ok(TokenizerSource::Build(spec)),
            Err(_) if Path::new(name).is_file() => Ok(TokenizerSource::Load(name.into())),
            Err(e) => Err(e),
        }
    }

    fn needs_corpus(&self) -> bool {
        match self {
            TokenizerSource::Build(spec) => spec.needs_corpus(),
            TokenizerSource::Load(_) => false,
        }
    }

    /// The tokenizer, for a source that does not learn from the corpus.
    fn without_corpus(&self) -> Result<Tokenizer> {
        match self {
            TokenizerSource::Build(spec) => Tokenizer::from_spec(*spec, std::iter::empty::<&str>()),
            TokenizerSource::Load(path) => Tokenizer::load(path),
        }
    }
}

/// One side of the split: its token shard and, for JSONL, its mask shard.
struct Split {
    tokens: ShardWriter,
    mask: Option<MaskWriter>,
}

impl Split {
    fn create(dir: &Path, tokens: &str, mask: Option<&str>, width: TokenWidth) -> Result<Split> {
        Ok(Split {
            tokens: ShardWriter::create(&dir.join(tokens), width)?,
            mask: mask.map(|m| MaskWriter::create(&dir.join(m))).transpose()?,
        })
    }

    /// Appends tokens, and their mask entries when this split has a mask.
    fn push(&mut self, ids: &[u32], mask: Option<&[u8]>) -> Result<()> {
        self.tokens.push(ids)?;
        if let (Some(writer), Some(mask)) = (&mut self.mask, mask) {
            writer.push(mask)?;
        }
        Ok(())
    }

    /// Finishes both shards; returns the token count.
    fn finish(self) -> Result<u64> {
        let n = self.tokens.finish()?;
        if let Some(mask) = self.mask {
            mask.finish()?;
        }
        Ok(n)
    }
}
