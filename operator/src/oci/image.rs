//! Images: resolve (index → platform), pull into the layer cache, unpack, push a layer on top, tag.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt as _;
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
    IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciDescriptor,
};
use oci_client::{Reference, RegistryOperation};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::Error;
use super::compress::{Compression, Compressor, HashingWriter};
use super::registry::{RegistryClient, parse_reference};
use crate::overlay::{self, ChangeSummary, LayerOptions, OpaqueXattr, UnpackOptions};

const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub(super) const MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];
/// Size of each upload chunk (the unit handed to the uploader, which streams them in one request).
const UPLOAD_CHUNK: usize = 2 << 20;
/// Upload chunks buffered between the layer writer and the uploader (bounds memory).
const UPLOAD_QUEUE: usize = 1;

/// An OS / CPU pair, as in an image index (`linux/arm64`, `linux/arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Platform {
    /// Operating system (`linux`).
    pub os: String,
    /// CPU architecture, Go names (`amd64`, `arm64`, `arm`, `riscv64`).
    pub architecture: String,
    /// CPU variant (`v7`, `v8`), when it matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine (`linux/amd64`, `linux/arm64` …).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    /// Parses `os/architecture[/variant]`, e.g. `linux/arm64`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let parts: Vec<&str> = text.trim().split('/').collect();
        let bad = || Error::BadReference {
            reference: text.to_owned(),
            reason: "a platform is os/architecture[/variant], e.g. linux/arm64".into(),
        };
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).into(),
                architecture: (*arch).into(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: (*os).into(),
                    architecture: (*arch).into(),
                    variant: Some((*variant).into()),
                })
            }
            _ => Err(bad()),
        }
    }

    fn matches(&self, candidate: &Value) -> bool {
        let field = |name: &str| candidate.get(name).and_then(Value::as_str);
        field("os") == Some(self.os.as_str())
            && field("architecture") == Some(self.architecture.as_str())
            && self
                .variant
                .as_deref()
                .is_none_or(|v| field("variant") == Some(v))
    }

    fn from_json(value: &Value) -> Self {
        let field = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let variant = value.get("variant").and_then(Value::as_str).map(str::to_owned);
        Platform {
            os: field("os"),
            architecture: field("architecture"),
            variant,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// One layer of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerDescriptor {
    /// Media type (OCI or Docker; gzip, zstd or plain tar).
    pub media_type: String,
    /// Digest of the blob as stored (compressed).
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
}

impl LayerDescriptor {
    fn to_oci(&self) -> OciDescriptor {
        OciDescriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: i64::try_from(self.size).unwrap_or(i64::MAX),
            urls: None,
            annotations: None,
            artifact_type: None,
        }
    }
}

/// An image resolved to one platform-specific manifest and its config.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// Registry host (`127.0.0.1:5000`, `index.docker.io`).
    pub registry: String,
    /// Repository (`lab/busybox`).
    pub repository: String,
    /// Digest of the platform-specific manifest.
    pub digest: String,
    /// Digest of the index / manifest list it was picked from, if any.
    pub index_digest: Option<String>,
    /// The image's platform (from its config).
    pub platform: Platform,
    /// The config's labels (`walt.node.models` …).
    pub labels: BTreeMap<String, String>,
    /// Layers, bottom first.
    pub layers: Vec<LayerDescriptor>,
    /// The config's `rootfs.diff_ids` (uncompressed layer digests), bottom first.
    pub diff_ids: Vec<String>,
    /// Total size: config + layer blobs, in bytes.
    pub size: u64,
    /// The config document as stored (unknown fields kept).
    pub config: Value,
    /// Digest of the config blob.
    pub config_digest: String,
    /// The manifest as stored.
    pub manifest: Value,
}

impl ResolvedImage {
    /// `registry/repository@digest`: this exact image.
    pub fn pinned_reference(&self) -> String {
        format!("{}/{}@{}", self.registry, self.repository, self.digest)
    }

    pub(super) fn repository_reference(&self) -> Reference {
        Reference::with_digest(
            self.registry.clone(),
            self.repository.clone(),
            self.digest.clone(),
        )
    }
}

/// The changes to turn into a layer.
pub enum ChangeSource {
    /// An overlay upper dir on disk (image shell): read in a deterministic order.
    UpperDir(PathBuf),
    /// A tar stream of an upper dir (node save: what `tar c` on the node sends over SSH).
    TarStream(Box<dyn Read + Send>),
}

impl std::fmt::Debug for ChangeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeSource::UpperDir(path) => f.debug_tuple("UpperDir").field(path).finish(),
            ChangeSource::TarStream(_) => f.write_str("TarStream(..)"),
        }
    }
}

