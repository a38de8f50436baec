//! `walt-operator build`: build an image from a Dockerfile on this host.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use super::executor::{BuildRequest, build};
use crate::runtime::cli::NetworkChoice;
use crate::runtime::image::RegistryAccess;
use crate::runtime::root::Network;

/// Arguments of `walt-operator build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The build context: the directory `COPY` and `ADD` read from (`.dockerignore` honoured).
    #[arg(long, value_name = "DIR")]
    pub context: PathBuf,
    /// The Dockerfile, relative to the context unless absolute (default: `Dockerfile`, else
    /// `Containerfile`).
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// A build argument (`NAME=value`) for an `ARG` (repeat).
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    pub build_args: Vec<String>,
    /// The image to push (by digest) and tag: `registry/repository[:tag]`.
    #[arg(long, value_name = "REF")]
    pub to: String,
    /// Build this stage (`FROM … AS name`) instead of the last.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// The platform of base images that have several, and of `FROM scratch` (`linux/arm64`).
    #[arg(long)]
    pub platform: Option<String>,
    /// Network of `RUN` steps: host (the caller's, in a cluster the pod's) or none (loopback only).
    #[arg(long, value_enum, default_value_t = NetworkChoice::Host)]
    pub network: NetworkChoice,
    /// Run every step, ignoring the step cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Registry host (`host:port`) spoken to over plain HTTP (repeat).
    #[arg(long)]
    pub insecure_registry: Vec<String>,
    /// Docker `config.json` with registry credentials (default: `$REGISTRY_AUTH_FILE`,
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json` when present).
    #[arg(long)]
    pub registry_auth_file: Option<PathBuf>,
    /// The walt cache: layer cache, step cache and session directories (on a real filesystem).
    #[arg(long, env = "WALT_CACHE", default_value_os_t = crate::runtime::cli::default_cache_dir())]
    pub cache_dir: PathBuf,
}

/// Parses `NAME=VALUE` build args.
pub fn parse_build_args(values: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut args = BTreeMap::new();
    for value in values {
        let Some((name, text)) = value.split_once('=') else {
            return Err(format!("--build-arg {value}: expected NAME=VALUE"));
        };
        if name.is_empty() {
            return Err(format!("--build-arg {value}: the name is empty"));
        }
        args.insert(name.to_owned(), text.to_owned());
    }
    Ok(args)
}

/// Runs `walt-operator build …`: prints the step log, then the result as one JSON line (also written to
/// `/dev/termination-log` when present).
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    let request = BuildRequest {
        context_dir: args.context.clone(),
        dockerfile: args.file.clone(),
        build_args: parse_build_args(&args.build_args)?,
        target: args.to.clone(),
        target_stage: args.target.clone(),
        platform: args.platform.clone(),
        access: RegistryAccess {
            insecure_registries: args.insecure_registry.clone(),
            auth_file: args.registry_auth_file.clone(),
        },
        cache_dir: args.cache_dir.clone(),
        network: match args.network {
            NetworkChoice::Host => Network::Host,
            NetworkChoice::None => Network::None,
        },
        no_cache: args.no_cache,
    };
    let result = build(&request)?;
    let line = serde_json::to_string(&result)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    let termination_log = std::path::Path::new("/dev/termination-log");
    if termination_log.exists() {
        let _ = std::fs::write(termination_log, &line);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_build_args;

    #[test]
    fn build_args() {
        let args = parse_build_args(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(args["A"], "1");
        assert_eq!(args["B"], "x=y");
        assert_eq!(args["C"], "");
        assert!(
            parse_build_args(&["A".into()])
                .unwrap_err()
                .contains("NAME=VALUE")
        );
        assert!(parse_build_args(&["=1".into()]).is_err());
    }
}
