//! The job file as the coordinator checks it at submission: parsed and validated by
//! `ferrite-model`'s own rules (so `ferrite train` and the cluster agree on what can run),
//! plus what only the coordinator can check: that `[data] dir` exists on its file system.
//!
//! Errors name the file's field as a dotted TOML path (`model.n_embd`, `train.max_stepz`).

use std::fmt;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use ferrite_model::job::JobKind as FileKind;
use ferrite_model::JobSpec as JobFile;

use crate::job::{JobKind, MAX_WORKERS};

/// A job-file field that cannot run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted TOML path (`model.n_embd`), or `spec.toml` when no field can be named.
    pub field: String,
    /// One line.
    pub reason: String,
}

impl FieldError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError { field: field.into(), reason: one_line(&reason.into()) }
    }
}

// Same shape as `crate::Error::InvalidArgument`, so clients see one format.
impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid argument `{}`: {}", self.field, self.reason)
    }
}

/// What the control plane takes from a valid job file; the rest is the workers' business.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFileSummary {
    pub name: Option<String>,
    pub kind: JobKind,
    pub workers: u32,
    pub min_workers: u32,
    pub priority: i32,
    pub max_restarts: u32,
}

/// Where a job's files may be (`--data-root`, `--checkpoint-root`); no confinement when a
/// list is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathRoots {
    /// `[data] dir` must lie under one of these.
    pub data: Vec<PathBuf>,
    /// `[output] dir`, `train.init_from` and `train.resume` must lie under one of these.
    pub checkpoints: Vec<PathBuf>,
}

impl PathRoots {
    /// Each field's path must stay under its roots: no `..` component, and after symbolic
    /// links are resolved (as far as the path exists) it must start with a root.
    fn confine(&self, file: &JobFile) -> Result<(), FieldError> {
        let mut paths = vec![("data.dir", &file.data.dir, &self.data)];
        paths.push(("output.dir", &file.output.dir, &self.checkpoints));
        if let Some(p) = &file.train.init_from {
            paths.push(("train.init_from", p, &self.checkpoints));
        }
        if let Some(p) = &file.train.resume {
            paths.push(("train.resume", p, &self.checkpoints));
        }
        for (field, path, roots) in paths {
            if roots.is_empty() {
                continue;
            }
            let allowed = || roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>();
            if path.components().any(|c| c == Component::ParentDir) {
                let why = format!("`{}`: `..` is not allowed in job paths", path.display());
                return Err(FieldError::new(field, why));
            }
            let real = resolved(path);
            if !roots.iter().any(|root| real.starts_with(resolved(root))) {
                let why = format!(
                    "`{}` is outside the allowed roots ({})",
                    path.display(),
                    allowed().join(", ")
                );
                return Err(FieldError::new(field, why));
            }
        }
        Ok(())
    }
}

/// `path` made absolute with symbolic links resolved in its longest existing prefix (the
/// rest, not yet created, cannot be a link).
fn resolved(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return abs,
        }
    }
}

/// Parses and validates a job file. Relative paths resolve against the coordinator's
/// working directory, as they would for `ferrite train` started there; paths must stay
/// under `roots`.
pub fn check(text: &str, roots: &PathRoots) -> Result<JobFileSummary, FieldError> {
    let file = JobFile::parse(text).map_err(|e| parse_error(text, &e.to_string()))?;
    file.validate().map_err(|e| validate_error(&e))?;
    roots.confine(&file)?;
    let dir = &file.data.dir;
    if !dir.is_dir() {
        let why = format!("`{}` is not a directory on the coordinator", dir.display());
        return Err(FieldError::new("data.dir", why));
    }
    let count = |field: &str, n: usize| match u32::try_from(n) {
        Ok(n) if n <= MAX_WORKERS => Ok(n),
        _ => Err(FieldError::new(field, format!("{n}; at most {MAX_WORKERS}"))),
    };
    Ok(JobFileSummary {
        name: file.name.clone(),
        kind: match file.kind {
            FileKind::Pretrain => JobKind::Pretrain,
            FileKind::Finetune => JobKind::Finetune,
        },
        workers: count("cluster.workers", file.cluster.workers)?,
        min_workers: count("cluster.min_workers", file.cluster.min_workers)?,
        priority: file.cluster.priority,
        max_restarts: file.cluster.max_restarts,
    })
}

/// `ferrite-model` reports validation as `"<field>: <why>"`.
fn validate_error(e: &ferrite_model::ModelError) -> FieldError {
    match e {
        ferrite_model::ModelError::Job(msg) => match msg.split_once(": ") {
            Some((field, why)) if is_dotted_path(field) => FieldError::new(field, why),
            _ => FieldError::new("spec.toml", msg.as_str()),
        },
        other => FieldError::new("spec.toml", other.to_string()),
    }
}

