//! `walt-operator oci …`: the layer engine from the command line.
//!
//! - `walt-operator oci commit-upper --upper DIR --base REF --to REPO [--tag TAG] [--compression gzip|zstd]
//!   [--insecure-registry HOST]… [--docker-config FILE] [--walt-exclusions] [--exclude REGEX]… [--json]`:
//!   pushes base + one layer made of the upper dir, by digest; prints the digest and a change summary.
//! - `walt-operator oci unpack REF DIR [--platform os/arch] [--insecure-registry HOST]…`: the image's root
//!   filesystem in DIR.

use std::path::PathBuf;

use super::{ChangeSource, ClientOptions, CommitOptions, Compression, Credentials, Platform, RegistryClient};

/// Arguments of `walt-operator oci`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Box<OciCommand>,
}

/// Registry access options shared by the subcommands.
#[derive(Debug, clap::Args)]
struct Access {
    /// A registry (`host:port`) to reach over plain HTTP instead of HTTPS (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
    /// Docker `config.json` (or a dockerconfigjson Secret's content) with registry credentials.
    #[arg(long, value_name = "FILE", env = "WALT_DOCKER_CONFIG")]
    docker_config: Option<PathBuf>,
    /// How long a registry may stay silent (no answer, no byte of it, none of an upload taken), e.g.
    /// `1m`; past it the command fails naming the registry and this bound.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = crate::controller::config::parse_positive_duration)]
    registry_timeout: std::time::Duration,
}

impl Access {
    fn client(&self) -> Result<RegistryClient, Box<dyn std::error::Error + Send + Sync>> {
        let credentials = match &self.docker_config {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                Credentials::from_docker_config_json(&bytes)?
            }
            None => Credentials::anonymous(),
        };
        Ok(RegistryClient::new(ClientOptions {
            credentials,
            insecure_registries: self.insecure_registries.clone(),
            timeout: Some(self.registry_timeout),
        })?)
    }
}

#[derive(Debug, clap::Subcommand)]
enum OciCommand {
    /// Push BASE + one layer made of an overlay upper dir, by digest (prints the digest and a change summary).
    CommitUpper {
        /// The overlay upper dir (whiteouts as char 0:0, opaque dirs by xattr).
        #[arg(long, value_name = "DIR")]
        upper: PathBuf,
        /// The image the upper dir was made on (`registry/repo:tag` or `@sha256:…`).
        #[arg(long, value_name = "REF")]
        base: String,
        /// Target repository (`registry/repo`, no tag or digest: the image is pushed by digest; name it with
        /// `--tag`).
        #[arg(long, value_name = "REPO")]
        to: String,
        /// Also point this tag at the new image.
        #[arg(long)]
        tag: Option<String>,
        /// Layer compression.
        #[arg(long, value_enum, default_value_t = Compression::Gzip)]
        compression: Compression,
        /// Platform to pick when BASE is a multi-platform index (default: this machine's).
        #[arg(long, value_name = "OS/ARCH")]
        platform: Option<String>,
        /// Leave out WalT's boot-time noise (`/log/`, `.lock$`, `machine-id`, `walt-env`, …).
        #[arg(long)]
        walt_exclusions: bool,
        /// Leave out paths matching this regular expression (repeatable).
        #[arg(long, value_name = "REGEX")]
        exclude: Vec<String>,
        /// The history entry's `created_by`.
        #[arg(long, default_value = "walt-operator oci commit-upper")]
        created_by: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: Access,
    },
    /// Pull an image and write its root filesystem into DIR (created; must be empty).
    Unpack {
        /// The image (`registry/repo:tag` or `@sha256:…`).
        reference: String,
        /// The target directory.
        dir: PathBuf,
        /// Platform to pick from a multi-platform index (default: this machine's).
        #[arg(long, value_name = "OS/ARCH")]
        platform: Option<String>,
        #[command(flatten)]
        access: Access,
    },
}

