//! `walt-operator save …`, `walt-operator gateway …` and `walt-operator vnode …`.

/// Arguments of `walt-operator save`.
#[derive(Debug, clap::Args)]
pub struct SaveArgs {}

/// Arguments of `walt-operator vnode`.
#[derive(Debug, clap::Args)]
pub struct VnodeArgs {}

/// Runs `walt-operator save …`.
pub fn run_save(_args: &SaveArgs) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    Err("walt-operator save is not built yet".into())
}

/// Runs `walt-operator vnode …`.
pub fn run_vnode(_args: &VnodeArgs) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    Err("walt-operator vnode is not built yet".into())
}