/// How [`RegistryClient::push_on_top`] builds the new image.
#[derive(Debug, Clone)]
pub struct CommitOptions {
    /// The history entry's `created_by` (`walt image shell`, `walt node save rpi-1`).
    pub created_by: String,
    /// An optional history comment.
    pub comment: Option<String>,
    /// Layer compression (gzip by default).
    pub compression: Compression,
    /// What goes into the layer (exclusions, ready marker, lower dirs for the summary).
    pub layer: LayerOptions,
    /// Labels added to (or replacing in) the base's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time written in the config (default: now). Fix it for reproducible manifests.
    pub created: Option<chrono::DateTime<chrono::Utc>>,
    /// Compression threads (0: every core).
    pub threads: usize,
}

impl CommitOptions {
    /// Defaults: gzip, no exclusions, now, every core; `created_by` as given.
    pub fn new(created_by: &str) -> Self {
        CommitOptions {
            created_by: created_by.to_owned(),
            comment: None,
            compression: Compression::Gzip,
            layer: LayerOptions::default(),
            labels: BTreeMap::new(),
            created: None,
            threads: 0,
        }
    }
}

/// What [`RegistryClient::push_on_top`] pushed (by digest; no tag was moved).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PushedImage {
    /// `registry/repository@manifest_digest`.
    pub reference: String,
    /// Digest of the new manifest.
    pub manifest_digest: String,
    /// Digest of the new config.
    pub config_digest: String,
    /// Digest of the new layer blob (compressed).
    pub layer_digest: String,
    /// Digest of the new layer's uncompressed tar (its `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// Size of the layer blob in bytes.
    pub layer_size: u64,
    /// What the layer holds.
    pub summary: ChangeSummary,
}

/// An image pulled into a [`LayerCache`], ready to be stacked with overlay.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// Unpacked layers in overlay form, **top first** (`lowerdir=` order).
    pub lower_dirs: Vec<PathBuf>,
    /// The image config document.
    pub config: Value,
    /// The image's platform.
    pub platform: Platform,
    /// Manifest digest.
    pub digest: String,
    /// Everything known about the image.
    pub image: ResolvedImage,
}

/// A content-addressed cache of unpacked layers (`<dir>/sha256/<hex>/`, one directory per blob digest), in
/// overlay form. Safe to share between concurrent pulls: a layer is unpacked into `<dir>/tmp/` and renamed
/// into place; a failed or refused layer leaves nothing behind.
#[derive(Debug, Clone)]
pub struct LayerCache {
    root: PathBuf,
    opaque_xattr: OpaqueXattr,
}

impl LayerCache {
    /// A cache in `dir` (created if missing). Must be on a filesystem overlay accepts as lower (not overlay).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let root: PathBuf = dir.into();
        for sub in ["tmp", "sha256", "sha256-userxattr"] {
            let path = root.join(sub);
            std::fs::create_dir_all(&path).map_err(|e| Error::io("creating layer cache dir", &path, e))?;
        }
        Ok(LayerCache {
            root,
            opaque_xattr: OpaqueXattr::Trusted,
        })
    }

    /// Use `user.overlay.opaque` for opaque directories (mounts with `userxattr`, in a user namespace).
    /// Such layers live apart from the `trusted.` ones.
    #[must_use]
    pub fn with_opaque_xattr(mut self, opaque_xattr: OpaqueXattr) -> Self {
        self.opaque_xattr = opaque_xattr;
        self
    }

    /// Where the layer with this blob digest is (or will be) unpacked.
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let sub = match self.opaque_xattr {
            OpaqueXattr::Trusted => "sha256",
            OpaqueXattr::User => "sha256-userxattr",
        };
        self.root.join(sub).join(hex)
    }

    /// Whether that layer is already unpacked.
    pub fn contains(&self, digest: &str) -> bool {
        self.layer_dir(digest).is_dir()
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// A `Read` over blob chunks arriving from an async task (bounded channel: flat memory).
struct ChannelReader {
    receiver: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// A `Write` that cuts what it gets into upload chunks sent to the async uploader.
struct ChannelWriter {
    sender: tokio::sync::mpsc::Sender<Result<Bytes, oci_client::errors::OciDistributionError>>,
    buffer: Vec<u8>,
}

/// What the layer writer sees when the upload it feeds has ended (failed): the upload's own error
/// is the one to report.
#[derive(Debug, thiserror::Error)]
#[error("the upload stopped")]
struct UploadStopped;

/// Whether `error` only says that the upload stopped under the writer (pure): an [`UploadStopped`]
/// anywhere in its chain of sources.
fn stopped_by_upload(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(current) = next {
        if current.is::<UploadStopped>() {
            return true;
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|inner| stopped_by_upload(inner))
        {
            return true;
        }
        next = current.source();
    }
    false
}

impl ChannelWriter {
    fn send_buffer(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(UPLOAD_CHUNK),
        ));
        self.sender
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, UploadStopped))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = (UPLOAD_CHUNK - self.buffer.len()).min(buf.len());
        self.buffer.extend_from_slice(&buf[..n]);
        if self.buffer.len() >= UPLOAD_CHUNK {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `Read` that hashes what goes through.
struct HashingReader<R: Read> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// Reads to the end (trailing padding counts too) and returns the inner reader and the digest.
    fn finish(mut self) -> std::io::Result<(R, String)> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok((
            self.inner,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
        ))
    }
}

