//! `ferrite.v1` messages to domain types and back.

use std::time::{Duration, Instant};

use ferrite_model::generate::LongPrompt;
use ferrite_model::sample::SamplingParams;
use ferrite_proto::v1 as pb;

use crate::error::{InferenceError, Result};
use crate::request::{Completion, FinishReason, GenerateRequest, ModelVersion, Prompt};

fn required<T>(v: Option<T>, field: &'static str) -> Result<T> {
    v.ok_or_else(|| InferenceError::invalid(field, "is required"))
}

/// The request, with the deadline the client set (the `grpc-timeout` header), if any.
pub fn request(r: pb::GenerateRequest, timeout: Option<Duration>) -> Result<GenerateRequest> {
    let prompt = match required(r.prompt, "prompt")? {
        pb::generate_request::Prompt::Text(t) => Prompt::Text(t),
        pb::generate_request::Prompt::Tokens(t) => Prompt::Tokens(t.ids),
    };
    let sampling = SamplingParams {
        temperature: r.temperature.unwrap_or(1.0),
        top_k: r.top_k as usize,
        top_p: r.top_p.unwrap_or(1.0),
        seed: r.seed,
    };
    let long_prompt = if r.truncate_prompt { LongPrompt::Truncate } else { LongPrompt::Refuse };
    let req = GenerateRequest {
        prompt,
        max_tokens: r.max_tokens as usize,
        sampling,
        stop: r.stop,
        logprobs: r.logprobs,
        long_prompt,
        deadline: timeout.map(|t| Instant::now() + t),
    };
    req.validate()?;
    Ok(req)
}

/// Parses a `grpc-timeout` header value: digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub fn version(v: &ModelVersion) -> pb::ModelVersion {
    pb::ModelVersion { job_id: v.job_id.clone(), step: v.step, path: v.path.clone() }
}

pub fn finish(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
    }
}

pub fn completion(c: Completion) -> pb::GenerateResponse {
    pb::GenerateResponse {
        text: c.text,
        tokens: c.tokens,
        logprobs: c.logprobs,
        prompt_tokens: c.prompt_tokens,
        finish_reason: finish(c.finish) as i32,
        model: Some(version(&c.model)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_with_their_units() {
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout("x"), None);
        assert_eq!(grpc_timeout(""), None);
    }

    #[test]
    fn missing_prompt_is_named() {
        let e = request(pb::GenerateRequest { max_tokens: 3, ..Default::default() }, None);
        assert!(e.unwrap_err().to_string().starts_with("prompt"));
    }
}
