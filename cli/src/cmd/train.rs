//! `ferrite train JOB.toml`: one process, all the job's steps.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ferrite_kernels::cuda::Device;
use ferrite_kernels::Backend;
use ferrite_model::JobSpec;
use ferrite_worker::trainer::{cpu_backend, Event};
use ferrite_worker::{Single, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct TrainArgs {
    /// The job file (TOML: [model], [data], [train], [output]).
    pub job: PathBuf,
    /// Continue exactly from this checkpoint folder (overrides [train] resume).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop after this many steps (overrides [train] max_steps).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Print one line per step instead of a progress bar.
    #[arg(long)]
    pub plain: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut spec = JobSpec::load(&args.job)?;
    if let Some(r) = args.resume {
        spec.train.resume = Some(r);
    }
    if let Some(n) = args.max_steps {
        spec.train.max_steps = n;
    }
    match args.device {
        Device::Cpu => {
            let be = cpu_backend(&spec.train)?;
            let (asked, got) = (spec.train.matmul_precision, be.matmul_precision());
            if got != asked {
                eprintln!("matmul_precision {asked}: this CPU has no AMX-BF16; running {got}");
            }
            train_on(Arc::new(be), spec, args.plain)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            let be = ferrite_kernels::cuda::CudaBackend::new(i)?;
            train_on(Arc::new(be), spec, args.plain)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(i) => {
            ferrite_kernels::cuda::probe(i)?;
            anyhow::bail!("cuda:{i}: this build has no CUDA backend")
        }
    }
}

fn train_on<B: Backend>(be: Arc<B>, spec: JobSpec, plain: bool) -> anyhow::Result<()> {
    let device = be.name();
    let mut trainer = Trainer::new(be, spec, Box::new(Single)).context("starting the job")?;
    let (total, start) = (trainer.spec.train.max_steps, trainer.step);
    eprintln!(
        "model: {} params ({} layers, {} heads, {} wide, context {}, vocab {}); {device}",
        trainer.gpt.cfg.num_params(),
        trainer.gpt.cfg.n_layer,
        trainer.gpt.cfg.n_head,
        trainer.gpt.cfg.n_embd,
        trainer.gpt.cfg.block_size,
        trainer.gpt.cfg.vocab_size,
    );
    if start > 0 {
        eprintln!("resumed at step {start}");
    }
    let bar = if plain || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(total).with_position(start);
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
                .expect("valid template"),
        );
        b
    };
    let plain = bar.is_hidden();
    trainer.run(|ev| match ev {
        Event::Step(m) => {
            let line = format!(
                "step {:>5} | loss {:.4} | lr {:.2e} | {:.1} ms | {:.0} tok/s",
                m.step, m.loss, m.lr, m.step_ms, m.tokens_per_s
            );
            if plain {
                eprintln!("{line}");
            } else {
                bar.set_position(m.step);
                bar.set_message(line);
            }
            if let Some(v) = m.val_loss {
                bar.println(format!("step {:>5} | val loss {v:.4}", m.step));
                if plain {
                    eprintln!("step {:>5} | val loss {v:.4}", m.step);
                }
            }
        }
        Event::Checkpoint { path, .. } => {
            let line = format!("checkpoint {}", path.display());
            if plain {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
    })?;
    bar.finish_and_clear();
    Ok(())
}
