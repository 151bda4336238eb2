//! `ferrite bench …`: Ferrite's side of the benchmarks in BENCHMARKS.md. Each prints one
//! JSON line on stdout so `bench/run.sh` can set it beside the PyTorch figure of the same run.

use std::time::Instant;

use clap::{Args, Subcommand};
use ferrite_kernels::{AdamW, Backend, CpuBackend, WeightLayout};
use ferrite_model::{Gpt, GptConfig};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// f32 matrix product out (m,n) = a (m,k) @ b (k,n), GFLOP/s.
    Matmul(MatmulArgs),
    /// One full training step (forward, backward, clip, AdamW) on random tokens.
    Step(StepArgs),
}

#[derive(Args)]
pub struct MatmulArgs {
    #[arg(long, default_value_t = 1024)]
    m: usize,
    #[arg(long, default_value_t = 3072)]
    k: usize,
    #[arg(long, default_value_t = 768)]
    n: usize,
    #[arg(long, default_value_t = 20)]
    reps: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Args)]
pub struct StepArgs {
    #[arg(long, default_value_t = 12)]
    layers: usize,
    #[arg(long, default_value_t = 12)]
    heads: usize,
    #[arg(long, default_value_t = 768)]
    embd: usize,
    #[arg(long, default_value_t = 50304)]
    vocab: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Position-embedding table size (GPT-2's 1024).
    #[arg(long, default_value_t = 1024)]
    block: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Timed steps after one warm-up step; the median is reported.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Matmul(a) => matmul(a),
        BenchCommand::Step(a) => step(a),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn matmul(a: MatmulArgs) -> anyhow::Result<()> {
    let be = CpuBackend::new(a.threads)?;
    let inp: Vec<f32> = (0..a.m * a.k).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    let w: Vec<f32> = (0..a.k * a.n).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let mut out = vec![0.0f32; a.m * a.n];
    let times = be.run(|| {
        let mut times = Vec::with_capacity(a.reps);
        for rep in 0..a.reps + 3 {
            let t0 = Instant::now();
            be.matmul_forward(&mut out, &inp, &w, None, WeightLayout::InOut, a.m, a.k, a.n);
            if rep >= 3 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times
    });
    let t = median(times);
    let gflops = 2.0 * (a.m * a.k * a.n) as f64 / t / 1e9;
    println!(
        "{}",
        serde_json::json!({"peer": "ferrite", "bench": "matmul", "gflops": gflops, "ms": t * 1e3,
            "m": a.m, "k": a.k, "n": a.n, "threads": a.threads})
    );
    Ok(())
}

fn step(a: StepArgs) -> anyhow::Result<()> {
    let be = CpuBackend::new(a.threads)?;
    let cfg = GptConfig {
        n_layer: a.layers,
        n_head: a.heads,
        n_embd: a.embd,
        block_size: a.block.max(a.seq),
        vocab_size: a.vocab,
    };
    let mut gpt = Gpt::new(&be, cfg.clone(), a.batch, a.seq)?;
    gpt.init_gpt2(&be, 1)?;
    let n = a.batch * a.seq;
    let tokens: Vec<i32> = (0..n).map(|i| ((i * 7919) % a.vocab) as i32).collect();
    let targets: Vec<i32> = (0..n).map(|i| ((i * 104_729 + 1) % a.vocab) as i32).collect();
    let times = be.run(|| -> anyhow::Result<Vec<f64>> {
        let mut times = Vec::new();
        for s in 0..a.steps + 1 {
            let t0 = Instant::now();
            gpt.zero_grad(&be);
            let loss = gpt.forward(&be, &tokens, Some(&targets), a.batch, a.seq)?.expect("loss");
            gpt.backward(&be, loss, 1.0)?;
            let opt = AdamW {
                lr: 6e-4,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_scale: 1.0,
                step: s as u64 + 1,
            };
            gpt.step(&be, &opt, 1.0);
            if s > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        Ok(times)
    })?;
    let t = median(times);
    let flops = cfg.train_flops_per_token(a.seq) * n as f64;
    println!(
        "{}",
        serde_json::json!({"peer": "ferrite", "bench": "gpt2_step", "ms_per_step": t * 1e3,
            "gflops": flops / t / 1e9, "flops_per_step": flops, "n_params": cfg.num_params(),
            "batch": a.batch, "seq_len": a.seq, "threads": a.threads})
    );
    Ok(())
}
