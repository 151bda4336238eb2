//! The JSON API under `/api`: what the dashboard draws, for scripts too.
//!
//! - `/api/jobs`: every job, newest first, with its last step's numbers.
//! - `/api/jobs/{id}`: one job with its history.
//! - `/api/jobs/{id}/metrics?since=STEP`: the job's step metrics seen by this coordinator
//!   since it started (after `STEP` when given, so pollers fetch only what is new).
//! - `/api/workers`: live workers, whether attached, their heartbeat age and rank.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::control::StepReport;
use crate::error::Result;
use crate::job::{Job, JobId};

use super::App;

/// Every job, newest first.
pub(crate) async fn jobs(app: &App) -> Result<Value> {
    let mut jobs = app.deps.jobs.list().await?;
    jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
    let mut out = Vec::with_capacity(jobs.len());
    for j in &jobs {
        out.push(job_summary(app, j).await);
    }
    Ok(json!({ "jobs": out }))
}

/// One job, with its state history.
pub(crate) async fn job(app: &App, id: &str) -> Result<Value> {
    let job = app.deps.jobs.get(&JobId::parse(id)?).await?;
    let mut v = job_summary(app, &job).await;
    let history: Vec<Value> = job
        .history
        .iter()
        .map(|c| {
            json!({
                "from": c.from.map(|s| s.to_string()),
                "to": c.to.to_string(),
                "reason": c.reason,
                "at_unix_ms": c.at_unix_ms,
            })
        })
        .collect();
    v["history"] = Value::Array(history);
    Ok(v)
}

/// A job's step metrics after `since`.
pub(crate) async fn job_metrics(app: &App, id: &str, since: Option<u64>) -> Result<Value> {
    let id = JobId::parse(id)?;
    // A job that never existed is NotFound, not an empty list.
    let job = app.deps.jobs.get(&id).await?;
    let steps: Vec<Value> = app
        .deps
        .control
        .recent_steps(&id)
        .iter()
        .filter(|r| since.is_none_or(|s| r.step > s))
        .map(step_json)
        .collect();
    Ok(json!({ "job": id.as_str(), "state": job.state.to_string(), "steps": steps }))
}

/// Live workers (by their store lease), with what the control loop knows of each.
pub(crate) async fn workers(app: &App) -> Result<Value> {
    let alive = app.deps.control.workers().list().await?;
    let sessions: HashMap<_, _> =
        app.deps.control.sessions().into_iter().map(|s| (s.info.id.clone(), s)).collect();
    let out: Vec<Value> = alive
        .iter()
        .map(|w| {
            let s = sessions.get(&w.id);
            let task = s
                .and_then(|s| s.task.as_ref())
                .map(|t| json!({ "job": t.job.as_str(), "attempt": t.attempt, "rank": t.rank }));
            json!({
                "id": w.id.as_str(),
                "hostname": w.capabilities.hostname,
                "device": w.capabilities.device.to_string(),
                "threads": w.capabilities.threads,
                "collective_addr": w.capabilities.collective_addr,
                "registered_unix_ms": w.registered_unix_ms,
                "attached": s.is_some(),
                "heartbeat_age_s": s.map(|s| s.silent_for.as_secs_f64()),
                "task": task,
            })
        })
        .collect();
    Ok(json!({ "workers": out }))
}

async fn job_summary(app: &App, j: &Job) -> Value {
    let last = app.deps.control.last_step(&j.id);
    let max_steps = ferrite_model::JobSpec::parse(&j.spec.toml).map_or(0, |f| f.train.max_steps);
    let mfu = match &last {
        Some(r) if !j.workers.is_empty() => {
            super::metrics::flops_per_token(app, j).await.map(|f| {
                f * r.tokens_per_second / (app.cfg.peak_flops_per_worker * j.workers.len() as f64)
            })
        }
        _ => None,
    };
    json!({
        "id": j.id.as_str(),
        "name": j.spec.name,
        "state": j.state.to_string(),
        "reason": j.reason,
        "attempt": j.attempt,
        "workers": j.workers.iter().map(|w| w.as_str()).collect::<Vec<_>>(),
        "world_size": j.spec.workers,
        "max_steps": max_steps,
        "submitted_unix_ms": j.submitted_unix_ms,
        "updated_unix_ms": j.updated_unix_ms,
        "last": last.as_ref().map(step_json),
        "mfu": mfu,
    })
}

fn step_json(r: &StepReport) -> Value {
    json!({
        "step": r.step,
        "train_loss": r.train_loss,
        "val_loss": r.val_loss,
        "lr": r.learning_rate,
        "grad_norm": r.grad_norm,
        "step_ms": r.step_ms,
        "tokens_per_second": r.tokens_per_second,
    })
}
