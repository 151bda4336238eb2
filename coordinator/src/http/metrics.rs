//! The coordinator's Prometheus metrics, written in the text exposition format by hand (as
//! the serving role's are): every value is read from the registries and the control loop
//! at scrape time, so nothing here has to be kept in step with the cluster.
//!
//! MFU (model FLOPs utilisation) of a job:
//!
//! ```text
//! MFU = F · tokens/s ÷ (P · W)
//! F   = 6·N + 12·L·T·C   training FLOPs per token (forward + backward), as in PaLM's
//!                        appendix B and nanoGPT: N parameters (position embeddings
//!                        excluded), L layers, T = block_size, C = n_embd
//! P   = one worker's peak FLOP/s (`--peak-tflops`, default DEFAULT_PEAK_FLOPS)
//! W   = the workers of the job's current attempt
//! ```
//!
//! tokens/s is the whole job's, as rank 0 measures it over its last step.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

use crate::error::Result;
use crate::job::{Job, JobState};

use super::App;

const STATES: [JobState; 7] = [
    JobState::Queued,
    JobState::Starting,
    JobState::Running,
    JobState::Recovering,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

/// The text exposition format of everything the coordinator knows.
pub(crate) async fn render(app: &App) -> Result<String> {
    let control = &app.deps.control;
    let jobs = app.deps.jobs.list().await?;
    let alive = control.workers().list().await?;
    let sessions = control.sessions();
    let mut out = String::new();

    family(&mut out, "ferrite_jobs", "gauge", "Jobs by state.");
    let mut by_state: HashMap<JobState, usize> = HashMap::new();
    for j in &jobs {
        *by_state.entry(j.state).or_default() += 1;
    }
    for s in STATES {
        let n = by_state.get(&s).copied().unwrap_or(0);
        let _ = writeln!(out, "ferrite_jobs{{state=\"{s}\"}} {n}");
    }
    family(
        &mut out,
        "ferrite_coordinator_leader",
        "gauge",
        "1 while this coordinator leads (runs the control loop), 0 while it stands by.",
    );
    let leads = app.deps.role.borrow().is_leader();
    let _ = writeln!(out, "ferrite_coordinator_leader {}", leads as u8);
    family(&mut out, "ferrite_workers_alive", "gauge", "Workers holding a membership lease.");
    let _ = writeln!(out, "ferrite_workers_alive {}", alive.len());
    family(
        &mut out,
        "ferrite_worker_heartbeat_age_seconds",
        "gauge",
        "Since each attached worker's last message (heartbeat or report).",
    );
    for s in &sessions {
        let worker = escape(s.info.id.as_str());
        let age = s.silent_for.as_secs_f64();
        let _ = writeln!(out, "ferrite_worker_heartbeat_age_seconds{{worker=\"{worker}\"}} {age}");
    }
    family(&mut out, "ferrite_worker_busy", "gauge", "1 while the worker runs a rank.");
    for s in &sessions {
        let worker = escape(s.info.id.as_str());
        let _ =
            writeln!(out, "ferrite_worker_busy{{worker=\"{worker}\"}} {}", s.task.is_some() as u8);
    }
    family(
        &mut out,
        "ferrite_peak_flops_per_worker",
        "gauge",
        "The peak FLOP/s assumed per worker for MFU (--peak-tflops).",
    );
    let _ = writeln!(out, "ferrite_peak_flops_per_worker {}", app.cfg.peak_flops_per_worker);

    let mut rows = Vec::new();
    for job in jobs.iter().filter(|j| shown(app, j)) {
        rows.push(job_row(app, job).await?);
    }
    per_job(&mut out, &rows);
    Ok(out)
}

/// Jobs that are not finished, and finished ones whose steps this coordinator saw.
fn shown(app: &App, job: &Job) -> bool {
    !job.state.is_terminal() || app.deps.control.last_step(&job.id).is_some()
}

/// One job's series.
struct Row {
    job: String,
    attempt: u32,
    step: Option<(u64, f64, f64, f32, f32)>,
    flops_per_token: Option<f64>,
    mfu: Option<f64>,
    checkpoints: usize,
    last_checkpoint: Option<(u64, f64, Option<u64>)>,
}

async fn job_row(app: &App, job: &Job) -> Result<Row> {
    let last = app.deps.control.last_step(&job.id);
    let flops = flops_per_token(app, job).await;
    let mfu = match (&last, flops) {
        (Some(r), Some(f)) if !job.workers.is_empty() && app.cfg.peak_flops_per_worker > 0.0 => {
            let peak = app.cfg.peak_flops_per_worker * job.workers.len() as f64;
            Some(f * r.tokens_per_second / peak)
        }
        _ => None,
    };
    let checkpoints = app.deps.checkpoints.list(&job.id).await?;
    let last_checkpoint = match checkpoints.last() {
        Some(c) => {
            let path = std::path::PathBuf::from(&c.path);
            let bytes = tokio::task::spawn_blocking(move || dir_bytes(&path)).await.ok().flatten();
            Some((c.step, c.created_unix_ms as f64 / 1e3, bytes))
        }
        None => None,
    };
    Ok(Row {
        job: escape(job.id.as_str()),
        attempt: job.attempt,
        step: last
            .map(|r| (r.step, r.step_ms / 1e3, r.tokens_per_second, r.train_loss, r.learning_rate)),
        flops_per_token: flops,
        mfu,
        checkpoints: checkpoints.len(),
        last_checkpoint,
    })
}

fn per_job(out: &mut String, rows: &[Row]) {
    type Get = fn(&Row) -> Option<String>;
    let series: [(&str, &str, &str, Get); 12] = [
        ("ferrite_job_attempt", "gauge", "Starts so far (1 + recoveries).", |r| {
            Some(r.attempt.to_string())
        }),
        ("ferrite_job_step", "gauge", "Last optimizer step reported by rank 0.", |r| {
            r.step.map(|s| s.0.to_string())
        }),
        ("ferrite_job_step_seconds", "gauge", "Duration of the last step on rank 0.", |r| {
            r.step.map(|s| s.1.to_string())
        }),
        ("ferrite_job_tokens_per_second", "gauge", "Training tokens/s of the whole job.", |r| {
            r.step.map(|s| s.2.to_string())
        }),
        ("ferrite_job_train_loss", "gauge", "Training loss of the last step.", |r| {
            r.step.map(|s| s.3.to_string())
        }),
        ("ferrite_job_learning_rate", "gauge", "Learning rate of the last step.", |r| {
            r.step.map(|s| s.4.to_string())
        }),
        (
            "ferrite_job_flops_per_token",
            "gauge",
            "Training FLOPs per token, 6N + 12·L·T·C.",
            |r| r.flops_per_token.map(|f| f.to_string()),
        ),
        (
            "ferrite_job_mfu",
            "gauge",
            "Model FLOPs utilisation: FLOPs/token x tokens/s / (peak x workers).",
            |r| r.mfu.map(|m| m.to_string()),
        ),
        ("ferrite_job_checkpoints", "gauge", "Published checkpoints of the job.", |r| {
            Some(r.checkpoints.to_string())
        }),
        ("ferrite_job_last_checkpoint_step", "gauge", "Step of the newest checkpoint.", |r| {
            r.last_checkpoint.map(|c| c.0.to_string())
        }),
        (
            "ferrite_job_last_checkpoint_timestamp_seconds",
            "gauge",
            "When the newest checkpoint was written (Unix time).",
            |r| r.last_checkpoint.map(|c| c.1.to_string()),
        ),
        (
            "ferrite_job_last_checkpoint_bytes",
            "gauge",
            "Size of the newest checkpoint (when its folder is readable here).",
            |r| r.last_checkpoint.and_then(|c| c.2).map(|b| b.to_string()),
        ),
    ];
    for (name, kind, help, get) in series {
        family(out, name, kind, help);
        for r in rows {
            if let Some(v) = get(r) {
                let _ = writeln!(out, "{name}{{job=\"{}\"}} {v}", r.job);
            }
        }
    }
}

/// Training FLOPs per token of the job's model, worked out once per job.
pub(crate) async fn flops_per_token(app: &App, job: &Job) -> Option<f64> {
    let cached = app.flops.lock().unwrap_or_else(|e| e.into_inner()).get(&job.id).copied();
    if let Some(known) = cached {
        return known;
    }
    let toml = job.spec.toml.clone();
    // Reading the data's tokenizer (for the vocabulary size) touches the disk.
    let f = tokio::task::spawn_blocking(move || model_flops(&toml)).await.ok().flatten();
    if f.is_none() {
        tracing::debug!(job = %job.id, "no FLOPs estimate: the model's vocabulary is unknown here");
    }
    let mut known = app.flops.lock().unwrap_or_else(|e| e.into_inner());
    known.insert(job.id.clone(), f);
    f
}

/// `6·N + 12·L·T·C` of a job file's model; the vocabulary comes from `[model] vocab_size`
/// or the data's `tokenizer.json`, as the workers take it.
fn model_flops(toml: &str) -> Option<f64> {
    let spec = ferrite_model::JobSpec::parse(toml).ok()?;
    let vocab = match spec.model.vocab_size {
        Some(v) => v,
        None => {
            let path = spec.data.dir.join("tokenizer.json");
            ferrite_data::Tokenizer::load(&path).ok()?.vocab_size()
        }
    };
    let cfg = spec.gpt_config(vocab);
    Some(cfg.train_flops_per_token(cfg.block_size))
}

/// Bytes of the files under `dir`; `None` where it cannot be read from here.
fn dir_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).ok()? {
        let entry = entry.ok()?;
        let meta = entry.metadata().ok()?;
        total += if meta.is_dir() { dir_bytes(&entry.path())? } else { meta.len() };
    }
    Some(total)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_flops_follow_six_n_plus_attention() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\nvocab_size = 50\n\
             [data]\ndir = \"{}\"\n[train]\nbatch_size = 2\nmax_steps = 1\n[output]\ndir = \"o\"\n",
            dir.path().display()
        );
        let f = model_flops(&toml).expect("flops");
        // N without position embeddings: 50·32 + 2·(12·32² + 13·32) + 2·32 = 27_072.
        let n = 50.0 * 32.0 + 2.0 * (12.0 * 1024.0 + 13.0 * 32.0) + 64.0;
        assert_eq!(f, 6.0 * n + 12.0 * 2.0 * 16.0 * 32.0);
        assert_eq!(model_flops("not toml ["), None);
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
