//! `ferrite tokenize`, `detokenize`, `data prepare` (the data work fills these in).

use clap::Args;

#[derive(Args)]
pub struct TokenizeArgs {}
#[derive(Args)]
pub struct DetokenizeArgs {}
#[derive(Args)]
pub struct PrepareArgs {}

pub fn tokenize(_: TokenizeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn detokenize(_: DetokenizeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn prepare(_: PrepareArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
