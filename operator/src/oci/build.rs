//! What image builds need from the registry beyond a commit: a layer blob alone, and an image assembled
//! from a base, layers already uploaded and a config written by the builder.

use std::path::Path;

use oci_client::{Reference, RegistryOperation};
use serde_json::{Value, json};

use super::Error;
use super::image::{ChangeSource, CommitOptions, LayerDescriptor, ResolvedImage, oci_layer_media_type};
use super::registry::{RegistryClient, parse_reference};
use crate::overlay::ChangeSummary;

/// A layer blob uploaded by [`RegistryClient::push_layer_dir`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadedLayer {
    /// The blob as the manifest lists it.
    pub descriptor: LayerDescriptor,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// What the layer holds.
    pub summary: ChangeSummary,
}

fn repository_reference(target_repository: &str) -> Result<Reference, Error> {
    let parsed = parse_reference(target_repository)?;
    Ok(Reference::with_tag(
        parsed.registry().to_owned(),
        parsed.repository().to_owned(),
        "latest".into(),
    ))
}

impl RegistryClient {
    /// Turns an overlay upper dir into one layer blob in `target_repository` (`registry/repo`), streaming
    /// (see [`RegistryClient::push_on_top`]); no manifest is written.
    pub async fn push_layer_dir(
        &self,
        target_repository: &str,
        upper_dir: &Path,
        options: &CommitOptions,
    ) -> Result<UploadedLayer, Error> {
        let target = repository_reference(target_repository)?;
        self.login(&target, RegistryOperation::Push).await?;
        let (digest, size, diff_id, summary) = self
            .push_layer(&target, ChangeSource::UpperDir(upper_dir.to_path_buf()), options)
            .await?;
        Ok(UploadedLayer {
            descriptor: LayerDescriptor {
                media_type: options.compression.media_type().to_owned(),
                digest,
                size,
            },
            diff_id,
            summary,
        })
    }

    /// Whether `repository` (`registry/repo`) holds the blob `digest`.
    pub async fn has_blob(&self, repository: &str, digest: &str) -> Result<bool, Error> {
        let target = repository_reference(repository)?;
        self.login(&target, RegistryOperation::Pull).await?;
        self.inner
            .blob_exists(&target, digest)
            .await
            .map_err(|e| self.error(&target, format!("checking blob {digest}"), &e))
    }

    /// Pushes, **by digest**, the image made of `base`'s layers (mounted or copied into
    /// `target_repository` when missing there), then `added` (already uploaded there), with `config` as
    /// written by the caller (its `rootfs.diff_ids` must list every layer). Returns the manifest digest.
    pub async fn push_assembled(
        &self,
        base: &ResolvedImage,
        target_repository: &str,
        added: &[LayerDescriptor],
        config: &Value,
    ) -> Result<String, Error> {
        let target = repository_reference(target_repository)?;
        self.login(&target, RegistryOperation::Push).await?;
        if !base.layers.is_empty()
            && (base.registry != target.resolve_registry() || base.repository != target.repository())
        {
            self.login(&base.repository_reference(), RegistryOperation::Pull)
                .await?;
        }
        for layer in &base.layers {
            self.ensure_blob(base, &target, layer).await?;
        }
        let layers = base
            .layers
            .iter()
            .chain(added)
            .map(|l| json!({"mediaType": oci_layer_media_type(&l.media_type), "digest": l.digest, "size": l.size}))
            .collect();
        let (manifest_digest, _) = self
            .push_config_and_manifest(base, &target, layers, config)
            .await?;
        Ok(manifest_digest)
    }
}
