//! Copying an image between repositories (cloning into the lab registry) and
//! finding which image-shell mode an image supports, without unpacking it.

use std::collections::BTreeMap;
use std::io::Read;

use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
use oci_client::{Reference, RegistryOperation};
use serde_json::Value;

use super::Error;
use super::image::{LayerDescriptor, MANIFEST_TYPES, ResolvedImage, decompressor, sha256_digest};
use super::registry::{RegistryClient, parse_reference};

/// How far an image copy is (blobs are copied one after the other, bottom layer first, config last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyProgress {
    /// Bytes of the blobs already in the target.
    pub copied_bytes: u64,
    /// Bytes of all blobs (layers and config).
    pub total_bytes: u64,
    /// Blobs already in the target.
    pub copied_blobs: u32,
    /// Blobs to copy (layers and config).
    pub total_blobs: u32,
}

/// The image-shell helpers WalT looks for (the `init` mode contract).
pub const SHELL_START: &str = "walt-image-shell-start";
/// See [`SHELL_START`].
pub const SHELL_SHUTDOWN: &str = "walt-image-shell-shutdown";

/// Where an image keeps the helpers: `/bin`, or `/usr/bin` behind a merged-usr `/bin` symlink.
const SHELL_HELPER_DIRS: [&str; 2] = ["bin", "usr/bin"];

/// The last word a layer says about a path, read top layer first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// An executable file (or a symlink, which the shell resolves at run time).
    Executable,
    /// A file that is not executable, or deleted by a whiteout.
    Unusable,
}

/// Normalizes a tar entry path (`./bin/x`, `/bin/x`, `bin/x`) to `bin/x`.
fn normalized(path: &str) -> &str {
    path.trim_start_matches("./").trim_start_matches('/')
}

/// Records what one layer's tar says about the helper paths still undecided (pure over the entries).
#[cfg(test)]
fn scan_layer(tar: impl Read, seen: &mut BTreeMap<String, Seen>) -> std::io::Result<()> {
    shadow(seen, &layer_says(tar)?);
    Ok(())
}

/// What one layer entry (its path as in the tar, its type and mode) says about a helper path, if it
/// names one (pure): the helper's index in [`ShellHelpersSaid`] and the word.
fn helper_entry(path: &str, kind: tar::EntryType, mode: u32) -> Option<(usize, Seen)> {
    let path = normalized(path);
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    let (file, whiteout) = match file.strip_prefix(".wh.") {
        Some(deleted) => (deleted, true),
        None => (file, false),
    };
    let dir_index = SHELL_HELPER_DIRS.iter().position(|known| *known == dir)?;
    let file_index = [SHELL_START, SHELL_SHUTDOWN]
        .iter()
        .position(|known| *known == file)?;
    let state = if whiteout {
        Seen::Unusable
    } else if kind.is_symlink() || kind.is_hard_link() || mode & 0o111 != 0 {
        Seen::Executable
    } else {
        Seen::Unusable
    };
    Some((dir_index * 2 + file_index, state))
}

/// What one layer says about each helper path ([`SHELL_HELPER_DIRS`] × [`SHELL_START`],
/// [`SHELL_SHUTDOWN`]), gathered entry by entry: by the layer writer as it writes a layer (so that
/// whoever pushes it can tell [`ShellHelperLayers`], and the layer is not streamed back to learn it),
/// or by [`layer_says`] reading one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShellHelpersSaid([Option<Seen>; 4]);

impl ShellHelpersSaid {
    /// Takes one entry of the layer into account (a later entry of a path replaces the earlier one, as
    /// unpacking does): `path` as the tar names it, its entry type and mode.
    pub fn entry(&mut self, path: &str, kind: tar::EntryType, mode: u32) {
        if let Some((index, state)) = helper_entry(path, kind, mode) {
            self.0[index] = Some(state);
        }
    }

    /// The words by helper path (`bin/walt-image-shell-start`, …), the form [`ShellHelperLayers`] keeps.
    fn by_path(self) -> BTreeMap<String, Seen> {
        let paths = SHELL_HELPER_DIRS
            .iter()
            .flat_map(|dir| [SHELL_START, SHELL_SHUTDOWN].map(|file| format!("{dir}/{file}")));
        paths
            .zip(self.0)
            .filter_map(|(path, state)| Some((path, state?)))
            .collect()
    }
}

