//! `ferrite generate`: sample text from a checkpoint in this process, streaming to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferrite_data::Tokenizer;
use ferrite_model::checkpoint::TOKENIZER_FILE;
use ferrite_model::generate::Generator;
use ferrite_model::sample::SamplingParams;

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint folder (ours, or a Hugging Face GPT-2 saved with safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object with the text, token ids and per-token log-probabilities.
    #[arg(long)]
    pub json: bool,
    /// Tokenizer (default: the checkpoint's tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let params =
        SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    params.validate()?;
    let tok_path = a.tokenizer.clone().unwrap_or_else(|| a.checkpoint.join(TOKENIZER_FILE));
    let tok =
        Tokenizer::load(&tok_path).with_context(|| format!("loading {}", tok_path.display()))?;
    let mut gen = Generator::from_checkpoint(&a.checkpoint, a.threads)?;
    let mut prompt = tok.encode(&a.prompt)?;
    if prompt.is_empty() {
        // An empty prompt starts from the end-of-text token, or token 0 without one.
        prompt.push(tok.eot().unwrap_or(0));
    }
    if !a.json {
        print!("{}", a.prompt);
    }
    let mut stream = TextStream::new(&a.stop);
    let mut ids = Vec::new();
    let mut err = None;
    let out = gen.generate(&prompt, a.max_tokens, &params, |s| {
        ids.push(s.token);
        match tok.decode_bytes(&ids) {
            Ok(bytes) => {
                let go_on = stream.advance(&bytes, !a.json);
                go_on && Some(s.token) != tok.eot()
            }
            Err(e) => {
                err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    if a.json {
        let n = stream.kept_tokens(&tok, &ids)?;
        let text = stream.text();
        let logprobs: Vec<f32> = out.iter().take(n).map(|s| s.logprob).collect();
        println!(
            "{}",
            serde_json::json!({"prompt_tokens": prompt, "tokens": &ids[..n], "logprobs": logprobs,
                "text": text})
        );
    } else {
        println!();
    }
    Ok(())
}

/// Decoded output so far, printed as whole UTF-8 characters and cut at a stop sequence.
struct TextStream<'a> {
    stops: &'a [String],
    text: String,
    printed: usize,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    fn new(stops: &'a [String]) -> Self {
        TextStream { stops, text: String::new(), printed: 0, stopped: false }
    }

    /// Takes all bytes decoded so far; prints what is safe; false once a stop appears.
    fn advance(&mut self, bytes: &[u8], print: bool) -> bool {
        // Hold back an incomplete UTF-8 sequence at the end.
        let valid = match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).expect("valid prefix"),
        };
        self.text = valid.to_string();
        let cut = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(at) = cut {
            self.text.truncate(at);
            self.stopped = true;
        }
        // Hold back a tail that could still grow into a stop sequence.
        let hold = if self.stopped {
            0
        } else {
            self.stops.iter().map(|s| partial_suffix(&self.text, s)).max().unwrap_or(0)
        };
        let safe = self.text.len() - hold;
        if print && safe > self.printed {
            print!("{}", &self.text[self.printed..safe]);
            let _ = std::io::stdout().flush();
            self.printed = safe;
        }
        !self.stopped
    }

    fn text(&self) -> &str {
        &self.text
    }

    /// How many generated tokens the kept text spans.
    fn kept_tokens(&self, tok: &Tokenizer, ids: &[u32]) -> anyhow::Result<usize> {
        if !self.stopped {
            return Ok(ids.len());
        }
        for n in 0..=ids.len() {
            if tok.decode_bytes(&ids[..n])?.len() >= self.text.len() {
                return Ok(n);
            }
        }
        Ok(ids.len())
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&n| n <= text.len() && stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}
