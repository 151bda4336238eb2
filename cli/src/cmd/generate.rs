//! `ferrite generate`: sample text from a checkpoint in this process, or from a
//! `ferrite serve` (`--server URL`) with the same flags, streaming to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferrite_data::Tokenizer;
use ferrite_inference::text::TextStream;
use ferrite_model::checkpoint::TOKENIZER_FILE;
use ferrite_model::generate::{Generator, WeightDtype};
use ferrite_model::sample::SamplingParams;
use ferrite_proto::v1 as pb;
use ferrite_security::connect;
use pb::inference_service_client::InferenceServiceClient;

use super::security::ClientSecurityArgs;

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint folder (ours, or a Hugging Face GPT-2 saved with safetensors).
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    pub checkpoint: Option<PathBuf>,
    /// Generate on a `ferrite serve` at this gRPC URL (https://HOST:PORT, or http:// for an
    /// --insecure one) instead.
    #[arg(long)]
    pub server: Option<String>,
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
    /// Number format of the weight matrices in memory: f32 (the checkpoint's values), f16
    /// (rounded once; half the memory, and decoding, which reads every weight per token, up
    /// to twice as fast; arithmetic in f32), or bf16 (f16's bytes, with the linear layers'
    /// inputs rounded to bf16 too, on AMX tiles: needs AMX-BF16).
    #[arg(long, default_value = "f32", conflicts_with = "server")]
    pub dtype: WeightDtype,
    /// With --server: `--tls-ca` for https:// and a token with role read.
    #[command(flatten)]
    pub client: ClientSecurityArgs,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let params =
        SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    params.validate()?;
    let checkpoint = match (&a.checkpoint, &a.server) {
        (_, Some(url)) => return remote(&a, url),
        (Some(dir), None) => dir.clone(),
        (None, None) => anyhow::bail!("give --checkpoint DIR or --server URL"),
    };
    let tok_path = a.tokenizer.clone().unwrap_or_else(|| checkpoint.join(TOKENIZER_FILE));
    let tok =
        Tokenizer::load(&tok_path).with_context(|| format!("loading {}", tok_path.display()))?;
    let mut gen = Generator::from_checkpoint(&checkpoint, a.threads, a.dtype)?;
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
                let piece = stream.advance(&bytes);
                if !a.json {
                    print_flush(piece);
                }
                !stream.stopped() && Some(s.token) != tok.eot()
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
        print_flush(stream.finish());
        println!();
    }
    Ok(())
}

fn print_flush(text: &str) {
    if !text.is_empty() {
        print!("{text}");
        let _ = std::io::stdout().flush();
    }
}

/// The same generation on a server: `GenerateStream`, printed as it comes.
fn remote(a: &GenerateArgs, url: &str) -> anyhow::Result<()> {
    if a.tokenizer.is_some() {
        anyhow::bail!("--tokenizer: the server tokenizes with its checkpoint's tokenizer");
    }
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(a.prompt.clone())),
        max_tokens: u32::try_from(a.max_tokens).context("--max-tokens is too large")?,
        temperature: Some(a.temperature),
        top_k: u32::try_from(a.top_k).context("--top-k is too large")?,
        top_p: Some(a.top_p),
        seed: a.seed,
        stop: a.stop.clone(),
        logprobs: a.json,
        // As the local command does: keep the newest tokens of a too-long prompt.
        truncate_prompt: true,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let creds = a.client.credentials()?;
        let url = connect::parse_urls(url, &creds).map_err(|e| anyhow::anyhow!("--server: {e}"))?;
        let channel = connect::open(&url[0], &creds)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the server {}: {e}", url[0]))?;
        let mut client = InferenceServiceClient::new(creds.authed(channel));
        let mut stream = match client.generate_stream(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => anyhow::bail!("{}: {}", code_name(s.code()), s.message()),
        };
        if !a.json {
            print_flush(&a.prompt);
        }
        let (mut text, mut tokens, mut logprobs, mut prompt_tokens) =
            (String::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut model, mut kept) = (None, None);
        loop {
            let chunk = match stream.message().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(s) => anyhow::bail!("{}: {}", code_name(s.code()), s.message()),
            };
            if !a.json {
                print_flush(&chunk.text);
            }
            text.push_str(&chunk.text);
            tokens.extend(chunk.tokens);
            logprobs.extend(chunk.logprobs);
            prompt_tokens.extend(chunk.prompt_tokens);
            model = chunk.model.or(model);
            if chunk.finish_reason != pb::FinishReason::Unspecified as i32 {
                kept = Some(chunk.kept_tokens as usize);
            }
        }
        if a.json {
            // A stop sequence cut the text: keep the tokens it spans, as locally.
            let n = kept.unwrap_or(tokens.len()).min(tokens.len());
            let (job, step) = model.map(|m| (m.job_id, m.step)).unwrap_or_default();
            println!(
                "{}",
                serde_json::json!({"prompt_tokens": prompt_tokens, "tokens": &tokens[..n],
                    "logprobs": &logprobs[..n.min(logprobs.len())], "text": text,
                    "checkpoint": {"job_id": job, "step": step}})
            );
        } else {
            println!();
        }
        Ok(())
    })
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}
