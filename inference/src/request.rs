//! A generation request and what comes back, in domain terms (no generated gRPC types).

use std::time::Instant;

use ferrite_model::generate::LongPrompt;
use ferrite_model::sample::SamplingParams;

use crate::error::{InferenceError, Result};

/// Most tokens one request may ask for.
pub const MAX_TOKENS_LIMIT: usize = 65_536;
/// Most stop sequences one request may give.
pub const MAX_STOPS: usize = 16;

#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Tokenized with the served checkpoint's tokenizer; empty starts from end-of-text.
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub logprobs: bool,
    pub long_prompt: LongPrompt,
    /// When the client stops waiting (a gRPC deadline).
    pub deadline: Option<Instant>,
}

impl GenerateRequest {
    /// Checks what can be checked without the model; errors name the parameter.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 || self.max_tokens > MAX_TOKENS_LIMIT {
            return Err(InferenceError::invalid(
                "max_tokens",
                format!("{} is outside 1..={MAX_TOKENS_LIMIT}", self.max_tokens),
            ));
        }
        let s = &self.sampling;
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return Err(InferenceError::invalid(
                "temperature",
                format!("{} must be a finite number ≥ 0 (0 is greedy)", s.temperature),
            ));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(InferenceError::invalid("top_p", format!("{} is outside (0, 1]", s.top_p)));
        }
        if self.stop.len() > MAX_STOPS {
            return Err(InferenceError::invalid(
                "stop",
                format!("{} stop sequences, at most {MAX_STOPS}", self.stop.len()),
            ));
        }
        if let Prompt::Tokens(t) = &self.prompt {
            if t.is_empty() {
                return Err(InferenceError::invalid("prompt", "token list is empty"));
            }
        }
        Ok(())
    }
}

/// The checkpoint a reply came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelVersion {
    /// Empty when serving a folder rather than a job's published checkpoints.
    pub job_id: String,
    pub step: u64,
    pub path: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` were generated.
    Length,
    /// A stop sequence or the end-of-text token.
    Stop,
}

/// What a running request sends its client, in order: `Started`, any number of `Piece`s,
/// then `Done` or `Failed`.
#[derive(Clone, Debug)]
pub enum Event {
    Started {
        model: ModelVersion,
        prompt_tokens: Vec<u32>,
    },
    /// Tokens sampled in one step and the text that became safe to show.
    Piece {
        text: String,
        tokens: Vec<u32>,
        logprobs: Vec<f32>,
    },
    /// `kept_tokens`: how many generated tokens the final text spans (fewer than sampled
    /// when a stop sequence cut it).
    Done {
        finish: FinishReason,
        kept_tokens: usize,
    },
    Failed(FailReason),
}

/// Why a request ended without finishing (the engine's errors are not `Clone`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailReason {
    DeadlineExceeded(usize),
    Invalid { field: &'static str, why: String },
    Internal(String),
    ShuttingDown,
}

impl From<FailReason> for InferenceError {
    fn from(f: FailReason) -> Self {
        match f {
            FailReason::DeadlineExceeded(n) => InferenceError::DeadlineExceeded(n),
            FailReason::Invalid { field, why } => InferenceError::InvalidArgument { field, why },
            FailReason::Internal(m) => InferenceError::Model(ferrite_model::ModelError::Shape(m)),
            FailReason::ShuttingDown => InferenceError::ShuttingDown,
        }
    }
}

/// A whole generation, gathered from the events (the unary reply).
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub model: ModelVersion,
    pub prompt_tokens: Vec<u32>,
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}
