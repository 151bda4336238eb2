//! Single-process training end to end on a tiny generated corpus: the loss falls, metrics are
//! written, and a resumed run continues bit for bit.

use std::path::Path;
use std::sync::Arc;

use ferrite_kernels::CpuBackend;
use ferrite_model::JobSpec;
use ferrite_worker::trainer::Event;
use ferrite_worker::{Single, StepMetrics, Trainer};

/// A corpus with structure a tiny model can learn quickly.
fn corpus() -> String {
    let words = ["the cat sat on the mat", "a dog ran in the fog", "we sing of the king"];
    (0..400).map(|i| format!("{}.\n", words[(i * 7 + i / 3) % 3])).collect()
}

fn prepare(dir: &Path) -> std::path::PathBuf {
    let text = dir.join("corpus.txt");
    std::fs::write(&text, corpus()).unwrap();
    let data = dir.join("data");
    let opts = ferrite_data::PrepareOptions::new("char", &data, vec![text]);
    ferrite_data::prepare(&opts, |_, _| {}).unwrap();
    data
}

fn job(data: &Path, out: &Path, steps: u64, extra: &str) -> JobSpec {
    JobSpec::parse(&format!(
        r#"
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 16
[data]
dir = "{}"
[train]
batch_size = 4
max_steps = {steps}
learning_rate = 3e-3
min_lr = 3e-4
warmup_steps = 5
lr_decay_steps = 60
eval_interval = 10
eval_steps = 4
threads = 2
{extra}
[output]
dir = "{}"
checkpoint_interval = 10
"#,
        data.display(),
        out.display()
    ))
    .unwrap()
}

fn train(spec: JobSpec) -> (Vec<StepMetrics>, Vec<f32>) {
    let be = Arc::new(CpuBackend::new(spec.train.threads).unwrap());
    let mut t = Trainer::new(be, spec, Box::new(Single)).unwrap();
    let mut steps = Vec::new();
    t.run(|e| {
        if let Event::Step(m) = e {
            steps.push(m.clone())
        }
    })
    .unwrap();
    (steps, t.gpt.params.clone())
}

#[test]
fn loss_falls_and_metrics_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let out = tmp.path().join("out");
    let (steps, _) = train(job(&data, &out, 60, ""));
    let first = steps[0].loss;
    let last = steps.last().unwrap();
    assert!(last.loss < first * 0.6, "loss {first} -> {}", last.loss);
    assert!(last.val_loss.unwrap() < first * 0.6);

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 60);
    for (i, l) in lines.iter().enumerate() {
        for field in ["step", "loss", "lr", "step_ms", "tokens_per_s"] {
            assert!(l.get(field).is_some(), "line {i} lacks {field}: {l}");
        }
        let step = l["step"].as_u64().unwrap();
        assert_eq!(step, i as u64 + 1);
        assert_eq!(l.get("val_loss").is_some(), step % 10 == 0, "line {i}: {l}");
    }
    // Checkpoints every 10 steps; the newest 3 kept.
    let kept = ferrite_model::checkpoint::list(&out.join("checkpoints")).unwrap();
    let steps_kept: Vec<u64> = kept.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps_kept, vec![40, 50, 60]);
}

