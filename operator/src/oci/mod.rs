//! OCI registry client, layer writer and reader, manifests and configs (no Kubernetes in here).
//!
//! # Entry points
//! - [`RegistryClient::new`] with [`ClientOptions`]: [`Credentials`] (anonymous, basic from a Docker
//!   `config.json` or a `kubernetes.io/dockerconfigjson` Secret's bytes via
//!   [`Credentials::from_docker_config_json`], bearer tokens) and the registries reached over plain HTTP
//!   (`insecure_registries`, e.g. `127.0.0.1:5000`). Every error names the registry, the repository and what
//!   the registry answered.
//! - [`RegistryClient::resolve`]`(reference, platform)` → [`ResolvedImage`] { digest, platform, labels,
//!   layers, size, config }: OCI and Docker media types; an index / manifest list is resolved to one
//!   [`Platform`] (the requested one, else the host's).
//! - [`LayerCache::new`]`(dir)` + [`RegistryClient::pull_image`] → [`PulledImage`] { `lower_dirs` (top
//!   first, ready for `lowerdir=`), config, platform, digest }: content-addressed layer cache in overlay form
//!   (whiteouts → char 0:0, opaque → `trusted.overlay.opaque=y`, or `user.overlay.opaque=y` with
//!   [`LayerCache::with_opaque_xattr`]), every digest verified, atomic placement (unpack into a temporary dir,
//!   then rename), unsafe entries refused (see [`crate::overlay::unpack_layer`]).
//! - [`RegistryClient::unpack_image`]: an image flattened into one root filesystem (`walt-operator oci unpack`).
//! - [`RegistryClient::push_on_top`]`(base, target_repository, changes, options)` → [`PushedImage`]
//!   { manifest_digest, config_digest, layer_digest, diff_id, layer_size, summary }: turns a [`ChangeSource`]
//!   (an overlay upper dir on disk, or a tar stream of one as a node sends it) into one layer — see
//!   [`crate::overlay`] for the conversion rules and [`crate::overlay::LayerOptions`] for WalT's exclusions
//!   and the "changed after ready" filter — compresses it ([`Compression`]: gzip on every core, or zstd) and
//!   hashes it (diff_id and blob digest) in the same single pass that uploads it as one streamed request
//!   (flat memory, no temporary file), reuses the base's blobs by cross-repository mount (copy when refused), and pushes the
//!   config (labels kept, history entry appended) and the manifest **by digest only**.
//! - [`RegistryClient::tag`]`(repository, digest, tag)`: moving a tag is a separate, explicit step.
//!
//! ```no_run
//! # async fn demo() -> Result<(), walt_operator::oci::Error> {
//! use walt_operator::oci::{ChangeSource, ClientOptions, CommitOptions, RegistryClient};
//! let client = RegistryClient::new(ClientOptions::insecure(["127.0.0.1:5000"]))?;
//! let base = client.resolve("127.0.0.1:5000/lab/busybox:latest", None).await?;
//! let pushed = client
//!     .push_on_top(&base, "127.0.0.1:5000/lab/busybox", ChangeSource::UpperDir("/upper".into()),
//!                  CommitOptions::new("walt image shell"))
//!     .await?;
//! client.tag("127.0.0.1:5000/lab/busybox", &pushed.manifest_digest, "latest").await?;
//! # Ok(()) }
//! ```

mod build;
pub mod cli;
mod compress;
mod copy;
mod error;
mod image;
mod registry;
mod squash;
pub mod token_issuer;
mod upload;

pub use build::UploadedLayer;
pub use compress::{Compression, Compressor, HashingWriter, ParallelGzip};
pub use copy::{CopyProgress, Seen, ShellHelperLayers, ShellHelpersSaid};
pub use error::Error;
pub use image::{
    ChangeSource, CommitOptions, ConfigParts, LayerCache, LayerDescriptor, Platform, PulledImage,
    PushedImage, ResolvedImage, config_parts, decompressor, image_manifest_parts, index_child,
};
pub use registry::{ClientOptions, Credentials, DEFAULT_TIMEOUT, RegistryClient};
pub use squash::squash_tars;
