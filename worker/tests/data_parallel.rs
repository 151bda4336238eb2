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

fn train(spec: JobSpec, collective: Box<dyn Collective<CpuBackend>>) -> Run {
    let be = Arc::new(CpuBackend::new(1).unwrap());
    let mut t = Trainer::new(be, spec, collective).unwrap();
    let mut losses = Vec::new();
    t.run(|e| {
        if let Event::Step(m) = e {
            losses.push((m.loss, m.val_loss));
        }
    })
    .unwrap();
    (losses, t.gpt.params.clone())
}

#[test]
fn two_ranks_of_batch_b_match_one_rank_of_batch_2b() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (single, single_params) = train(spec(&data, &tmp.path().join("one"), 4), Box::new(Single));

    let listeners: Vec<TcpListener> =
        (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, data) = (peers.clone(), data.clone());
                let out = tmp.path().join(format!("rank{rank}"));
                s.spawn(move || {
                    let ring =
                        RingCollective::connect(listener, RingConfig::new(rank, peers, 7)).unwrap();
                    train(spec(&data, &out, 2), Box::new(ring))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let (r0, r1) = (&runs[0], &runs[1]);
    assert!(r0.1.iter().zip(&r1.1).all(|(a, b)| a.to_bits() == b.to_bits()), "ranks diverged");
    assert_eq!(r0.0, r1.0, "ranks report the same (all-reduced) losses");
    for (step, ((dp, dv), (sp, sv))) in r0.0.iter().zip(&single).enumerate() {
        assert!((dp - sp).abs() < 1e-5, "step {}: loss {dp} vs {sp}", step + 1);
        if let (Some(a), Some(b)) = (dv, sv) {
            assert!((a - b).abs() < 1e-5, "step {}: val {a} vs {b}", step + 1);
        }
    }
    // Not bitwise: the two ranks sum half-batch gradients that one rank sums in one gemm, and
    // AdamW normalises gradients that are pure rounding noise (sums that cancel) into full
    // lr-sized steps; 1e-5 bounds that over 12 steps at lr 3e-3 (measured: 6.3e-6).
    let max_diff = r0.1.iter().zip(&single_params).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(max_diff < 1e-5, "weights differ by {max_diff}");
}
