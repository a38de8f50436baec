//! `walt-operator run`: the operator.

/// Arguments of `walt-operator run`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the operator.
pub fn run(_args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    Err("walt-operator run is not built yet".into())
}
