//! `ferrite tokenize`, `ferrite detokenize` and `ferrite data prepare`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ferrite_data::{InputFormat, PrepareOptions, Tokenizer, TokenizerSpec};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct TokenizeArgs {
    /// `gpt2`, or the path of a tokenizer.json (as `data prepare` writes).
    #[arg(long, default_value = "gpt2")]
    tokenizer: String,
    /// The text to tokenize; read from stdin when absent (a trailing newline is kept).
    text: Option<String>,
}

#[derive(Args)]
pub struct DetokenizeArgs {
    /// `gpt2`, or the path of a tokenizer.json (as `data prepare` writes).
    #[arg(long, default_value = "gpt2")]
    tokenizer: String,
    /// Token ids; read whitespace-separated from stdin when absent.
    ids: Vec<u32>,
}

#[derive(Args)]
pub struct PrepareArgs {
    /// `gpt2`, `char`, `bpe:<vocab_size>`, or the path of an existing tokenizer.json.
    #[arg(long)]
    tokenizer: String,
    /// Fraction of the data for val.bin: the end of the text, or the last examples of JSONL.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Dataset directory to write (train.bin, val.bin, tokenizer.json[, *.mask]).
    #[arg(long)]
    out: PathBuf,
    /// `text`: each file is a document. `jsonl`: one {"prompt", "completion"} per line.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Text files, or directories walked recursively in sorted order.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Jsonl,
}

pub fn tokenize(args: TokenizeArgs) -> anyhow::Result<()> {
    let tokenizer = open_tokenizer(&args.tokenizer)?;
    let text = match args.text {
        Some(text) => text,
        None => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading text from stdin")?;
            text
        }
    };
    let ids = tokenizer.encode(&text)?;
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!("{}", line.join(" "));
    Ok(())
}

pub fn detokenize(args: DetokenizeArgs) -> anyhow::Result<()> {
    let tokenizer = open_tokenizer(&args.tokenizer)?;
    let ids = if args.ids.is_empty() {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).context("reading ids from stdin")?;
        input
            .split_whitespace()
            .map(|word| word.parse().with_context(|| format!("{word:?} is not a token id")))
            .collect::<anyhow::Result<Vec<u32>>>()?
    } else {
        args.ids
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", tokenizer.decode(&ids)?)?;
    Ok(())
}

pub fn prepare(args: PrepareArgs) -> anyhow::Result<()> {
    let mut opts = PrepareOptions::new(&args.tokenizer, &args.out, args.inputs);
    opts.val_fraction = args.val_fraction;
    opts.format = match args.format {
        Format::Text => InputFormat::Text,
        Format::Jsonl => InputFormat::Jsonl,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, \
             eta {eta})",
        )
        .expect("valid progress template"),
    );
    let result = ferrite_data::prepare(&opts, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let summary = result.with_context(|| format!("preparing {}", args.out.display()))?;
    let examples = match opts.format {
        InputFormat::Jsonl => format!(
            " ({} train examples, {} val examples)",
            summary.train_examples, summary.val_examples
        ),
        InputFormat::Text => String::new(),
    };
    println!(
        "prepared {}: {} train tokens, {} val tokens{examples}, vocab size {} ({}), \
         from {} files ({} bytes)",
        args.out.display(),
        summary.train_tokens,
        summary.val_tokens,
        summary.vocab_size,
        summary.tokenizer,
        summary.input_files,
        summary.input_bytes,
    );
    Ok(())
}

/// `gpt2` by name, otherwise a tokenizer.json path; `char` and `bpe:N` are learned from a
/// corpus, so they only exist as the file `data prepare` wrote.
fn open_tokenizer(arg: &str) -> anyhow::Result<Tokenizer> {
    match arg.parse::<TokenizerSpec>() {
        Ok(TokenizerSpec::Gpt2) => Ok(Tokenizer::gpt2()),
        Ok(spec) => bail!(
            "the {spec} tokenizer is learned from a corpus: pass the tokenizer.json that \
             `ferrite data prepare` wrote instead"
        ),
        Err(_) if Path::new(arg).exists() => Ok(Tokenizer::load(Path::new(arg))?),
        Err(e) => Err(e.into()),
    }
}
