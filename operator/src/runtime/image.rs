//! Images through the OCI layer engine: pull into the layer cache, commit the
//! upper dir as a new image.

use super::cli::Args;
use super::session::ShellOutcome;

/// An image pulled into the layer cache.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// Layer directories, top first.
    pub lower_dirs: Vec<std::path::PathBuf>,
    /// The image's architecture.
    pub architecture: String,
    /// The image's OS.
    pub os: String,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pulls `image` into the layer cache.
pub fn pull(image: &str, _args: &Args) -> Result<Pulled, BoxError> {
    Err(format!("pulling {image}: the OCI engine is not on this branch yet").into())
}

/// Pushes the session's changes on top of `base` and tags `target`.
pub fn commit(base: &str, target: &str, _outcome: &ShellOutcome, _args: &Args) -> Result<String, BoxError> {
    Err(format!("committing {base} to {target}: the OCI engine is not on this branch yet").into())
}