/// Re-reads the file with `toml` itself to learn where the error is, since the model's
/// error carries only text; the location names the field.
fn parse_error(text: &str, fallback: &str) -> FieldError {
    let err = match toml::from_str::<JobFile>(text) {
        Err(err) => err,
        Ok(_) => return FieldError::new("spec.toml", fallback),
    };
    let msg = one_line(err.message());
    let Some(span) = err.span() else {
        return FieldError::new("spec.toml", msg);
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let field = field_at(text, span, &msg).unwrap_or_else(|| "spec.toml".to_owned());
    FieldError::new(field, format!("{msg} (line {line})"))
}

/// The dotted path of the key an error points at: the enclosing `[table]` plus the key under
/// the span, or the field a "missing field `x`" message names.
fn field_at(text: &str, span: Range<usize>, msg: &str) -> Option<String> {
    let start = span.start.min(text.len());
    let end = span.end.clamp(start, text.len());
    let at = text.get(start..end)?.trim();
    // An error on a `[table]` header (e.g. a missing field in it) is about that table.
    let header = at.strip_prefix('[').and_then(|h| h.split(']').next());
    let table = match header {
        Some(h) => Some(h.trim().to_owned()),
        None => enclosing_table(&text[..start]),
    };
    let key = if let Some(missing) = quoted_after(msg, "missing field `") {
        Some(missing)
    } else if header.is_none() && is_bare_key(at) {
        Some(at.to_owned())
    } else {
        // A bad value: the key is left of the `=` on the value's line.
        let line = &text[text[..start].rfind('\n').map_or(0, |i| i + 1)..start];
        let key = line.split_once('=').map(|(k, _)| k.trim());
        key.filter(|k| is_dotted_path(k)).map(str::to_owned)
    };
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (Some(t), None) => Some(t),
        (None, Some(k)) => Some(k),
        (None, None) => None,
    }
}

/// Name of the last `[table]` header in `before`.
fn enclosing_table(before: &str) -> Option<String> {
    before.lines().rev().find_map(|line| {
        let line = line.trim();
        let inner = line.strip_prefix('[')?.trim_start_matches('[');
        let name = inner.split(']').next()?.trim();
        is_dotted_path(name).then(|| name.to_owned())
    })
}

fn quoted_after(msg: &str, prefix: &str) -> Option<String> {
    let rest = &msg[msg.find(prefix)? + prefix.len()..];
    Some(rest[..rest.find('`')?].to_owned())
}

fn is_bare_key(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_dotted_path(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_bare_key)
}

/// Messages travel in a status line: no line breaks.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(data_dir: &str) -> String {
        format!(
            "[model]\nn_layer = 2\nn_head = 4\nn_embd = 128\nblock_size = 64\n\
             [data]\ndir = {data_dir:?}\n[train]\nmax_steps = 10\n\
             [output]\ndir = \"out/x\"\n[cluster]\nworkers = 2\npriority = 3\n"
        )
    }

    fn field(text: &str) -> String {
        check(text, &PathRoots::default()).expect_err("should be rejected").field
    }

    #[test]
    fn valid_file_gives_the_cluster_fields() {
        let dir = tempfile::tempdir().unwrap();
        let summary = check(&job(dir.path().to_str().unwrap()), &PathRoots::default()).unwrap();
        assert_eq!((summary.workers, summary.min_workers), (2, 1));
        assert_eq!((summary.kind, summary.priority), (JobKind::Pretrain, 3));
    }

    #[test]
    fn each_bad_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ok = job(dir.path().to_str().unwrap());
        assert_eq!(field(&ok.replace("max_steps", "max_stepz")), "train.max_stepz");
        assert_eq!(field(&ok.replace("n_embd = 128", "n_embd = 130")), "model.n_embd");
        assert_eq!(field(&ok.replace("workers = 2", "workers = 0")), "cluster.workers");
        assert_eq!(field(&job("/definitely/not/here")), "data.dir");
        assert_eq!(field(&ok.replace("n_layer = 2\n", "")), "model.n_layer");
        assert_eq!(field(&ok.replace("n_head = 4", "n_head = \"x\"")), "model.n_head");
        let err =
            check(&ok.replace("n_embd = 128", "n_embd = 130"), &PathRoots::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid argument `model.n_embd`: 130 is not a positive multiple of n_head = 4"
        );
    }

    #[test]
    fn syntax_errors_are_one_line() {
        let err = check("[model\nn_layer = 2\n", &PathRoots::default()).unwrap_err();
        assert!(!err.reason.contains('\n'), "{err}");
        assert!(err.reason.contains("line 1"), "{err}");
    }

    #[test]
    fn paths_must_stay_under_their_roots() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let out = root.path().join("runs");
        let roots = PathRoots { data: vec![data.clone()], checkpoints: vec![out.clone()] };
        let with = |data_dir: &Path, out_dir: &Path| {
            job(data_dir.to_str().unwrap()).replace("\"out/x\"", &format!("{out_dir:?}"))
        };
        assert!(check(&with(&data, &out.join("a")), &roots).is_ok());
        let err = check(&with(&data.join("../data"), &out.join("a")), &roots).unwrap_err();
        assert_eq!(err.field, "data.dir");
        assert!(err.reason.contains("`..`"), "{err}");
        let err = check(&with(&data, Path::new("/tmp/x")), &roots).unwrap_err();
        assert_eq!(err.field, "output.dir");
        assert!(err.reason.contains("outside the allowed roots"), "{err}");
        // A link inside the root that leads out of it is outside.
        std::os::unix::fs::symlink("/", data.join("up")).unwrap();
        let err = check(&with(&data.join("up/tmp"), &out.join("a")), &roots).unwrap_err();
        assert_eq!(err.field, "data.dir");
        // No roots: no confinement (the default of a coordinator without the flags).
        assert!(check(&with(&data, Path::new("/tmp/x")), &PathRoots::default()).is_ok());
    }
}
