use clap::Args;
#[derive(Args)]
pub struct TrainArgs {}
pub fn run(_: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
