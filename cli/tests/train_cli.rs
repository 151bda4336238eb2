//! `ferrite train` and `ferrite generate` as an operator runs them.

use std::path::Path;
use std::process::Command;

mod common;
use common::{ferrite, ok};

const JOB: &str = r#"
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
[data]
dir = "data"
[train]
batch_size = 4
max_steps = 30
learning_rate = 3e-3
warmup_steps = 5
lr_decay_steps = 30
eval_interval = 10
eval_steps = 2
threads = 2
[output]
dir = "out"
checkpoint_interval = 15
"#;

fn trained(dir: &Path) {
    let text: String = (0..300).map(|i| format!("line {} of a small corpus.\n", i % 7)).collect();
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    ok(&ferrite(&["data", "prepare", "--tokenizer", "char", "--out", "data", "corpus.txt"], dir));
    std::fs::write(dir.join("job.toml"), JOB).unwrap();
    let out = ferrite(&["train", "job.toml", "--plain"], dir);
    ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("step    30"), "{log}");
    assert!(log.contains("val loss"), "{log}");
}

#[test]
fn train_writes_metrics_and_checkpoints_then_generate_samples_from_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 30);
    let ck = dir.join("out/checkpoints/step-00000030");
    assert!(ck.join("model.safetensors").is_file());
    assert!(dir.join("out/checkpoints/step-00000015").is_dir());

    let ck = ck.to_str().unwrap();
    let greedy = [
        "generate",
        "--checkpoint",
        ck,
        "--prompt",
        "line",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ];
    let a = ok(&ferrite(&greedy, dir));
    assert_eq!(a, ok(&ferrite(&greedy, dir)), "greedy decoding is deterministic");
    assert!(a.trim_end().chars().count() >= 1);

    let seeded = [
        "generate",
        "--checkpoint",
        ck,
        "--prompt",
        "line",
        "--max-tokens",
        "20",
        "--seed",
        "5",
        "--json",
    ];
    let j: serde_json::Value = serde_json::from_str(&ok(&ferrite(&seeded, dir))).unwrap();
    assert_eq!(j["tokens"].as_array().unwrap().len(), 20);
    assert_eq!(j["logprobs"].as_array().unwrap().len(), 20);
    assert!(j["logprobs"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap() <= 0.0));
    let again: serde_json::Value = serde_json::from_str(&ok(&ferrite(&seeded, dir))).unwrap();
    assert_eq!(j, again, "same seed, same tokens");

    // A stop sequence cuts the text before it.
    let stop = [
        "generate",
        "--checkpoint",
        ck,
        "--prompt",
        "line",
        "--max-tokens",
        "60",
        "--temperature",
        "0",
        "--stop",
        "\n",
        "--json",
    ];
    let s: serde_json::Value = serde_json::from_str(&ok(&ferrite(&stop, dir))).unwrap();
    assert!(!s["text"].as_str().unwrap().contains('\n'));
}

#[test]
fn resume_flag_continues_from_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let out = ferrite(
        &[
            "train",
            "job.toml",
            "--plain",
            "--resume",
            "out/checkpoints/step-00000015",
            "--max-steps",
            "20",
        ],
        dir,
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resumed at step 15"), "{log}");
    assert!(log.contains("step    16") && !log.contains("step    15 |"), "{log}");
}

#[test]
fn bad_job_files_fail_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("typo.toml"), JOB.replace("max_steps", "max_stepz")).unwrap();
    let out = ferrite(&["train", "typo.toml"], dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_stepz"));

    std::fs::write(dir.join("nodata.toml"), JOB).unwrap();
    let out = ferrite(&["train", "nodata.toml"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // One line even when the operator asked for backtraces.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["train", "nodata.toml"])
        .current_dir(dir)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && !err.contains("Stack backtrace"), "{err}");
}

#[test]
fn cuda_device_without_a_gpu_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("job.toml"), JOB).unwrap();
    let out = ferrite(&["train", "job.toml", "--device", "cuda:0"], tmp.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuda:0") && !err.contains("panicked"), "{err}");
}
