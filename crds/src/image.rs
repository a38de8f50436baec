//! `Image`: an OS image the lab keeps in its OCI registry.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::SecretReference;

/// An image shell is refused on an image with this many layers or more (WalT's limit: squash first).
pub const MAX_SHELL_LAYERS: u32 = 128;

/// The reasons an Image's `Ready` condition and Events give, read alike by the operator (which
/// writes them) and `kubectl walt` (which waits on them): one place, compared as constants, never
/// as message text.
pub mod reasons {
    /// `Ready=True`: the reference resolved; also the Event when its digest moved.
    pub const RESOLVED: &str = "Resolved";
    /// `Ready=False` while `spec.source` is copied into the lab registry (progress in `status.clone`).
    pub const CLONING: &str = "Cloning";
    /// Event: the clone finished.
    pub const CLONED: &str = "Cloned";
    /// `Ready=False`: `spec.reference` (or the name) does not make a usable reference.
    pub const INVALID_REFERENCE: &str = "InvalidReference";
    /// `Ready=False`: the Secret of `spec.pullSecretRef` could not be read.
    pub const PULL_SECRET_UNREADABLE: &str = "PullSecretUnreadable";
    /// `Ready=False`: the Secret of `spec.pullSecretRef` does not exist.
    pub const PULL_SECRET_NOT_FOUND: &str = "PullSecretNotFound";
    /// `Ready=False`: the Secret of `spec.pullSecretRef` is not a usable Docker config.
    pub const PULL_SECRET_INVALID: &str = "PullSecretInvalid";
    /// `Ready=False`: `spec.source` could not be read.
    pub const SOURCE_FAILED: &str = "SourceFailed";
    /// `Ready=False`: copying `spec.source` failed (nothing was tagged; retried).
    pub const CLONE_FAILED: &str = "CloneFailed";
    /// `Ready=False`: the registry did not resolve the reference.
    pub const RESOLVE_FAILED: &str = "ResolveFailed";
    /// Event: a squash waits for a shell, copy or save on the image.
    pub const SQUASH_WAITING: &str = "SquashWaiting";
    /// Event: the image was squashed and its tag moved.
    pub const SQUASHED: &str = "Squashed";
    /// Event: the squash failed; the tag did not move.
    pub const SQUASH_FAILED: &str = "SquashFailed";
    /// A reference outside what the Image's namespace may read or write in the lab registry (its own
    /// path; the catalog's for reading): refused at admission and by the operator.
    pub const REGISTRY_PATH_FORBIDDEN: &str = "RegistryPathForbidden";
}

/// The desired state of an Image: where it comes from and where the lab keeps it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "walt.dev",
    version = "v1alpha1",
    kind = "Image",
    plural = "images",
    namespaced,
    status = "ImageStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "wimg",
    category = "walt",
    doc = "An OS image of the lab: what nodes boot and image shells open. The object name is the image \
           name (tag `v2` of `rpi-debian` is the Image `rpi-debian.v2`).",
    printcolumn = r#"{"name": "Reference", "type": "string", "jsonPath": ".status.reference", "description": "Where the lab keeps the image"}"#,
    printcolumn = r#"{"name": "Digest", "type": "string", "jsonPath": ".status.shortDigest", "description": "Manifest digest (short)"}"#,
    printcolumn = r#"{"name": "Arch", "type": "string", "jsonPath": ".status.platform.architecture", "description": "CPU architecture"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status", "description": "The image is in the lab registry and usable"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Upstream image to clone from (an OCI reference such as
    /// `docker.io/waltplatform/rpi-default:latest`). The operator copies it to
    /// `reference` once. Unset for images made here (shell or node save results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub source: Option<String>,
    /// Where the lab keeps this image (an OCI reference, tag or digest). Defaults to
    /// `<lab registry>/<namespace>/<name>:<tag>` (tag `latest` unless the object name
    /// carries one, as in `rpi-debian.v2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub reference: Option<String>,
    /// Which image of a multi-architecture index to take (e.g. `arm64` for
    /// Raspberry Pis). Unset: the index must hold one image, or the operator's
    /// own platform is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Secret (type `kubernetes.io/dockerconfigjson`) with credentials for the
    /// `source` registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secret_ref: Option<SecretReference>,
}

/// An OCI platform: operating system, CPU architecture and variant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    /// Operating system, as OCI writes it.
    #[serde(default = "default_os")]
    #[schemars(length(max = 32))]
    pub os: String,
    /// CPU architecture as OCI writes it: `amd64`, `arm64`, `arm`, `386`, `riscv64`, …
    #[schemars(length(min = 1, max = 32))]
    pub architecture: String,
    /// Architecture variant (`v7` for 32-bit Raspberry Pis, `v8` for arm64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub variant: Option<String>,
}

fn default_os() -> String {
    "linux".to_owned()
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: default_os(),
            architecture: "amd64".to_owned(),
            variant: None,
        }
    }
}

/// How an image shell starts in this image (WalT's rule).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImageShellMode {
    /// The image has executable `/bin/walt-image-shell-start` and
    /// `/bin/walt-image-shell-shutdown`: init runs as PID 1, the shell inside it.
    Init,
    /// The shell process alone.
    Basic,
}

/// How far a clone of `spec.source` is: blobs (layers, then the config) are copied one after the other.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloneProgress {
    /// The source manifest digest being copied (the clone keeps it: same digest in the lab registry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    /// Bytes of the blobs already in the lab registry.
    #[serde(default)]
    pub copied_bytes: u64,
    /// Bytes of all blobs to copy.
    #[serde(default)]
    pub total_bytes: u64,
    /// Blobs already copied.
    #[serde(default)]
    pub copied_blobs: u32,
    /// Blobs to copy (layers and the config).
    #[serde(default)]
    pub total_blobs: u32,
}

/// The observed state of an Image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the image is (resolved `spec.reference`, or its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Manifest digest (`sha256:…`) of the image at `reference`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The first 12 hex digits of `digest`, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_digest: Option<String>,
    /// The platform of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Node models the image boots (its `walt.node.models` label).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub node_models: Vec<String>,
    /// How an image shell starts in this image: `Init` or `Basic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell_mode: Option<ImageShellMode>,
    /// Number of layers (an image shell is refused at 128 or more: squash first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<u32>,
    /// Size in bytes of the compressed layers and config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// How far cloning `spec.source` into `reference` is (set while it copies, and when it stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneProgress>,
    /// Standard conditions; `Ready` says the image is in the lab registry and usable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}