/// What one layer says about the helper paths, whatever the layers above say (pure over the
/// entries): a layer's answer depends on its bytes alone, so it is kept by layer digest.
fn layer_says(tar: impl Read) -> std::io::Result<BTreeMap<String, Seen>> {
    let mut archive = tar::Archive::new(crate::overlay::HeaderLimit::new(tar));
    let mut said = ShellHelpersSaid::default();
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let header = entry.header();
        said.entry(&path, header.entry_type(), header.mode().unwrap_or(0));
    }
    Ok(said.by_path())
}

/// Adds what a layer below says to what the layers above said (they shadow it).
fn shadow(seen: &mut BTreeMap<String, Seen>, below: &BTreeMap<String, Seen>) {
    for (key, state) in below {
        seen.entry(key.clone()).or_insert(*state);
    }
}

/// What each layer read so far says about the shell helpers, by layer digest, shared by every
/// reconcile. Images made from one base (the saved images of many shells) share its big bottom
/// layer: it is read once, and reconciles asking at the same time wait for that one reading
/// (seen under load: 20 new Images each streaming the same 120 MB base, 126 s per reconcile).
#[derive(Debug, Default)]
pub struct ShellHelperLayers {
    layers: std::sync::Mutex<std::collections::HashMap<String, LayerAnswer>>,
}

/// One layer's answer, read by the first reconcile that needs it (the others wait for it).
type LayerAnswer = std::sync::Arc<tokio::sync::OnceCell<BTreeMap<String, Seen>>>;

/// Layers whose answer is kept (each a few bytes; past this, the map starts again).
const SHELL_HELPER_LAYERS_KEPT: usize = 4096;

impl ShellHelperLayers {
    /// Records what the layer `digest` says, known by whoever wrote it (a node save): no reconcile
    /// reads that layer back for it. An answer already there stays (the same bytes say the same).
    pub fn record(&self, digest: &str, said: ShellHelpersSaid) {
        let _ = self.cell(digest).set(said.by_path());
    }

    /// The cell of `digest` (made empty when new).
    fn cell(&self, digest: &str) -> LayerAnswer {
        let mut layers = match self.layers.lock() {
            Ok(layers) => layers,
            Err(poisoned) => poisoned.into_inner(),
        };
        if layers.len() >= SHELL_HELPER_LAYERS_KEPT && !layers.contains_key(digest) {
            layers.clear();
        }
        layers.entry(digest.to_owned()).or_default().clone()
    }
}

/// Whether the paths seen (top layer first) give WalT's init mode: both helpers executable in the same
/// directory (pure).
fn has_init_helpers(seen: &BTreeMap<String, Seen>) -> bool {
    SHELL_HELPER_DIRS.iter().any(|dir| {
        [SHELL_START, SHELL_SHUTDOWN]
            .iter()
            .all(|file| seen.get(&format!("{dir}/{file}")) == Some(&Seen::Executable))
    })
}

