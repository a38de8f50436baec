//! `walt-operator oci …`: the layer engine from the command line.

/// Arguments of `walt-operator oci`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `walt-operator oci …`.
pub fn run(_args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    Err("walt-operator oci is not built yet".into())
}
