//! `ferrite bench …`: Ferrite's side of the benchmarks in BENCHMARKS.md. Each prints one
//! JSON line on stdout so `bench/run.sh` can set it beside the PyTorch figure of the same run.

use std::time::Instant;

use clap::{Args, Subcommand};
use ferrite_kernels::{AdamW, Backend, CpuBackend, MatmulPrecision, WeightLayout};
use ferrite_model::{Gpt, GptConfig};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// f32 matrix product out (m,n) = a (m,k) @ b (k,n), GFLOP/s.
    Matmul(MatmulArgs),
    /// One full training step (forward, backward, clip, AdamW) on random tokens.
    Step(StepArgs),
    /// Ring all-reduce (mean) of an f32 buffer between `world` local processes over loopback.
    Allreduce(AllreduceArgs),
    /// Serving decode speed: batch 1, concurrent streams, time to first token (GPT-2-124M).
    Decode(DecodeArgs),
}

#[derive(Args)]
pub struct DecodeArgs {
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Concurrent requests of the aggregate measurement.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Prompt length of the batch-1 and concurrent requests.
    #[arg(long, default_value_t = 16)]
    prompt: usize,
    /// Prompt lengths of the time-to-first-token measurement.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,512,1024")]
    ttft_prompts: Vec<usize>,
    /// Runs of each measurement (the table shows the median).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Serve this checkpoint folder instead of random GPT-2-124M weights.
    #[arg(long)]
    checkpoint: Option<std::path::PathBuf>,
    /// Number format of the weight matrices in memory: f32 (the checkpoint's values), f16
    /// (rounded once; half the memory, and decoding, which reads every weight per token, up
    /// to twice as fast; arithmetic in f32), or bf16 (f16's bytes, with the linear layers'
    /// inputs rounded to bf16 too, on AMX tiles: needs AMX-BF16).
    #[arg(long, default_value = "f32")]
    dtype: ferrite_model::generate::WeightDtype,
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
    /// f32, or bf16 (operands rounded to bf16, f32 sums, on AMX).
    #[arg(long, default_value = "f32")]
    precision: MatmulPrecision,
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
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: ferrite_kernels::cuda::Device,
    /// The linear layers' precision on the CPU: f32, or bf16 (on AMX).
    #[arg(long, default_value = "f32")]
    precision: MatmulPrecision,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Matmul(a) => matmul(a),
        BenchCommand::Step(a) => step(a),
        BenchCommand::Allreduce(a) => allreduce(a),
        BenchCommand::Decode(a) => decode(a),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// A CPU backend whose linear layers run at `p`, or an error where the CPU lacks it.
fn cpu_at(threads: usize, p: MatmulPrecision) -> anyhow::Result<CpuBackend> {
    let mut be = CpuBackend::new(threads)?;
    let got = be.set_matmul_precision(p);
    anyhow::ensure!(got == p, "--precision {p}: this CPU has no AMX-BF16");
    Ok(be)
}

fn matmul(a: MatmulArgs) -> anyhow::Result<()> {
    let be = cpu_at(a.threads, a.precision)?;
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
            "m": a.m, "k": a.k, "n": a.n, "threads": a.threads, "precision": a.precision.to_string()})
    );
    Ok(())
}

fn step(a: StepArgs) -> anyhow::Result<()> {
    use ferrite_kernels::cuda::Device;
    match a.device {
        Device::Cpu => step_on(&cpu_at(a.threads, a.precision)?, a),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => step_on(&ferrite_kernels::cuda::CudaBackend::new(i)?, a),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(i) => {
            ferrite_kernels::cuda::probe(i)?;
            anyhow::bail!("cuda:{i}: this build has no CUDA backend")
        }
    }
}

fn step_on<B: Backend>(be: &B, a: StepArgs) -> anyhow::Result<()> {
    let cfg = GptConfig {
        n_layer: a.layers,
        n_head: a.heads,
        n_embd: a.embd,
        block_size: a.block.max(a.seq),
        vocab_size: a.vocab,
    };
    let mut gpt = Gpt::new(be, cfg.clone(), a.batch, a.seq)?;
    gpt.init_gpt2(be, 1)?;
    let n = a.batch * a.seq;
    let tokens: Vec<i32> = (0..n).map(|i| ((i * 7919) % a.vocab) as i32).collect();
    let targets: Vec<i32> = (0..n).map(|i| ((i * 104_729 + 1) % a.vocab) as i32).collect();
    let times = be.run(|| -> anyhow::Result<Vec<f64>> {
        let mut times = Vec::new();
        for s in 0..a.steps + 1 {
            let t0 = Instant::now();
            gpt.zero_grad(be);
            let loss = gpt.forward(be, &tokens, Some(&targets), a.batch, a.seq)?.expect("loss");
            gpt.backward(be, loss, 1.0)?;
            let opt = AdamW {
                lr: 6e-4,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_scale: 1.0,
                step: s as u64 + 1,
            };
            gpt.step(be, &opt, 1.0);
            // Wait for the device (a no-op copy on the CPU), so a step's time is all its own.
            be.download(be.view(&gpt.params, 0..1), &mut [0.0])?;
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
            "batch": a.batch, "seq_len": a.seq, "threads": a.threads,
            "device": be.name()})
    );
    Ok(())
}

#[derive(Args)]
pub struct AllreduceArgs {
    /// Size of the reduced f32 buffer in bytes.
    #[arg(long, default_value_t = 124_000_000)]
    bytes: usize,
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Timed all-reduces after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Size of the pieces each chunk is streamed in.
    #[arg(long, default_value_t = 1 << 20)]
    piece_bytes: usize,
    /// Socket read/write timeout in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// `auto`: the ranks (all on this host) exchange frames through shared memory, as
    /// workers on one machine do; `tcp`: through their loopback connections only.
    #[arg(long, default_value = "auto", value_parser = ["auto", "tcp"])]
    transport: String,
    /// Internal: run as this rank of a benchmark started by the parent process.
    #[arg(long, hide = true)]
    rank: Option<usize>,
}

