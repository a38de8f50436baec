//! `NodeSave`: save the files changed on a running node as a new image.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Changes, ImageDigestRef};

/// Paths (regular expressions) a node save skips by default: boot-time noise (WalT's list).
pub const DEFAULT_EXCLUDES: [&str; 6] = [
    "/log/",
    "\\.lock$",
    "machine-id",
    "walt-env",
    "_walt_internal_",
    "README\\.nonlocal",
];

/// Most exclude patterns one NodeSave takes.
pub const EXCLUDE_MAX_ITEMS: usize = 64;

/// Which node's changes to save, and as which image. Cannot change once created.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "walt.dev",
    version = "v1alpha1",
    kind = "NodeSave",
    plural = "nodesaves",
    namespaced,
    status = "NodeSaveStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "wsave",
    category = "walt",
    doc = "Save the files changed on a running node (its overlay upper dir) as a new image on top of the \
           image it booted. The spec cannot change once created.",
    printcolumn = r#"{"name": "Node", "type": "string", "jsonPath": ".spec.node", "description": "Node whose changes are saved"}"#,
    printcolumn = r#"{"name": "Image", "type": "string", "jsonPath": ".spec.image", "description": "Image the changes are saved as"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Pending, Running, Pushing, Succeeded or Failed"}"#,
    printcolumn = r#"{"name": "Layer Size", "type": "integer", "jsonPath": ".status.result.layerSize", "description": "Compressed size of the new layer (bytes)"}"#,
    printcolumn = r#"{"name": "Duration", "type": "string", "jsonPath": ".status.duration", "description": "How long the save took"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self == oldSelf",
        "message": "the spec of a NodeSave cannot change; create a new NodeSave"
    },
]))]
pub struct NodeSaveSpec {
    /// Node (a Node in the same namespace) whose changes are saved. It must be running.
    #[schemars(schema_with = "crate::schema::object_name")]
    pub node: String,
    /// Image name (`name[:tag]`) the changes are saved as: a new name, or an
    /// existing image with `overwrite: true`.
    #[schemars(schema_with = "crate::schema::image_name")]
    pub image: String,
    /// Replace `image` if it exists (otherwise the save fails rather than overwrite it).
    #[serde(default)]
    pub overwrite: bool,
    /// After overwriting `image`, reboot the nodes that boot it so they run the
    /// new content (WalT does this too).
    #[serde(default = "default_reboot_nodes")]
    pub reboot_nodes: bool,
    /// Paths not saved: regular expressions matched against each absolute path.
    /// Setting this replaces the default list (boot-time noise).
    #[serde(default = "default_excludes")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub exclude: Vec<String>,
    /// Compression of the new layer: `gzip` (readable by every runtime) or `zstd`.
    #[serde(default)]
    pub compression: Compression,
}

fn default_reboot_nodes() -> bool {
    true
}

fn default_excludes() -> Vec<String> {
    DEFAULT_EXCLUDES
        .iter()
        .map(|&pattern| pattern.to_owned())
        .collect()
}

/// Compression of a layer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`).
    #[default]
    Gzip,
    /// zstd (`application/vnd.oci.image.layer.v1.tar+zstd`).
    Zstd,
}

/// Lifecycle of a node save.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NodeSavePhase {
    /// Accepted, not started.
    #[default]
    Pending,
    /// Streaming the node's changes into a layer.
    Running,
    /// Pushing the config and manifest, tagging, updating the Image.
    Pushing,
    /// The image is saved (see `result`).
    Succeeded,
    /// The save failed (see the conditions); nothing was tagged.
    Failed,
}

impl NodeSavePhase {
    /// Whether the save is over.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// The image a node save produced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSaveResult {
    /// Where the new image is (OCI reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Manifest digest of the new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Digest of the new (compressed) layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_digest: Option<String>,
    /// Size in bytes of the new (compressed) layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_size: Option<u64>,
}

/// How far a running save is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Bytes read from the node so far.
    #[serde(default)]
    pub bytes: u64,
    /// Entries (files, directories, links, whiteouts) read so far.
    #[serde(default)]
    pub files: u64,
}

/// The observed state of a NodeSave.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSaveStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Pushing, Succeeded or Failed.
    #[serde(default)]
    pub phase: NodeSavePhase,
    /// The image the node booted (the new image's base), with its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<ImageDigestRef>,
    /// The new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<NodeSaveResult>,
    /// What changed on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Changes>,
    /// How far a running save is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// When the save started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the save ended (succeeded or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// How long the save took (`completionTime - startTime`, e.g. `1m12s`), for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Standard conditions (`Complete`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}
