//! The job file: what `ferrite train` runs and what operators submit to the coordinator.
//!
//! Unknown keys are errors (a typo must not silently fall back to a default), and
//! [`JobSpec::validate`] names the field that cannot run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use ferrite_kernels::MatmulPrecision;

use crate::{GptConfig, ModelError};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Pretrain,
    Finetune,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub kind: JobKind,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    pub output: OutputSection,
    #[serde(default)]
    pub cluster: ClusterSection,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    /// Taken from the dataset's tokenizer when absent.
    #[serde(default)]
    pub vocab_size: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Folder with train.bin, val.bin, tokenizer.json (and train.mask, val.mask).
    pub dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Sequences per micro-batch on each worker.
    pub batch_size: usize,
    pub max_steps: u64,
    pub learning_rate: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub lr_decay_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f32,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Evaluate val loss every this many steps (0: never, except at the end).
    pub eval_interval: u64,
    pub eval_steps: u64,
    pub seed: u64,
    /// CPU threads per worker (0: all cores).
    pub threads: usize,
    /// How the linear layers multiply on CPU workers: "f32", or "bf16" (operands rounded
    /// to bf16, sums in f32, on AMX; f32 where the CPU has no AMX-BF16).
    pub matmul_precision: MatmulPrecision,
    /// Continue exactly from this checkpoint folder.
    pub resume: Option<PathBuf>,
    /// Start from these weights (ours or a Hugging Face GPT-2 checkpoint).
    pub init_from: Option<PathBuf>,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            batch_size: 12,
            max_steps: 2000,
            learning_rate: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            lr_decay_steps: 2000,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            grad_accum: 1,
            eval_interval: 250,
            eval_steps: 20,
            seed: 1337,
            threads: 0,
            matmul_precision: MatmulPrecision::F32,
            resume: None,
            init_from: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    /// Save a checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_interval: u64,
    /// How many checkpoints to keep (the newest).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
}

fn default_keep() -> usize {
    3
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub workers: usize,
    pub min_workers: usize,
    pub max_restarts: u32,
    pub priority: i32,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection { workers: 1, min_workers: 1, max_restarts: 5, priority: 0 }
    }
}

impl JobSpec {
    /// Parses a job file's text; syntax errors and unknown keys name the place.
    pub fn parse(text: &str) -> Result<JobSpec, ModelError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| ModelError::Job(e.to_string()))?;
        Ok(spec)
    }

    pub fn load(path: &Path) -> Result<JobSpec, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
        // Relative paths stay relative to the working directory, as operators type them.
        Self::parse(&text).map_err(|e| ModelError::Job(format!("{}: {e}", path.display())))
    }

    /// The model shape, with the vocabulary from the data when the file leaves it out.
    pub fn gpt_config(&self, data_vocab: usize) -> GptConfig {
        GptConfig {
            n_layer: self.model.n_layer,
            n_head: self.model.n_head,
            n_embd: self.model.n_embd,
            block_size: self.model.block_size,
            vocab_size: self.model.vocab_size.unwrap_or(data_vocab),
        }
    }

    /// Checks everything that can be checked without the data; errors name the field.
    // `!(x > 0.0)` rather than `x <= 0.0`: NaN must fail too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<(), ModelError> {
        let cfg = self.gpt_config(self.model.vocab_size.unwrap_or(1));
        cfg.validate().map_err(|e| match e {
            ModelError::Config { field, why } => ModelError::Job(format!("model.{field}: {why}")),
            other => other,
        })?;
        let t = &self.train;
        let bad = |field: &str, why: &str| Err(ModelError::Job(format!("{field}: {why}")));
        if t.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1");
        }
        if t.grad_accum == 0 {
            return bad("train.grad_accum", "must be at least 1");
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return bad("train.learning_rate", "must be a positive number");
        }
        if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.learning_rate) {
            return bad("train.min_lr", "must be between 0 and learning_rate");
        }
        if !(0.0..1.0).contains(&t.beta1) {
            return bad("train.beta1", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&t.beta2) {
            return bad("train.beta2", "must be in [0, 1)");
        }
        if !(t.eps > 0.0) {
            return bad("train.eps", "must be positive");
        }
        if !(t.weight_decay >= 0.0) {
            return bad("train.weight_decay", "must be ≥ 0");
        }
        if !(t.grad_clip >= 0.0) {
            return bad("train.grad_clip", "must be ≥ 0 (0 disables clipping)");
        }
        if self.kind == JobKind::Finetune && t.init_from.is_none() && t.resume.is_none() {
            return bad("train.init_from", "a finetune job needs the checkpoint to start from");
        }
        let c = &self.cluster;
        if c.workers == 0 {
            return bad("cluster.workers", "must be at least 1");
        }
        if c.min_workers == 0 || c.min_workers > c.workers {
            return bad("cluster.min_workers", "must be between 1 and cluster.workers");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"
[model]
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
[data]
dir = "data/shakespeare_char"
[train]
batch_size = 12
max_steps = 2000
threads = 2
[output]
dir = "out/shakespeare_char"
checkpoint_interval = 500
"#;

    #[test]
    fn parses_the_documented_job_file() {
        let spec = JobSpec::parse(JOB).unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.model.n_embd, 128);
        assert_eq!(spec.train.batch_size, 12);
        assert_eq!(spec.train.beta2, 0.99);
        assert_eq!(spec.output.checkpoint_interval, 500);
        assert_eq!(spec.kind, JobKind::Pretrain);
        assert_eq!(spec.train.matmul_precision, MatmulPrecision::F32);
    }

    #[test]
    fn matmul_precision_is_read_and_a_bad_one_named() {
        let with =
            |p: &str| JOB.replace("threads = 2", &format!("threads = 2\nmatmul_precision = {p}"));
        let spec = JobSpec::parse(&with("\"bf16\"")).unwrap();
        assert_eq!(spec.train.matmul_precision, MatmulPrecision::Bf16);
        let err = JobSpec::parse(&with("\"fp8\"")).unwrap_err().to_string();
        assert!(err.contains("fp8") && err.contains("matmul_precision"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = JobSpec::parse(&JOB.replace("max_steps", "max_stepz")).unwrap_err();
        assert!(err.to_string().contains("max_stepz"), "{err}");
    }

    #[test]
    fn n_embd_not_divisible_by_n_head_is_named() {
        let spec = JobSpec::parse(&JOB.replace("n_embd = 128", "n_embd = 130")).unwrap();
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("model.n_embd"), "{err}");
    }

    #[test]
    fn zero_workers_is_named() {
        let spec = JobSpec::parse(&format!("{JOB}[cluster]\nworkers = 0\n")).unwrap();
        assert!(spec.validate().unwrap_err().to_string().contains("cluster.workers"));
    }
}
