use clap::Subcommand;
#[derive(Subcommand)]
pub enum BenchCommand { Matmul }
pub fn run(_: BenchCommand) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