pub(super) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(super) fn oci_layer_media_type(media_type: &str) -> String {
    match media_type {
        IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE => IMAGE_LAYER_GZIP_MEDIA_TYPE.to_owned(),
        IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE => IMAGE_LAYER_MEDIA_TYPE.to_owned(),
        other => other.to_owned(),
    }
}

/// How to read a layer blob of this media type (gzip, zstd or plain tar; None for another media type).
pub fn decompressor<'r>(
    media_type: &str,
    input: Box<dyn Read + Send + 'r>,
) -> Option<std::io::Result<Box<dyn Read + Send + 'r>>> {
    match media_type {
        IMAGE_LAYER_GZIP_MEDIA_TYPE | IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE => Some(Ok(Box::new(
            flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 16, input)),
        ))),
        ZSTD_LAYER => {
            Some(zstd::stream::read::Decoder::new(input).map(|d| Box::new(d) as Box<dyn Read + Send>))
        }
        IMAGE_LAYER_MEDIA_TYPE | IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE => Some(Ok(input)),
        _ => None,
    }
}

/// The child manifest digest an image index (or Docker manifest list) names for `wanted` (pure): an
/// exact match, else the same OS and architecture with any variant (arm64 images often say v8).
pub fn index_child(index: &Value, wanted: &Platform, shown: &str) -> Result<String, Error> {
    let entries = index["manifests"].as_array().cloned().unwrap_or_default();
    let chosen = entries
        .iter()
        .find(|m| wanted.matches(&m["platform"]))
        .or_else(|| {
            entries.iter().find(|m| {
                m["platform"]["os"] == wanted.os.as_str()
                    && m["platform"]["architecture"] == wanted.architecture.as_str()
            })
        })
        .ok_or_else(|| Error::NoPlatform {
            reference: shown.to_owned(),
            wanted: wanted.to_string(),
            available: entries
                .iter()
                .map(|m| Platform::from_json(&m["platform"]).to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    Ok(chosen["digest"].as_str().unwrap_or_default().to_owned())
}

/// The config descriptor and the layers of an image manifest (pure); schema 1 and unknown documents are
/// refused.
pub fn image_manifest_parts(
    manifest: &Value,
    shown: &str,
) -> Result<(LayerDescriptor, Vec<LayerDescriptor>), Error> {
    if manifest["schemaVersion"].as_i64() != Some(2) || manifest.get("layers").is_none() {
        let media_type = manifest["mediaType"]
            .as_str()
            .unwrap_or("Docker schema 1 or unknown")
            .to_owned();
        return Err(Error::UnsupportedMediaType {
            reference: shown.to_owned(),
            what: "manifest".into(),
            media_type,
        });
    }
    let config_desc: LayerDescriptor =
        serde_json::from_value(manifest["config"].clone()).map_err(|e| Error::Invalid {
            reference: shown.to_owned(),
            what: "manifest config descriptor".into(),
            reason: e.to_string(),
        })?;
    let layers: Vec<LayerDescriptor> =
        serde_json::from_value(manifest["layers"].clone()).map_err(|e| Error::Invalid {
            reference: shown.to_owned(),
            what: "manifest layers".into(),
            reason: e.to_string(),
        })?;
    Ok((config_desc, layers))
}

/// What [`config_parts`] reads from a config: its JSON, its diff_ids, its labels.
pub type ConfigParts = (Value, Vec<String>, BTreeMap<String, String>);

/// An image config's JSON, its `rootfs.diff_ids` (one per layer of the manifest, else refused) and its
/// labels (pure).
pub fn config_parts(config_bytes: &[u8], layer_count: usize, shown: &str) -> Result<ConfigParts, Error> {
    let config: Value = serde_json::from_slice(config_bytes).map_err(|e| Error::Invalid {
        reference: shown.to_owned(),
        what: "config".into(),
        reason: e.to_string(),
    })?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| ids.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if diff_ids.len() != layer_count {
        return Err(Error::Invalid {
            reference: shown.to_owned(),
            what: "config".into(),
            reason: format!("{layer_count} layers but {} rootfs.diff_ids", diff_ids.len()),
        });
    }
    let labels = config["config"]["Labels"]
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    Ok((config, diff_ids, labels))
}

/// How a layer is laid out on disk.
#[derive(Clone, Copy)]
enum Placement {
    /// Overlay form in its own directory (the layer cache).
    Overlay(OpaqueXattr),
    /// Applied onto a directory that holds the layers below (flattening).
    Flatten,
}

impl RegistryClient {
    /// Resolves `reference` (`registry/repo:tag` or `registry/repo@sha256:…`) to one image: follows an index
    /// or manifest list to `platform` (default: this machine's), reads the config, checks every digest.
    pub async fn resolve(
        &self,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<ResolvedImage, Error> {
        let parsed = parse_reference(reference)?;
        let auth = self.auth_for(&parsed);
        let wanted = platform.cloned().unwrap_or_else(Platform::host);
        let shown = parsed.whole();
        let (bytes, digest) = self
            .authorized(
                &parsed,
                RegistryOperation::Pull,
                &format!("fetching manifest {shown}"),
                || self.inner.pull_manifest_raw(&parsed, &auth, MANIFEST_TYPES),
            )
            .await?;
        let actual = sha256_digest(&bytes);
        if let Some(expected) = parsed.digest()
            && expected != actual
        {
            return Err(Error::DigestMismatch {
                reference: shown,
                what: "manifest".into(),
                expected: expected.into(),
                actual,
            });
        }
        let mut manifest: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Invalid {
            reference: shown.clone(),
            what: "manifest".into(),
            reason: e.to_string(),
        })?;
        let mut manifest_digest = if digest.is_empty() { actual } else { digest };
        let mut index_digest = None;
        let mut image_ref = parsed.clone();
        if manifest.get("manifests").is_some() {
            let child_digest = index_child(&manifest, &wanted, &shown)?;
            index_digest = Some(manifest_digest);
            image_ref = Reference::with_digest(
                parsed.registry().to_owned(),
                parsed.repository().to_owned(),
                child_digest.clone(),
            );
            let (child, _) = self
                .authorized(
                    &parsed,
                    RegistryOperation::Pull,
                    &format!("fetching manifest {child_digest} for {wanted}"),
                    || self.inner.pull_manifest_raw(&image_ref, &auth, MANIFEST_TYPES),
                )
                .await?;
            let actual = sha256_digest(&child);
            if actual != child_digest {
                return Err(Error::DigestMismatch {
                    reference: shown,
                    what: format!("manifest for {wanted}"),
                    expected: child_digest,
                    actual,
                });
            }
            manifest = serde_json::from_slice(&child).map_err(|e| Error::Invalid {
                reference: shown.clone(),
                what: "manifest".into(),
                reason: e.to_string(),
            })?;
            manifest_digest = child_digest;
        }
        let (config_desc, layers) = image_manifest_parts(&manifest, &shown)?;
        let config_bytes = self.config_of(&parsed, &image_ref, &config_desc, &shown).await?;
        let (config, diff_ids, labels) = config_parts(&config_bytes, layers.len(), &shown)?;
        let size = config_desc.size + layers.iter().map(|l| l.size).sum::<u64>();
        Ok(ResolvedImage {
            registry: parsed.resolve_registry().to_owned(),
            repository: parsed.repository().to_owned(),
            digest: manifest_digest,
            index_digest,
            platform: Platform::from_json(&config),
            labels,
            layers,
            diff_ids,
            size,
            config,
            config_digest: config_desc.digest,
            manifest,
        })
    }

    /// The config blob `config` of an image of `parsed`'s repository (`image_ref`: by digest), checked
    /// against its digest; read from the registry once per repository ([`super::registry::ConfigCache`]).
    async fn config_of(
        &self,
        parsed: &Reference,
        image_ref: &Reference,
        config: &LayerDescriptor,
        shown: &str,
    ) -> Result<Vec<u8>, Error> {
        let (registry, repository) = (parsed.resolve_registry(), parsed.repository());
        if let Some(kept) = self.configs.get(registry, repository, &config.digest) {
            return Ok(kept.to_vec());
        }
        let config_oci = config.to_oci();
        let fetched = self
            .authorized(
                parsed,
                RegistryOperation::Pull,
                &format!("fetching config {}", config.digest),
                || async {
                    let mut bytes = Vec::new();
                    self.inner.pull_blob(image_ref, &config_oci, &mut bytes).await?;
                    Ok(bytes)
                },
            )
            .await?;
        let actual = sha256_digest(&fetched);
        if actual != config.digest {
            return Err(Error::DigestMismatch {
                reference: shown.to_owned(),
                what: "config".into(),
                expected: config.digest.clone(),
                actual,
            });
        }
        self.configs.keep(registry, repository, &config.digest, &fetched);
        Ok(fetched)
    }

    /// Streams a blob through `consume` (run on a blocking thread) while checking its digest.
    pub(super) async fn with_blob<T: Send + 'static>(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        consume: impl FnOnce(&mut (dyn Read + Send)) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let reference = image.repository_reference();
        let layer_oci = layer.to_oci();
        let mut stream = self
            .authorized(
                &reference,
                RegistryOperation::Pull,
                &format!("fetching layer {}", layer.digest),
                || self.inner.pull_blob_stream(&reference, &layer_oci),
            )
            .await?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let feeder = async move {
            while let Some(chunk) = stream.stream.next().await {
                let failed = chunk.is_err();
                if sender.send(chunk).await.is_err() || failed {
                    break;
                }
            }
        };
        let expected = layer.digest.clone();
        let shown = image.pinned_reference();
        let worker = tokio::task::spawn_blocking(move || {
            let mut hashing = HashingReader::new(ChannelReader {
                receiver,
                current: Bytes::new(),
            });
            let result = consume(&mut hashing);
            // Drain and check the digest even when `consume` stopped early: a tampered blob is reported as such.
            let digest = hashing.finish();
            match digest {
                Ok((_, actual)) if actual != expected => Err(Error::DigestMismatch {
                    reference: shown,
                    what: format!("layer blob {expected}"),
                    expected,
                    actual,
                }),
                Ok(_) => result,
                Err(e) => result.and(Err(Error::Internal(format!("reading layer {expected}: {e}")))),
            }
        });
        let ((), outcome) = tokio::join!(feeder, worker);
        outcome.map_err(|e| Error::Internal(format!("layer reader task: {e}")))?
    }

    /// Downloads, verifies and unpacks one layer into `dest` (which must exist).
    async fn unpack_blob(
        &self,
        image: &ResolvedImage,
        index: usize,
        dest: PathBuf,
        placement: Placement,
    ) -> Result<(), Error> {
        let layer = image.layers[index].clone();
        let diff_id = image.diff_ids[index].clone();
        let shown = image.pinned_reference();
        let descriptor = layer.clone();
        self.with_blob(image, &descriptor, move |blob| {
            let context = format!("{shown}: layer {} ({})", index + 1, layer.digest);
            let reader = decompressor(&layer.media_type, Box::new(blob)).ok_or_else(|| {
                Error::UnsupportedMediaType {
                    reference: shown.clone(),
                    what: format!("layer {}", layer.digest),
                    media_type: layer.media_type.clone(),
                }
            })?;
            let reader = reader.map_err(|e| Error::io("opening compressed layer", &dest, e))?;
            let hashing = HashingReader::new(reader);
            let hashing = match placement {
                Placement::Overlay(opaque_xattr) => {
                    let options = UnpackOptions {
                        opaque_xattr,
                        ..UnpackOptions::default()
                    };
                    overlay::unpack_layer(hashing, &dest, options).map(|(r, _)| r)
                }
                Placement::Flatten => overlay::apply_layer(hashing, &dest).map(|(r, _)| r),
            }
            .map_err(|source| Error::Layer {
                context: context.clone(),
                source,
            })?;
            let (_, actual) = hashing
                .finish()
                .map_err(|e| Error::io("reading layer", &dest, e))?;
            if actual != diff_id {
                return Err(Error::DigestMismatch {
                    reference: shown,
                    what: format!("uncompressed layer {}", index + 1),
                    expected: diff_id,
                    actual,
                });
            }
            Ok(())
        })
        .await
    }

    /// Pulls an image into `cache` (layers already there are reused) and returns its lower dirs, top first.
    pub async fn pull_image(
        &self,
        cache: &LayerCache,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<PulledImage, Error> {
        let image = self.resolve(reference, platform).await?;
        let mut lower_dirs = Vec::with_capacity(image.layers.len());
        for (index, layer) in image.layers.iter().enumerate() {
            let target = cache.layer_dir(&layer.digest);
            if !target.is_dir() {
                let staging = tempfile::Builder::new()
                    .prefix("layer-")
                    .tempdir_in(cache.root().join("tmp"))
                    .map_err(|e| Error::io("creating a staging dir in", cache.root(), e))?;
                let unpacked = staging.path().join("root");
                std::fs::create_dir(&unpacked).map_err(|e| Error::io("creating", &unpacked, e))?;
                // On failure the staging dir goes with `staging`: nothing half unpacked stays.
                self.unpack_blob(
                    &image,
                    index,
                    unpacked.clone(),
                    Placement::Overlay(cache.opaque_xattr),
                )
                .await
                .map_err(|error| disk_full_in(error, cache.root(), &image, index))?;
                match std::fs::rename(&unpacked, &target) {
                    Ok(()) => {}
                    // Another pull placed the same layer first: keep theirs, drop ours.
                    Err(_) if target.is_dir() => {}
                    Err(e) => return Err(Error::io("placing layer into", &target, e)),
                }
            }
            lower_dirs.push(target);
        }
        lower_dirs.reverse();
        Ok(PulledImage {
            lower_dirs,
            config: image.config.clone(),
            platform: image.platform.clone(),
            digest: image.digest.clone(),
            image,
        })
    }

    /// Pulls an image and flattens it into `dest` (created; must be empty): the image's root filesystem, as
    /// `umoci unpack` would give it.
    pub async fn unpack_image(
        &self,
        reference: &str,
        platform: Option<&Platform>,
        dest: &Path,
    ) -> Result<ResolvedImage, Error> {
        std::fs::create_dir_all(dest).map_err(|e| Error::io("creating", dest, e))?;
        let mut entries = std::fs::read_dir(dest).map_err(|e| Error::io("listing", dest, e))?;
        if entries.next().is_some() {
            return Err(Error::io(
                "unpacking into",
                dest,
                std::io::Error::new(
                    std::io::ErrorKind::DirectoryNotEmpty,
                    "the target directory is not empty",
                ),
            ));
        }
        let image = self.resolve(reference, platform).await?;
        for index in 0..image.layers.len() {
            self.unpack_blob(&image, index, dest.to_path_buf(), Placement::Flatten)
                .await?;
        }
        Ok(image)
    }

    /// Makes sure `layer` (a blob of `base`) is in `target`'s repository: already there, mounted across
    /// repositories, or copied (streamed) when the registry refuses the mount or is another registry.
    pub(super) async fn ensure_blob(
        &self,
        base: &ResolvedImage,
        target: &Reference,
        layer: &LayerDescriptor,
    ) -> Result<(), Error> {
        let exists = self
            .inner
            .blob_exists(target, &layer.digest)
            .await
            .map_err(|e| self.error(target, format!("checking blob {}", layer.digest), &e))?;
        if exists {
            return Ok(());
        }
        let source = base.repository_reference();
        if source.resolve_registry() == target.resolve_registry() {
            match self.mount_across(target, &source, &layer.digest).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    tracing::info!(digest = %layer.digest, "blob mount refused; copying the blob");
                }
                Err(e) => {
                    tracing::info!(digest = %layer.digest, error = %e, "blob mount failed; copying the blob");
                }
            }
        }
        let layer_oci = layer.to_oci();
        let stream = self
            .authorized(
                &source,
                RegistryOperation::Pull,
                &format!("fetching blob {} to copy it", layer.digest),
                || self.inner.pull_blob_stream(&source, &layer_oci),
            )
            .await?;
        let body = stream
            .stream
            .map(|chunk| chunk.map_err(oci_client::errors::OciDistributionError::from));
        self.inner
            .push_blob_stream(target, body, &layer.digest, Some(layer.size))
            .await
            .map_err(|e| self.error(target, format!("copying blob {}", layer.digest), &e))?;
        Ok(())
    }

    /// Turns `changes` into one layer and uploads it to `target` in a single pass (layer writer, diff_id
    /// hash, compression and upload all streaming; memory stays flat). Returns (blob digest, blob size,
    /// diff_id, summary).
    pub(super) async fn push_layer(
        &self,
        target: &Reference,
        changes: ChangeSource,
        options: &CommitOptions,
    ) -> Result<(String, u64, String, ChangeSummary), Error> {
        let (sender, mut receiver) = tokio::sync::mpsc::channel(UPLOAD_QUEUE);
        let error_sender = sender.clone();
        let layer_options = options.layer.clone();
        let compression = options.compression;
        let threads = options.threads;
        let writer = tokio::task::spawn_blocking(move || -> Result<(String, ChangeSummary), Error> {
            let run = || -> Result<(String, ChangeSummary), Error> {
                let sink = ChannelWriter {
                    sender,
                    buffer: Vec::with_capacity(UPLOAD_CHUNK),
                };
                let compressor = Compressor::new(compression, sink, threads)
                    .map_err(|e| Error::Internal(format!("starting the compressor: {e}")))?;
                let hashing = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 16, compressor));
                let (hashing, summary) = match changes {
                    ChangeSource::UpperDir(dir) => {
                        overlay::write_layer_from_dir(&dir, &layer_options, hashing).map_err(|source| {
                            Error::Layer {
                                context: format!("reading upper dir {}", dir.display()),
                                source,
                            }
                        })?
                    }
                    ChangeSource::TarStream(stream) => {
                        overlay::write_layer_from_tar(stream, &layer_options, hashing).map_err(|source| {
                            Error::Layer {
                                context: "converting the change stream".into(),
                                source,
                            }
                        })?
                    }
                };
                let (buffered, diff_id, _) = hashing.finish();
                let compressor = buffered
                    .into_inner()
                    .map_err(|e| Error::Internal(format!("flushing the layer: {}", e.error())))?;
                let mut sink = compressor
                    .finish()
                    .map_err(|e| Error::Internal(format!("finishing compression: {e}")))?;
                sink.send_buffer()
                    .map_err(|e| Error::Internal(format!("sending the last chunk: {e}")))?;
                Ok((diff_id, summary))
            };
            let outcome = run();
            if let Err(e) = &outcome {
                // Abort the upload: the registry must not get a truncated blob.
                let _ = error_sender.blocking_send(Err(
                    oci_client::errors::OciDistributionError::GenericError(Some(e.to_string())),
                ));
            }
            outcome
        });
        let stream = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
        let upload = self.push_blob_streamed(target, stream).await;
        let written = writer
            .await
            .map_err(|e| Error::Internal(format!("layer writer task: {e}")))?;
        match (written, upload) {
            (Ok((diff_id, summary)), Ok(uploaded)) => Ok((uploaded.digest, uploaded.size, diff_id, summary)),
            // The upload failed first (the registry went away): the writer only saw it stop.
            (Err(error), Err(upload)) if stopped_by_upload(&error) => {
                Err(self.error(target, "uploading the new layer", &upload))
            }
            // A bad change set aborts the upload: report the cause, not the aborted upload.
            (Err(error @ Error::Layer { .. }), _) | (Err(error), Ok(_)) => Err(error),
            (_, Err(error)) => Err(self.error(target, "uploading the new layer", &error)),
        }
    }

    /// Builds a new image = `base` + one layer made of `changes`, in `target_repository` (`registry/repo`,
    /// a tag there is ignored): uploads the layer (streaming), reuses the base's layer blobs (mount or
    /// copy), pushes the config (base config + diff_id + history entry + labels) and the OCI manifest, **by
    /// digest only**. Use [`RegistryClient::tag`] to move a tag afterwards.
    pub async fn push_on_top(
        &self,
        base: &ResolvedImage,
        target_repository: &str,
        changes: ChangeSource,
        options: CommitOptions,
    ) -> Result<PushedImage, Error> {
        let parsed = parse_reference(target_repository)?;
        let target = Reference::with_tag(
            parsed.registry().to_owned(),
            parsed.repository().to_owned(),
            "latest".into(),
        );
        self.login(&target, RegistryOperation::Push).await?;
        if base.registry != target.resolve_registry() || base.repository != target.repository() {
            self.login(&base.repository_reference(), RegistryOperation::Pull)
                .await?;
        }
        let (layer_digest, layer_size, diff_id, summary) =
            self.push_layer(&target, changes, &options).await?;
        for layer in &base.layers {
            self.ensure_blob(base, &target, layer).await?;
        }
        let created = options
            .created
            .unwrap_or_else(chrono::Utc::now)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut config = base.config.clone();
        let invalid = |reason: &str| Error::Invalid {
            reference: base.pinned_reference(),
            what: "config".into(),
            reason: reason.into(),
        };
        config
            .get_mut("rootfs")
            .and_then(|r| r.get_mut("diff_ids"))
            .and_then(Value::as_array_mut)
            .ok_or_else(|| invalid("no rootfs.diff_ids"))?
            .push(json!(diff_id));
        let mut history = json!({"created": created, "created_by": options.created_by});
        if let Some(comment) = &options.comment {
            history["comment"] = json!(comment);
        }
        match config.get_mut("history").and_then(Value::as_array_mut) {
            Some(entries) => entries.push(history),
            None => config["history"] = json!([history]),
        }
        config["created"] = json!(created);
        if !options.labels.is_empty() {
            if !config["config"].is_object() {
                config["config"] = json!({});
            }
            if !config["config"]["Labels"].is_object() {
                config["config"]["Labels"] = json!({});
            }
            for (key, value) in &options.labels {
                config["config"]["Labels"][key] = json!(value);
            }
        }
        let mut layers: Vec<Value> = base
            .layers
            .iter()
            .map(|l| json!({"mediaType": oci_layer_media_type(&l.media_type), "digest": l.digest, "size": l.size}))
            .collect();
        layers.push(json!({"mediaType": options.compression.media_type(), "digest": layer_digest, "size": layer_size}));
        let (manifest_digest, config_digest) = self
            .push_config_and_manifest(base, &target, layers, &config)
            .await?;
        Ok(PushedImage {
            reference: format!(
                "{}/{}@{manifest_digest}",
                target.resolve_registry(),
                target.repository()
            ),
            manifest_digest,
            config_digest,
            layer_digest,
            diff_id,
            layer_size,
            summary,
        })
    }

    /// Pushes `config` and an OCI manifest of `layers` (JSON descriptors, bottom first, all already in
    /// `target`'s repository) **by digest**; `base` only decides the config's media type. Returns the
    /// manifest and config digests.
    pub(super) async fn push_config_and_manifest(
        &self,
        base: &ResolvedImage,
        target: &Reference,
        layers: Vec<Value>,
        config: &Value,
    ) -> Result<(String, String), Error> {
        let config_bytes =
            serde_json::to_vec(config).map_err(|e| Error::Internal(format!("serializing config: {e}")))?;
        let config_digest = sha256_digest(&config_bytes);
        self.inner
            .push_blob(target, config_bytes.clone(), &config_digest)
            .await
            .map_err(|e| self.error(target, "uploading the new config", &e))?;
        let config_media_type = match base.manifest["config"]["mediaType"].as_str() {
            Some(IMAGE_DOCKER_CONFIG_MEDIA_TYPE) | None => IMAGE_CONFIG_MEDIA_TYPE,
            Some(other) => other,
        };
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "config": {"mediaType": config_media_type, "digest": config_digest, "size": config_bytes.len()},
            "layers": layers,
        });
        let manifest_bytes = serde_json::to_vec(&manifest)
            .map_err(|e| Error::Internal(format!("serializing manifest: {e}")))?;
        let manifest_digest = sha256_digest(&manifest_bytes);
        let by_digest = Reference::with_digest(
            target.registry().to_owned(),
            target.repository().to_owned(),
            manifest_digest.clone(),
        );
        self.inner
            .push_manifest_raw(
                &by_digest,
                manifest_bytes,
                http::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE),
            )
            .await
            .map_err(|e| self.error(target, format!("pushing manifest {manifest_digest}"), &e))?;
        Ok((manifest_digest, config_digest))
    }

    /// Points `tag` of `repository` (`registry/repo`) at the manifest `digest` already in that repository.
    pub async fn tag(&self, repository: &str, digest: &str, tag: &str) -> Result<(), Error> {
        let parsed = parse_reference(repository)?;
        let tagged = Reference::with_tag(
            parsed.registry().to_owned(),
            parsed.repository().to_owned(),
            tag.to_owned(),
        );
        self.login(&tagged, RegistryOperation::Push).await?;
        let (bytes, content_type) = self
            .fetch_manifest_verified(&parsed, digest, &format!("to tag it {tag}"))
            .await?;
        self.inner
            .push_manifest_raw(&tagged, bytes, content_type)
            .await
            .map_err(|e| self.error(&parsed, format!("setting tag {tag} to {digest}"), &e))?;
        Ok(())
    }
}

/// `error`, said as the layer cache's disk being full when it is `ENOSPC` (pure).
fn disk_full_in(error: Error, cache: &Path, image: &ResolvedImage, index: usize) -> Error {
    if !error.is_disk_full() || matches!(error, Error::DiskFull { .. }) {
        return error;
    }
    Error::DiskFull {
        action: format!(
            "unpacking layer {} of {} into the layer cache",
            index + 1,
            image.pinned_reference()
        ),
        path: cache.to_owned(),
        detail: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer_error(source: std::io::Error) -> Error {
        Error::Layer {
            context: "converting the change stream".into(),
            source: crate::overlay::Error::Tar {
                context: "writing srv/big".into(),
                source,
            },
        }
    }

    #[test]
    fn an_upload_that_stopped_is_told_apart_from_a_bad_change_set() {
        let stopped = layer_error(std::io::Error::new(std::io::ErrorKind::BrokenPipe, UploadStopped));
        assert!(stopped_by_upload(&stopped));
        let full = layer_error(std::io::Error::other("No space left on device"));
        assert!(!stopped_by_upload(&full));
    }
}
