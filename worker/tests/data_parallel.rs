//! Data-parallel training over the TCP ring: two ranks of batch B follow one rank of batch
//! 2B, and the ranks' parameters stay bitwise equal.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

use ferrite_kernels::CpuBackend;
use ferrite_model::JobSpec;
use ferrite_worker::collective::{RingCollective, RingConfig};
use ferrite_worker::trainer::Event;
use ferrite_worker::{Collective, Single, Trainer};

fn prepare(dir: &Path) -> std::path::PathBuf {
    let text: String =
        (0..500).map(|i| format!("{} little pigs went to market.\n", i % 9)).collect();
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    let data = dir.join("data");
    let opts = ferrite_data::PrepareOptions::new("char", &data, vec![dir.join("corpus.txt")]);
    ferrite_data::prepare(&opts, |_, _| {}).unwrap();
    data
}

fn spec(data: &Path, out: &Path, batch: usize) -> JobSpec {
    JobSpec::parse(&format!(
        "[model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\n[data]\ndir = \"{}\"\n\
         [train]\nbatch_size = {batch}\nmax_steps = 12\nlearning_rate = 3e-3\nwarmup_steps = 2\n\
         lr_decay_steps = 12\neval_interval = 6\neval_steps = 2\nthreads = 1\n\
         [output]\ndir = \"{}\"\ncheckpoint_interval = 0\n",
        data.display(),
        out.display()
    ))
    .unwrap()
}

type Run = (Vec<(f32, Option<f32>)>, Vec<f32>);

fn train(
    spec: JobSpec,
    collective: Box<dyn Collective<CpuBackend>>,
    bucket_bytes: Option<usize>,
) -> Run {
    let be = Arc::new(CpuBackend::new(1).unwrap());
    let mut t = Trainer::new(be, spec, collective).unwrap();
    if let Some(bytes) = bucket_bytes {
        t.set_bucket_bytes(bytes);
    }
    let mut losses = Vec::new();
    t.run(|e| {
        if let Event::Step(m) = e {
            losses.push((m.loss, m.val_loss));
        }
    })
    .unwrap();
    (losses, t.gpt.params.clone())
}

/// Trains `world` ranks of batch `batch` over a loopback ring; returns every rank's run.
fn ranks(
    data: &Path,
    out: &Path,
    world: usize,
    batch: usize,
    bucket_bytes: Option<usize>,
) -> Vec<Run> {
    let listeners: Vec<TcpListener> =
        (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                let out = out.join(format!("rank{rank}"));
                s.spawn(move || {
                    let ring =
                        RingCollective::connect(listener, RingConfig::new(rank, peers, 7)).unwrap();
                    train(spec(data, &out, batch), Box::new(ring), bucket_bytes)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_ranks_bitwise_equal(runs: &[Run]) {
    for (r, run) in runs.iter().enumerate() {
        let same = run.1.iter().zip(&runs[0].1).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rank {r} diverged from rank 0");
        assert_eq!(run.0, runs[0].0, "ranks report the same (all-reduced) losses");
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn two_ranks_of_batch_b_match_one_rank_of_batch_2b() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (single, single_params) =
        train(spec(&data, &tmp.path().join("one"), 4), Box::new(Single), None);
    let runs = ranks(&data, tmp.path(), 2, 2, None);
    assert_ranks_bitwise_equal(&runs);
    for (step, ((dp, dv), (sp, sv))) in runs[0].0.iter().zip(&single).enumerate() {
        assert!((dp - sp).abs() < 1e-5, "step {}: loss {dp} vs {sp}", step + 1);
        if let (Some(a), Some(b)) = (dv, sv) {
            assert!((a - b).abs() < 1e-5, "step {}: val {a} vs {b}", step + 1);
        }
    }
    // Not bitwise: one rank sums 2B rows in each kernel where two ranks sum B rows each and
    // add the halves. That is a rounding (1 ulp of the LayerNorm weights near 1 is 1.2e-7);
    // the key bias, whose gradient is only rounding noise, is zeroed by backward.
    let max_diff = max_abs_diff(&runs[0].1, &single_params);
    assert!(max_diff < 1e-6, "weights differ by {max_diff}");
}

#[test]
fn small_buckets_that_split_layers_change_no_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let whole = ranks(&data, &tmp.path().join("whole"), 2, 2, None);
    // 4000 bytes: a thousand gradients per bucket, so buckets cut layers and tensors, and the
    // last one is a partial tail.
    let bucketed = ranks(&data, &tmp.path().join("buckets"), 2, 2, Some(4000));
    assert_ranks_bitwise_equal(&bucketed);
    assert_eq!(bucketed[0].0, whole[0].0);
    assert!(bucketed[0].1.iter().zip(&whole[0].1).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn three_ranks_stay_bitwise_equal_and_follow_one_rank_of_batch_3b() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (single, _) = train(spec(&data, &tmp.path().join("one"), 3), Box::new(Single), None);
    let runs = ranks(&data, tmp.path(), 3, 1, Some(4000));
    assert_ranks_bitwise_equal(&runs);
    for (step, ((dp, _), (sp, _))) in runs[0].0.iter().zip(&single).enumerate() {
        assert!((dp - sp).abs() < 1e-4, "step {}: loss {dp} vs {sp}", step + 1);
    }
}