/// Parent: starts `world` child processes of this binary (one per rank, so each has its own
/// address space and scheduler entity, as torch's spawned ranks do), hands them each other's
/// addresses, and reports the median over reps of the slowest rank's time.
fn allreduce(a: AllreduceArgs) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    if let Some(rank) = a.rank {
        return allreduce_rank(&a, rank);
    }
    anyhow::ensure!(a.world >= 1 && a.reps >= 1, "--world and --reps must be at least 1");
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for rank in 0..a.world {
        let child = Command::new(&exe)
            .args(["bench", "allreduce", "--bytes", &a.bytes.to_string()])
            .args(["--world", &a.world.to_string(), "--reps", &a.reps.to_string()])
            .args(["--piece-bytes", &a.piece_bytes.to_string(), "--transport", &a.transport])
            .args(["--timeout-s", &a.timeout_s.to_string(), "--rank", &rank.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        children.push(ChildGuard(child));
    }
    let mut outs = Vec::new();
    let mut addrs = Vec::new();
    for c in &mut children {
        let mut out = BufReader::new(c.0.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        let addr = line.trim().strip_prefix("READY ");
        addrs.push(
            addr.ok_or_else(|| anyhow::anyhow!("rank said {line:?}, not READY"))?.to_string(),
        );
        outs.push(out);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let token = (nanos as u64) ^ ((std::process::id() as u64) << 32);
    for c in &mut children {
        let mut stdin = c.0.stdin.take().expect("piped");
        writeln!(stdin, "{token} {}", addrs.join(","))?;
    }
    // times[rank][rep], seconds
    let mut times: Vec<Vec<f64>> = Vec::new();
    let mut transport = String::new();
    for (rank, out) in outs.iter_mut().enumerate() {
        let mut line = String::new();
        out.read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(|e| anyhow::anyhow!("rank {rank} failed (output {line:?}): {e}"))?;
        let t = v["times"].as_array().ok_or_else(|| anyhow::anyhow!("rank {rank}: {line}"))?;
        transport = v["transport"].as_str().unwrap_or_default().to_string();
        times.push(t.iter().filter_map(|x| x.as_f64()).collect());
    }
    for (rank, c) in children.iter_mut().enumerate() {
        let status = c.0.wait()?;
        anyhow::ensure!(status.success(), "rank {rank} exited with {status}");
    }
    let slowest: Vec<f64> =
        (0..a.reps).map(|i| times.iter().map(|t| t[i]).fold(0.0, f64::max)).collect();
    let t = median(slowest);
    let w = a.world as f64;
    let busbw = if a.world > 1 { 2.0 * (w - 1.0) / w * a.bytes as f64 / t / 1e9 } else { 0.0 };
    println!(
        "{}",
        serde_json::json!({"peer": "ferrite", "bench": "allreduce", "ms": t * 1e3,
            "busbw_gbps": busbw, "bytes": a.bytes, "world": a.world, "reps": a.reps,
            "mode": "processes", "transport": transport})
    );
    Ok(())
}

/// Kills a benchmark rank left running when the parent bails out early.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Child: binds a loopback port, prints `READY addr`, reads `token addr0,addr1,…` on stdin,
/// runs one warm-up and `reps` timed all-reduces and prints `{"times": […]}`.
fn allreduce_rank(a: &AllreduceArgs, rank: usize) -> anyhow::Result<()> {
    use ferrite_worker::collective::{RingCollective, RingConfig};
    use ferrite_worker::Collective;
    use std::io::{BufRead, Write};

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("READY {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let (token, peers) = line.trim().split_once(' ').ok_or_else(|| anyhow::anyhow!("bad line"))?;
    let peers = peers.split(',').map(|p| p.parse()).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(peers.len() == a.world, "got {} peers for world {}", peers.len(), a.world);
    let timeout = std::time::Duration::from_secs(a.timeout_s);
    let cfg = RingConfig {
        io_timeout: timeout,
        connect_timeout: timeout,
        piece_bytes: a.piece_bytes,
        shared_memory: a.transport == "auto",
        ..RingConfig::new(rank, peers, token.parse()?)
    };
    let mut ring = RingCollective::connect(listener, cfg)?;
    let be = CpuBackend::new(1)?;
    let n = a.bytes / 4;
    let mut buf: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3 + rank as f32).collect();
    let mut times = Vec::with_capacity(a.reps);
    for rep in 0..a.reps + 1 {
        Collective::<CpuBackend>::mean_scalar(&mut ring, 0.0)?; // barrier
        let t0 = Instant::now();
        ring.all_reduce_mean(&be, &mut buf, n)?;
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    println!(
        "{}",
        serde_json::json!({ "rank": rank, "times": times, "transport": ring.transport() })
    );
    Ok(())
}

/// Prints the table, then one JSON line (the medians and every run).
fn decode(a: DecodeArgs) -> anyhow::Result<()> {
    let b = ferrite_inference::bench::DecodeBench {
        threads: a.threads,
        streams: a.streams,
        new_tokens: a.new_tokens,
        prompt: a.prompt,
        ttft_prompts: a.ttft_prompts,
        reps: a.reps,
        checkpoint: a.checkpoint,
        dtype: a.dtype,
    };
    let report = ferrite_inference::bench::run(&b)?;
    println!("{}", report.table());
    println!("{}", report.json());
    Ok(())
}
