//! `walt-operator shell …`: a root shell inside an OS image.

/// Arguments of `walt-operator shell`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `walt-operator shell …`.
pub fn run(_args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    Err("walt-operator shell is not built yet".into())
}
