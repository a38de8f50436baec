//! The shipping tasks of `cargo xtask`: `image build`, `deploy sync`, `dist`, `lab up|down`. The xtask binary
//! flattens [`Task`] into its own subcommands.

use std::path::PathBuf;

use clap::Subcommand;

use crate::deploy;
use crate::dist;
use crate::image_build::{self, Arch, BuildOptions};
use crate::lab;

/// Shipping subcommands of `cargo xtask`.
#[derive(Debug, Subcommand)]
pub enum Task {
    /// The walt container image (operator, shell pods, virtual nodes, binfmt agent).
    Image {
        /// What to do.
        #[command(subcommand)]
        action: ImageAction,
    },
    /// The kustomize base generated from the chart.
    Deploy {
        /// What to do.
        #[command(subcommand)]
        action: DeployAction,
    },
    /// Release archives of kubectl-walt (static, amd64 and arm64), SHA256SUMS and a krew manifest.
    Dist(DistArgs),
    /// The local lab: a cluster, a registry, walt installed, demo images and a virtual node.
    Lab {
        /// What to do.
        #[command(subcommand)]
        action: LabAction,
    },
}

/// `cargo xtask image …`.
#[derive(Debug, Subcommand)]
pub enum ImageAction {
    /// Build the multi-arch image (static musl binaries, no Docker engine) and optionally push it.
    Build {
        /// Push the index to this reference, e.g. 127.0.0.1:5000/walt/operator:dev.
        #[arg(long, value_name = "REGISTRY/REPOSITORY:TAG")]
        push: Option<String>,
        /// Architectures (comma-separated).
        #[arg(long, default_value = "amd64,arm64", value_delimiter = ',')]
        arch: Vec<String>,
        /// Plain HTTP registry (default for loopback addresses).
        #[arg(long)]
        insecure: bool,
        /// Where to write the OCI image layout (default: in the walt cache).
        #[arg(long)]
        layout: Option<PathBuf>,
        /// Cargo profile of the binaries: `release` (what is published) or `dist-check` (unoptimized,
        /// built in a fraction of the time: what the tests install; never publish it).
        #[arg(long, default_value = "release")]
        profile: String,
    },
}

/// `cargo xtask deploy …`.
#[derive(Debug, Subcommand)]
pub enum DeployAction {
    /// Regenerate deploy/base from the chart's defaults (run after changing the chart).
    Sync,
}

/// `cargo xtask dist`.
#[derive(Debug, clap::Args)]
pub struct DistArgs {
    /// Output directory.
    #[arg(long, default_value = "target/dist")]
    pub out: PathBuf,
    /// URL the archives are published under (the krew manifest's `uri`s); `{version}` is replaced.
    #[arg(long, default_value = dist::DEFAULT_BASE_URL)]
    pub base_url: String,
    /// Version in the file names and the krew manifest (default: the workspace's).
    #[arg(long)]
    pub version: Option<String>,
    /// Architectures (comma-separated).
    #[arg(long, default_value = "amd64,arm64", value_delimiter = ',')]
    pub arch: Vec<String>,
    /// Cargo profile of the binaries: `release` (what is published) or `dist-check` (unoptimized, built in
    /// a fraction of the time: to check the packaging, as the dist test does; never publish it).
    #[arg(long, default_value = "release")]
    pub profile: String,
}

/// `cargo xtask lab …`.
#[derive(Debug, Subcommand)]
pub enum LabAction {
    /// Bring the lab up (idempotent: a second run changes nothing).
    Up(lab::UpOptions),
    /// Remove everything `lab up` made.
    Down,
}

impl Task {
    /// Whether the task builds, starts or tests something, so the machine's dependencies must be there first.
    pub fn needs_machine(&self) -> bool {
        matches!(
            self,
            Task::Image { .. }
                | Task::Dist(_)
                | Task::Lab {
                    action: LabAction::Up(_)
                }
        )
    }

    /// Runs the task.
    pub fn run(self) -> Result<(), String> {
        match self {
            Task::Image {
                action:
                    ImageAction::Build {
                        push,
                        arch,
                        insecure,
                        layout,
                        profile,
                    },
            } => image_build_command(push.as_deref(), &arch, insecure, layout, &profile),
            Task::Deploy {
                action: DeployAction::Sync,
            } => deploy::sync_base().map_err(|e| e.to_string()),
            Task::Dist(args) => dist_command(args),
            Task::Lab {
                action: LabAction::Up(options),
            } => lab::up(&options).map_err(|e| e.to_string()),
            Task::Lab {
                action: LabAction::Down,
            } => lab::down().map_err(|e| e.to_string()),
        }
    }
}

fn dist_command(args: DistArgs) -> Result<(), String> {
    let arches = args
        .arch
        .iter()
        .map(|a| Arch::parse(a.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let profile = image_build::BuildProfile::parse(&args.profile).map_err(|e| e.to_string())?;
    let out_dir = if args.out.is_absolute() {
        args.out
    } else {
        deploy::repo_root().join(args.out)
    };
    let options = dist::Options {
        out_dir,
        version: args
            .version
            .unwrap_or_else(|| dist::workspace_version().to_owned()),
        base_url: args.base_url,
        arches,
        profile,
    };
    let made = dist::dist(&options).map_err(|e| e.to_string())?;
    if profile != image_build::BuildProfile::Release {
        eprintln!(
            "dist: built with the {} profile (unoptimized): to check the packaging, not to publish",
            profile.name()
        );
    }
    for archive in &made.archives {
        println!(
            "{}  {}  {}",
            archive.path.display(),
            image_build::human(archive.size),
            archive.sha256
        );
    }
    println!("{}", made.sums.display());
    println!("{}", made.krew_manifest.display());
    Ok(())
}

fn image_build_command(
    push: Option<&str>,
    arch: &[String],
    insecure: bool,
    layout: Option<PathBuf>,
    profile: &str,
) -> Result<(), String> {
    let profile = image_build::BuildProfile::parse(profile).map_err(|e| e.to_string())?;
    let arches = arch
        .iter()
        .map(|a| Arch::parse(a.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let tag = push.map_or_else(|| "dev".to_owned(), image_build::tag_of);
    let options = BuildOptions {
        arches,
        layout_dir: layout.unwrap_or_else(|| deploy::cache_dir().join("image").join("layout")),
        tag,
        profile,
    };
    let built = image_build::build(&options).map_err(|e| e.to_string())?;
    for platform in &built.platforms {
        println!(
            "linux/{}: manifest {}  binary {}  download {}  unpacked {}",
            platform.arch.name(),
            platform.manifest_digest,
            image_build::human(platform.binary_size),
            image_build::human(platform.compressed_size),
            image_build::human(platform.unpacked_size),
        );
    }
    println!("index {} in {}", built.index_digest, built.layout_dir.display());
    if let Some(reference) = push {
        let insecure = insecure || image_build::is_loopback_registry(reference);
        image_build::push(&built, reference, insecure).map_err(|e| e.to_string())?;
        println!("pushed {reference}@{}", built.index_digest);
    }
    Ok(())
}