#[test]
fn resumed_run_matches_uninterrupted_run_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (full, full_params) = train(job(&data, &tmp.path().join("a"), 30, ""));

    let out_b = tmp.path().join("b");
    let (first, _) = train(job(&data, &out_b, 20, ""));
    let ck = out_b.join("checkpoints").join("step-00000010");
    let resume = format!("resume = \"{}\"", ck.display());
    let (rest, rest_params) = train(job(&data, &tmp.path().join("c"), 30, &resume));

    assert_eq!(rest.first().unwrap().step, 11);
    for (a, b) in full[..20].iter().zip(&first) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}", a.step);
    }
    for (a, b) in full[10..].iter().zip(&rest) {
        assert_eq!(a.step, b.step);
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}: {} vs {}", a.step, a.loss, b.loss);
        assert_eq!(a.val_loss.map(f32::to_bits), b.val_loss.map(f32::to_bits));
    }
    assert!(full_params.iter().zip(&rest_params).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn finetune_from_checkpoint_lowers_completion_loss_and_ignores_prompt_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let pre_out = tmp.path().join("pre");
    train(job(&data, &pre_out, 20, ""));
    let ck = pre_out.join("checkpoints").join("step-00000020");

    // Prompt/completion pairs in the pretraining alphabet: the answer is the prompt reversed.
    let words = ["cat", "dog", "fog", "mat", "king", "sing", "ran", "sat"];
    let lines: String = (0..200)
        .map(|i| {
            let w = words[i % words.len()];
            let rev: String = w.chars().rev().collect();
            format!("{{\"prompt\": \"sing {w} then \", \"completion\": \"{rev}.\\n\"}}\n")
        })
        .collect();
    let jsonl = tmp.path().join("ft.jsonl");
    std::fs::write(&jsonl, lines).unwrap();
    let ft_data = tmp.path().join("ft");
    let mut opts = ferrite_data::PrepareOptions::new(
        data.join("tokenizer.json").to_str().unwrap(),
        &ft_data,
        vec![jsonl],
    );
    opts.format = ferrite_data::InputFormat::Jsonl;
    ferrite_data::prepare(&opts, |_, _| {}).unwrap();

    // Only completion targets count: the sampler marks prompt targets as ignored.
    let ds = ferrite_data::Dataset::open(&ft_data).unwrap();
    let mask = ds.train_mask.as_ref().expect("jsonl data has a mask");
    let mut sampler = ferrite_worker::batch::Sampler::new(
        &ds.train,
        Some(mask),
        1,
        ferrite_worker::batch::Split::Train,
        16,
    )
    .unwrap();
    let (mut tokens, mut targets) = (vec![0; 64], vec![0; 64]);
    sampler.fill(0, 0, 0, 1, 4, &mut tokens, &mut targets);
    let ignored = targets.iter().filter(|&&t| t == ferrite_kernels::IGNORE_INDEX).count();
    assert!(ignored > 0 && ignored < 64, "{ignored} of 64 targets ignored");

    let extra = format!("init_from = \"{}\"", ck.display());
    let spec = job(&ft_data, &tmp.path().join("ft-out"), 40, &extra);
    let spec = JobSpec { kind: ferrite_model::job::JobKind::Finetune, ..spec };
    let (steps, _) = train(spec);
    let (first, last) = (steps[0].loss, steps.last().unwrap().loss);
    assert!(last < first * 0.5, "completion loss {first} -> {last}");
}

#[test]
fn a_rank_stopped_mid_run_writes_nothing_more_even_while_its_lease_holds() {
    // The agent stops a fenced rank and registers again; the new registration confirms a
    // lease, so "the lease holds" alone must not let the old rank write.
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let out = tmp.path().join("out");
    let spec = job(&data, &out, 30, "");
    let be = Arc::new(CpuBackend::new(spec.train.threads).unwrap());
    let mut t = Trainer::new(be, spec, Box::new(Single)).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    t.stop_when_set(stop.clone());
    t.fence_writes(|| true);
    // Stopped after step 10's metrics line, before its checkpoint is written.
    let err = t
        .run(|e| {
            if let Event::Step(m) = e {
                if m.step == 10 {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .unwrap_err();
    assert!(matches!(err, ferrite_worker::WorkerError::Stopped { step: 10 }), "{err}");
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 10);
    let dir = out.join("checkpoints");
    let kept = if dir.exists() { ferrite_model::checkpoint::list(&dir).unwrap() } else { vec![] };
    assert!(kept.is_empty(), "a stopped rank wrote checkpoints {kept:?}");
}

#[test]
fn a_stale_writer_of_an_earlier_attempt_cannot_corrupt_the_resumed_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let out = tmp.path().join("out");
    train(job(&data, &out, 20, ""));
    // The first attempt's rank 0, stalled with its metrics file open, wakes up late.
    let mut stale =
        std::fs::OpenOptions::new().append(true).open(out.join("metrics.jsonl")).unwrap();
    let ck = out.join("checkpoints").join("step-00000010");
    train(job(&data, &out, 30, &format!("resume = \"{}\"", ck.display())));
    std::io::Write::write_all(&mut stale, b"{\"step\":21,\"loss\":9").unwrap();
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());
}