impl RegistryClient {
    /// Fetches the manifest `digest` of `repository` as stored, checks its digest and returns its bytes
    /// with its media type (to push it elsewhere unchanged).
    pub(super) async fn fetch_manifest_verified(
        &self,
        repository: &Reference,
        digest: &str,
        action: &str,
    ) -> Result<(bytes::Bytes, http::HeaderValue), Error> {
        let by_digest = Reference::with_digest(
            repository.registry().to_owned(),
            repository.repository().to_owned(),
            digest.to_owned(),
        );
        let auth = self.auth_for(repository);
        let (bytes, _) = self
            .authorized(
                repository,
                RegistryOperation::Pull,
                &format!("fetching manifest {digest} {action}"),
                || self.inner.pull_manifest_raw(&by_digest, &auth, MANIFEST_TYPES),
            )
            .await?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(Error::DigestMismatch {
                reference: by_digest.whole(),
                what: "manifest".into(),
                expected: digest.into(),
                actual,
            });
        }
        let media_type = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
            .unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_owned());
        let content_type = http::HeaderValue::from_str(&media_type).map_err(|e| Error::Invalid {
            reference: by_digest.whole(),
            what: "manifest media type".into(),
            reason: e.to_string(),
        })?;
        Ok((bytes, content_type))
    }

    /// Copies the image `source` (one platform, as resolved) to `target` (`registry/repo:tag`): every
    /// blob first (mounted when both are in the same registry, else streamed), `progress` called after
    /// each, then the manifest unchanged (same digest), under the tag. Nothing is tagged until every blob
    /// is there, so an interrupted copy leaves the tag where it was. Returns the manifest digest.
    pub async fn copy_image(
        &self,
        source: &ResolvedImage,
        target: &str,
        mut progress: impl FnMut(CopyProgress) + Send,
    ) -> Result<String, Error> {
        let target = parse_reference(target)?;
        let source_repository = source.repository_reference();
        self.login(&target, RegistryOperation::Push).await?;
        self.login(&source_repository, RegistryOperation::Pull).await?;
        let config = LayerDescriptor {
            media_type: source.manifest["config"]["mediaType"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            digest: source.config_digest.clone(),
            size: source.manifest["config"]["size"].as_u64().unwrap_or_default(),
        };
        let blobs: Vec<&LayerDescriptor> = source.layers.iter().chain(std::iter::once(&config)).collect();
        let mut state = CopyProgress {
            total_bytes: blobs.iter().map(|blob| blob.size).sum(),
            total_blobs: u32::try_from(blobs.len()).unwrap_or(u32::MAX),
            ..CopyProgress::default()
        };
        progress(state);
        for blob in blobs {
            self.ensure_blob(source, &target, blob).await?;
            state.copied_bytes += blob.size;
            state.copied_blobs += 1;
            progress(state);
        }
        let (manifest, content_type) = self
            .fetch_manifest_verified(&source_repository, &source.digest, "to copy it")
            .await?;
        self.inner
            .push_manifest_raw(&target, manifest, content_type)
            .await
            .map_err(|e| {
                self.error(
                    &target,
                    format!("pushing manifest {} as {}", source.digest, target.whole()),
                    &e,
                )
            })?;
        Ok(source.digest.clone())
    }

    /// Whether `image` supports WalT's init image-shell mode: executable
    /// `/bin/walt-image-shell-start` and `/bin/walt-image-shell-shutdown` (or in `/usr/bin` behind a
    /// merged-usr `/bin`). Reads the layers' tar headers top layer first (digests checked), stopping as
    /// soon as both are decided; nothing is written to disk.
    pub async fn has_init_shell_mode(
        &self,
        image: &ResolvedImage,
        known: &ShellHelperLayers,
    ) -> Result<bool, Error> {
        let mut seen = BTreeMap::new();
        for layer in image.layers.iter().rev() {
            let decided = SHELL_HELPER_DIRS.len() * 2;
            if seen.len() == decided {
                break;
            }
            let says = known
                .cell(&layer.digest)
                .get_or_try_init(|| self.read_layer_says(image, layer))
                .await?
                .clone();
            shadow(&mut seen, &says);
        }
        Ok(has_init_helpers(&seen))
    }

    /// Streams one layer of `image` and reads what it says about the shell helpers.
    async fn read_layer_says(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
    ) -> Result<BTreeMap<String, Seen>, Error> {
        let shown = image.pinned_reference();
        let media_type = layer.media_type.clone();
        self.with_blob(image, layer, move |blob| {
            let reader =
                decompressor(&media_type, Box::new(blob)).ok_or_else(|| Error::UnsupportedMediaType {
                    reference: shown.clone(),
                    what: "layer".into(),
                    media_type: media_type.clone(),
                })?;
            let reader = reader.map_err(|e| Error::Internal(format!("{shown}: opening a layer: {e}")))?;
            layer_says(reader).map_err(|e| Error::Internal(format!("{shown}: reading a layer's tar: {e}")))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer of regular files: `(path, mode)`.
    fn layer(entries: &[(&str, u32)]) -> Vec<u8> {
        let regular: Vec<_> = entries
            .iter()
            .map(|(path, mode)| (*path, tar::EntryType::Regular, *mode))
            .collect();
        change_stream(&regular)
    }

    #[test]
    fn a_layer_is_read_once_for_every_image_that_has_it() {
        let known = ShellHelperLayers::default();
        let base = known.cell("sha256:base");
        assert!(
            std::sync::Arc::ptr_eq(&base, &known.cell("sha256:base")),
            "one answer per layer"
        );
        assert!(!std::sync::Arc::ptr_eq(&base, &known.cell("sha256:top")));
        let says = layer_says(
            layer(&[
                ("bin/walt-image-shell-start", 0o755),
                ("bin/walt-image-shell-start", 0o644),
            ])
            .as_slice(),
        )
        .expect("read");
        assert_eq!(
            says.get("bin/walt-image-shell-start"),
            Some(&Seen::Unusable),
            "the last entry of a path in a layer counts, as unpacking it would"
        );
    }

    /// An overlay upper dir's change stream: `(path, type, mode)`; a whiteout is a char device 0:0.
    fn change_stream(entries: &[(&str, tar::EntryType, u32)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, mode) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(*kind);
            header.set_size(0);
            header.set_mode(*mode);
            header.set_mtime(1);
            header.set_uid(0);
            header.set_gid(0);
            if kind.is_symlink() {
                header.set_link_name("busybox").expect("link name");
            }
            if *kind == tar::EntryType::Char {
                header.set_device_major(0).expect("major");
                header.set_device_minor(0).expect("minor");
            }
            builder
                .append_data(&mut header, path, std::io::empty())
                .expect("append");
        }
        builder.into_inner().expect("finish")
    }

    #[test]
    fn the_layer_writer_tells_what_reading_its_layer_back_would() {
        use tar::EntryType::{Char, Directory, Regular, Symlink};
        let stream = change_stream(&[
            ("bin", Directory, 0o755),
            ("bin/walt-image-shell-start", Regular, 0o755),
            ("bin/walt-image-shell-shutdown", Char, 0o644),
            ("etc/motd", Regular, 0o644),
            ("usr/bin/walt-image-shell-start", Symlink, 0o777),
            ("usr/bin/walt-image-shell-shutdown", Regular, 0o644),
        ]);
        let (layer, summary) = crate::overlay::write_layer_from_tar(
            &stream[..],
            &crate::overlay::LayerOptions::default(),
            Vec::new(),
        )
        .expect("write the layer");
        let read_back = layer_says(&layer[..]).expect("read the layer");
        assert_eq!(summary.shell_helpers.by_path(), read_back);
        assert_eq!(
            read_back,
            BTreeMap::from([
                ("bin/walt-image-shell-start".to_owned(), Seen::Executable),
                ("bin/walt-image-shell-shutdown".to_owned(), Seen::Unusable),
                ("usr/bin/walt-image-shell-start".to_owned(), Seen::Executable),
                ("usr/bin/walt-image-shell-shutdown".to_owned(), Seen::Unusable),
            ]),
            "a whiteout and a file not executable are unusable, a symlink is taken as executable"
        );
        // Recorded under the pushed layer's digest, it is the answer a reconcile finds (no reading).
        let known = ShellHelperLayers::default();
        known.record("sha256:saved", summary.shell_helpers);
        assert_eq!(known.cell("sha256:saved").get(), Some(&read_back));
        assert!(known.cell("sha256:other").get().is_none());
    }

    fn scan(layers_top_first: &[Vec<u8>]) -> bool {
        let mut seen = BTreeMap::new();
        for tar in layers_top_first {
            scan_layer(tar.as_slice(), &mut seen).expect("scan");
        }
        has_init_helpers(&seen)
    }

    #[test]
    fn both_helpers_executable_is_init() {
        let base = layer(&[
            ("bin/walt-image-shell-start", 0o755),
            ("./bin/walt-image-shell-shutdown", 0o755),
        ]);
        assert!(scan(&[base]));
    }

    #[test]
    fn merged_usr_helpers_are_found() {
        let base = layer(&[
            ("usr/bin/walt-image-shell-start", 0o755),
            ("usr/bin/walt-image-shell-shutdown", 0o700),
        ]);
        assert!(scan(&[base]));
    }

    #[test]
    fn one_missing_or_not_executable_is_basic() {
        assert!(!scan(&[layer(&[("bin/walt-image-shell-start", 0o755)])]));
        assert!(!scan(&[layer(&[
            ("bin/walt-image-shell-start", 0o755),
            ("bin/walt-image-shell-shutdown", 0o644),
        ])]));
    }

    #[test]
    fn a_whiteout_above_hides_a_helper_below() {
        let base = layer(&[
            ("bin/walt-image-shell-start", 0o755),
            ("bin/walt-image-shell-shutdown", 0o755),
        ]);
        let top = layer(&[("bin/.wh.walt-image-shell-start", 0o644)]);
        assert!(!scan(&[top, base]));
    }

    #[test]
    fn a_helper_added_above_completes_init() {
        let base = layer(&[("bin/walt-image-shell-start", 0o755)]);
        let top = layer(&[("bin/walt-image-shell-shutdown", 0o755)]);
        assert!(scan(&[top, base]));
    }
}
