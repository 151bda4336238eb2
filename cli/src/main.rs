//! `ferrite`: argument parsing and wiring only; each command lives in `cmd/`.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferrite", version, about = "Train and serve GPT-style language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model in this process from a job file.
    Train(cmd::train::TrainArgs),
    /// Sample text from a checkpoint in this process, or from a server (--server).
    Generate(cmd::generate::GenerateArgs),
    /// Serve generations over gRPC (and OpenAI-compatible HTTP) from a checkpoint.
    Serve(cmd::serve::ServeArgs),
    /// Print the token ids of a text.
    Tokenize(cmd::data::TokenizeArgs),
    /// Print the text of token ids.
    Detokenize(cmd::data::DetokenizeArgs),
    /// Dataset commands.
    #[command(subcommand)]
    Data(DataCommand),
    /// Micro-benchmarks of Ferrite's own kernels and training step.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Run the coordinator: the cluster's job API and scheduler state.
    Coordinator(cmd::coordinator::CoordinatorArgs),
    /// Run a worker: join a coordinator and train the ranks it assigns.
    Worker(cmd::worker::WorkerArgs),
    /// Submit, list, inspect and cancel jobs on a coordinator.
    Job(cmd::job::JobArgs),
    /// Published checkpoints on a coordinator.
    Checkpoints(cmd::job::CheckpointsArgs),
    /// Ask a coordinator or inference server whether it serves (gRPC health); exit 0 if so.
    Health(cmd::health::HealthArgs),
    /// The whole system on this machine: coordinator, two workers, a training job, a
    /// server and a generation from the trained model.
    Quickstart(cmd::quickstart::QuickstartArgs),
    /// TLS material for a test cluster.
    #[command(subcommand)]
    Certs(cmd::security::CertsCommand),
    /// Operator and worker tokens.
    #[command(subcommand)]
    Token(cmd::security::TokenCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize text files into train.bin, val.bin and tokenizer.json.
    Prepare(cmd::data::PrepareArgs),
}

/// Errors print as one line, `error: <what>: <why>`, whatever `RUST_BACKTRACE` says, and
/// exit with status 1.
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => cmd::train::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Tokenize(args) => cmd::data::tokenize(args),
        Command::Detokenize(args) => cmd::data::detokenize(args),
        Command::Data(DataCommand::Prepare(args)) => cmd::data::prepare(args),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Coordinator(args) => cmd::coordinator::run(args),
        Command::Worker(args) => cmd::worker::run(args),
        Command::Job(args) => cmd::job::run(args),
        Command::Checkpoints(args) => cmd::job::checkpoints(args),
        Command::Health(args) => cmd::health::run(args),
        Command::Quickstart(args) => cmd::quickstart::run(args),
        Command::Certs(c) => cmd::security::certs(c),
        Command::Token(c) => cmd::security::token(c),
    }
}
