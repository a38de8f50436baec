//! Images through the OCI layer engine ([`crate::oci`]): pull into the layer
//! cache, commit the upper dir as a new image (by digest, then tag).
//!
//! The async registry client runs on a current-thread runtime that is dropped
//! before the shell starts, so the namespaces are entered from a
//! single-threaded process (see [`super::root`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::oci::{
    ChangeSource, ClientOptions, CommitOptions, Credentials, LayerCache, Platform, RegistryClient,
};
use crate::overlay::{LayerOptions, OpaqueXattr};

/// Errors of pulling and committing.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The OCI engine failed.
    #[error(transparent)]
    Oci(#[from] crate::oci::Error),
    /// The async runtime could not start.
    #[error("starting the registry client's runtime: {0}")]
    Runtime(std::io::Error),
    /// Registry credentials could not be read.
    #[error("reading registry credentials from {0}: {1}")]
    Credentials(PathBuf, std::io::Error),
    /// The commit target is not `registry/repository[:tag]`.
    #[error("--commit-to {0}: expected registry/repository[:tag] (a tag, not a digest)")]
    BadTarget(String),
    /// The image is refused before anything is unpacked.
    #[error(transparent)]
    Refused(#[from] super::session::SessionError),
    /// Threads of the registry client did not end.
    #[error("the registry client's threads did not stop; cannot enter namespaces safely")]
    Threads,
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryAccess {
    /// Hosts (`host:port`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// A Docker `config.json` with credentials (default: `$REGISTRY_AUTH_FILE`,
    /// else `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, when
    /// present).
    pub auth_file: Option<PathBuf>,
}

impl RegistryAccess {
    /// A registry client with these insecure registries and credentials (also used by node save).
    pub(crate) fn client(&self) -> Result<RegistryClient, ImageError> {
        let mut options = ClientOptions::insecure(self.insecure_registries.clone());
        if let Some(path) = self.auth_file.clone().or_else(default_auth_file) {
            let bytes = std::fs::read(&path).map_err(|e| ImageError::Credentials(path.clone(), e))?;
            options.credentials = Credentials::from_docker_config_json(&bytes)?;
        }
        Ok(RegistryClient::new(options)?)
    }
}

fn default_auth_file() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("REGISTRY_AUTH_FILE").map(PathBuf::from),
        std::env::var_os("DOCKER_CONFIG").map(|d| PathBuf::from(d).join("config.json")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// An image pulled into the layer cache.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// Layer directories, top first.
    pub lower_dirs: Vec<PathBuf>,
    /// The image's architecture (from its config).
    pub architecture: String,
    /// The image's OS (from its config).
    pub os: String,
    /// The resolved image (base of a commit).
    pub image: crate::oci::ResolvedImage,
}

/// Runs `work` on a current-thread runtime, then waits until the runtime's
/// threads are gone.
pub(crate) fn block_on<T>(
    work: impl std::future::Future<Output = Result<T, ImageError>>,
) -> Result<T, ImageError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ImageError::Runtime)?;
    let result = runtime.block_on(work);
    runtime.shutdown_timeout(Duration::from_secs(10));
    result
}

/// Waits (briefly) until this process is single-threaded again.
pub fn await_single_thread() -> Result<(), ImageError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while super::sys::thread_count() > 1 {
        if Instant::now() > deadline {
            return Err(ImageError::Threads);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Pulls `reference` (for `platform`, default: the image's only platform or
/// the host's) into the layer cache under `cache_dir/layers`.
pub fn pull(
    reference: &str,
    platform: Option<&str>,
    access: &RegistryAccess,
    cache_dir: &Path,
    user_xattr: bool,
) -> Result<Pulled, ImageError> {
    let platform = platform.map(Platform::parse).transpose()?;
    let client = access.client()?;
    let mut cache = LayerCache::new(cache_dir.join("layers"))?;
    if user_xattr {
        cache = cache.with_opaque_xattr(OpaqueXattr::User);
    }
    let pulled = block_on(async {
        // Refuse before downloading anything.
        let image = client.resolve(reference, platform.as_ref()).await?;
        if image.platform.os != "linux" {
            return Err(super::session::SessionError::NotLinux(image.platform.os.clone()).into());
        }
        if image.layers.len() > super::session::MAX_LAYERS {
            return Err(super::session::SessionError::TooManyLayers(image.layers.len()).into());
        }
        let platform = platform.unwrap_or_else(|| image.platform.clone());
        Ok(client
            .pull_image(&cache, &image.pinned_reference(), Some(&platform))
            .await?)
    })?;
    drop(client);
    await_single_thread()?;
    Ok(Pulled {
        lower_dirs: pulled.lower_dirs,
        architecture: pulled.platform.architecture.clone(),
        os: pulled.platform.os.clone(),
        image: pulled.image,
    })
}

/// What a commit pushed.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Manifest digest of the new image.
    pub digest: String,
    /// `registry/repository@digest`.
    pub pinned: String,
}

/// Splits `registry/repository[:tag]` into repository and tag (`latest`).
pub fn split_target(target: &str) -> Result<(String, String), ImageError> {
    let bad = || ImageError::BadTarget(target.to_string());
    if target.contains('@') {
        return Err(bad());
    }
    let last_slash = target.rfind('/').ok_or_else(bad)?;
    match target[last_slash..].rfind(':') {
        Some(colon) => {
            let at = last_slash + colon;
            let tag = &target[at + 1..];
            if tag.is_empty() {
                return Err(bad());
            }
            Ok((target[..at].to_string(), tag.to_string()))
        }
        None => Ok((target.to_string(), "latest".to_string())),
    }
}

/// Pushes the changes in `upper_dir` on top of `base` as one layer, by digest,
/// then tags `target` (`registry/repository[:tag]`).
pub fn commit(
    base: &Pulled,
    upper_dir: &Path,
    target: &str,
    access: &RegistryAccess,
) -> Result<Committed, ImageError> {
    let (repository, tag) = split_target(target)?;
    let client = access.client()?;
    let mut options = CommitOptions::new("walt image shell");
    options.layer = LayerOptions {
        lower_dirs: base.lower_dirs.clone(),
        ..LayerOptions::default()
    };
    let pushed = block_on(async {
        let pushed = client
            .push_on_top(
                &base.image,
                &repository,
                ChangeSource::UpperDir(upper_dir.to_path_buf()),
                options,
            )
            .await?;
        client.tag(&repository, &pushed.manifest_digest, &tag).await?;
        Ok(pushed)
    })?;
    Ok(Committed {
        digest: pushed.manifest_digest,
        pinned: pushed.reference,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn commit_targets() {
        assert_eq!(
            split_target("127.0.0.1:5000/lab/img:v2").unwrap(),
            ("127.0.0.1:5000/lab/img".into(), "v2".into())
        );
        assert_eq!(
            split_target("127.0.0.1:5000/lab/img").unwrap(),
            ("127.0.0.1:5000/lab/img".into(), "latest".into())
        );
        assert!(split_target("127.0.0.1:5000/lab/img@sha256:00").is_err());
    }
}