/// Runs `walt-operator oci …`.
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    match args.command.as_ref() {
        OciCommand::CommitUpper {
            upper,
            base,
            to,
            tag,
            compression,
            platform,
            walt_exclusions,
            exclude,
            created_by,
            json,
            access,
        } => {
            let to = target_repository(to)?;
            let client = access.client()?;
            let platform = platform.as_deref().map(Platform::parse).transpose()?;
            let base_image = client.resolve(base, platform.as_ref()).await?;
            let mut options = CommitOptions::new(created_by);
            options.compression = *compression;
            if *walt_exclusions {
                options.layer = crate::overlay::LayerOptions::node_save();
            }
            options.layer.exclusions.extend(exclude.iter().cloned());
            let pushed = client
                .push_on_top(&base_image, to, ChangeSource::UpperDir(upper.clone()), options)
                .await?;
            if let Some(tag) = tag {
                client.tag(to, &pushed.manifest_digest, tag).await?;
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&pushed)?);
            } else {
                let s = &pushed.summary;
                println!("pushed {}", pushed.reference);
                println!("layer {} ({} bytes)", pushed.layer_digest, pushed.layer_size);
                println!(
                    "changes: {} added, {} modified, {} deleted, {} bytes",
                    s.added, s.modified, s.deleted, s.bytes
                );
                if let Some(tag) = tag {
                    println!("tagged {to}:{tag}");
                }
            }
            Ok(0)
        }
        OciCommand::Unpack {
            reference,
            dir,
            platform,
            access,
        } => {
            let client = access.client()?;
            let platform = platform.as_deref().map(Platform::parse).transpose()?;
            let image = client.unpack_image(reference, platform.as_ref(), dir).await?;
            println!(
                "unpacked {} ({}, {} layers) into {}",
                image.pinned_reference(),
                image.platform,
                image.layers.len(),
                dir.display()
            );
            Ok(0)
        }
    }
}

/// A `--to` of `commit-upper` that is more than a repository: the tag or digest would be silently dropped
/// (the image is pushed by digest only).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// `--to registry/repo:tag`.
    #[error(
        "--to {to:?} carries the tag {tag:?}, but --to takes a repository only (the image is pushed by \
         digest, the tag would be dropped): use --to {repository} --tag {tag}"
    )]
    Tag {
        /// `--to` as given.
        to: String,
        /// The repository part.
        repository: String,
        /// The tag part.
        tag: String,
    },
    /// `--to registry/repo@sha256:…`.
    #[error(
        "--to {to:?} carries the digest {digest:?}, but --to takes a repository only (the new image gets \
         its own digest): use --to {repository}, and --tag TAG to name the new image"
    )]
    Digest {
        /// `--to` as given.
        to: String,
        /// The repository part.
        repository: String,
        /// The digest part.
        digest: String,
    },
}

/// Checks that `--to` names a repository only (`registry[:port]/path`, no `:tag`, no `@digest`): returns it.
pub fn target_repository(to: &str) -> Result<&str, TargetError> {
    if let Some((repository, digest)) = to.split_once('@') {
        return Err(TargetError::Digest {
            to: to.to_owned(),
            repository: repository.to_owned(),
            digest: digest.to_owned(),
        });
    }
    let name_start = to.rfind('/').map_or(0, |slash| slash + 1);
    if let Some(colon) = to[name_start..].find(':') {
        let (repository, tag) = to.split_at(name_start + colon);
        return Err(TargetError::Tag {
            to: to.to_owned(),
            repository: repository.to_owned(),
            tag: tag[1..].to_owned(),
        });
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::{TargetError, target_repository};

    #[test]
    fn to_takes_a_repository_only() {
        for repository in ["127.0.0.1:5000/lab/repo", "registry.example/a/b-c_d.e", "repo"] {
            assert_eq!(target_repository(repository), Ok(repository));
        }
        let error = target_repository("127.0.0.1:5000/lab/repo:1").expect_err("tag refused");
        assert_eq!(
            error,
            TargetError::Tag {
                to: "127.0.0.1:5000/lab/repo:1".into(),
                repository: "127.0.0.1:5000/lab/repo".into(),
                tag: "1".into(),
            }
        );
        assert!(
            error
                .to_string()
                .contains("use --to 127.0.0.1:5000/lab/repo --tag 1"),
            "{error}"
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        let error = target_repository(&format!("reg:5000/repo@{digest}")).expect_err("digest refused");
        assert!(
            matches!(&error, TargetError::Digest { repository, digest: d, .. } if repository == "reg:5000/repo" && *d == digest),
            "{error:?}"
        );
        assert!(error.to_string().contains("--tag TAG"), "{error}");
        assert!(matches!(
            target_repository("reg:5000/repo:v1@sha256:00"),
            Err(TargetError::Digest { .. })
        ));
    }
}
