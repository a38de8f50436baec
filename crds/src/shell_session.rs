//! `ShellSession`: a root shell inside an image, or an SSH shell on a node.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{common::Changes, image::ImageShellMode};

/// Idle time after which a session ends when none is given.
pub const DEFAULT_IDLE_TIMEOUT: &str = "1h";
/// Longest life of a session when none is given.
pub const DEFAULT_TTL: &str = "12h";

/// Which shell to open (image or node), and what happens to an image shell's changes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "walt.dev",
    version = "v1alpha1",
    kind = "ShellSession",
    plural = "shellsessions",
    namespaced,
    status = "ShellSessionStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "wsh",
    category = "walt",
    doc = "A shell: a root shell inside an image (spec.image; its changes become an image on exit) or an \
           SSH shell on a node (spec.node, through the operator's gateway).",
    printcolumn = r#"{"name": "Image", "type": "string", "jsonPath": ".spec.image", "description": "Target image (image shell)"}"#,
    printcolumn = r#"{"name": "Node", "type": "string", "jsonPath": ".spec.node", "description": "Target node (node shell)"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase"}"#,
    printcolumn = r#"{"name": "Pod", "type": "string", "jsonPath": ".status.pod", "description": "Shell pod"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.image) != has(self.node)",
        "message": "a ShellSession targets exactly one of spec.image (a shell inside an image) or spec.node (a shell on a node)"
    },
    {
        "rule": "!has(self.publicKey) || has(self.node)",
        "message": "spec.publicKey is only for node shells (spec.node); image shells attach to the pod"
    },
    {
        "rule": "!has(self.saveAs) || has(self.image)",
        "message": "spec.saveAs is only for image shells (spec.image); to save a node's changes, create a NodeSave"
    },
    {
        "rule": "!(has(self.discard) && self.discard) || has(self.image)",
        "message": "spec.discard is only for image shells (spec.image)"
    },
    {
        "rule": "!(has(self.saveAs) && has(self.discard) && self.discard)",
        "message": "spec.saveAs and spec.discard exclude each other: save the changes under a name, or discard them"
    },
    {
        "rule": "has(self.image) == has(oldSelf.image) && (!has(self.image) || self.image == oldSelf.image) && has(self.node) == has(oldSelf.node) && (!has(self.node) || self.node == oldSelf.node)",
        "message": "the target of a ShellSession (spec.image or spec.node) cannot change; create a new session"
    },
]))]
pub struct ShellSessionSpec {
    /// Image to open a root shell in (image name `name[:tag]`). Exactly one of
    /// `image` and `node`. Cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::image_name")]
    pub image: Option<String>,
    /// Node (a Node in the same namespace) to open an SSH shell on. Exactly one
    /// of `image` and `node`. Cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::object_name")]
    pub node: Option<String>,
    /// How an image shell starts: `Auto` (init mode when the image has the WalT
    /// start and shutdown scripts, else basic), `Init` or `Basic`.
    #[serde(default)]
    pub mode: ShellMode,
    /// Node shells: the one OpenSSH public key that may log in through the
    /// gateway for this session, while it runs (`kubectl walt` makes one per session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::public_key")]
    pub public_key: Option<String>,
    /// Image shells: the image name the changes are saved as on exit (the same
    /// image to overwrite it). Unset and `discard` false: the session waits for
    /// the decision (phase `AwaitingDecision`) and the user sets one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::image_name")]
    pub save_as: Option<String>,
    /// Image shells: drop the changes on exit.
    #[serde(default)]
    pub discard: bool,
    /// The session ends after this long without input or output (e.g. `30m`).
    #[serde(default = "default_idle_timeout")]
    #[schemars(schema_with = "crate::schema::duration")]
    pub idle_timeout: String,
    /// The session ends this long after it was created, whatever happens (e.g. `8h`).
    #[serde(default = "default_ttl")]
    #[schemars(schema_with = "crate::schema::duration")]
    pub ttl: String,
}

fn default_idle_timeout() -> String {
    DEFAULT_IDLE_TIMEOUT.to_owned()
}

fn default_ttl() -> String {
    DEFAULT_TTL.to_owned()
}

/// How an image shell starts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ShellMode {
    /// Init mode when the image has `/bin/walt-image-shell-start` and
    /// `/bin/walt-image-shell-shutdown`, else basic.
    #[default]
    Auto,
    /// The image's start script runs as PID 1 (it execs init), the shell inside it.
    Init,
    /// The shell process alone.
    Basic,
}

/// Lifecycle of a shell session.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ShellSessionPhase {
    /// Accepted, nothing started yet.
    #[default]
    Pending,
    /// The shell pod or the gateway route is being set up.
    Starting,
    /// The shell is open.
    Running,
    /// Image shell ended: the changes are being turned into a layer and pushed.
    Committing,
    /// Changes are pushed (by digest); waiting for `spec.saveAs` or `spec.discard`.
    AwaitingDecision,
    /// The changes are saved as `status.result.image`.
    Saved,
    /// The changes were dropped (or there were none).
    Discarded,
    /// Something went wrong (see the conditions).
    Failed,
    /// Ended by `idleTimeout` or `ttl`.
    Expired,
}

impl ShellSessionPhase {
    /// Whether the session is over (nothing more will happen).
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Saved | Self::Discarded | Self::Failed | Self::Expired)
    }
}

/// How to reach a node shell through the operator's SSH gateway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    /// Service of the gateway (same namespace as the operator).
    pub service: String,
    /// Port of the gateway service.
    pub port: i32,
    /// SSH user name to log in with (identifies the session).
    pub user: String,
}

/// What an image shell produced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShellResult {
    /// Image name the changes were saved as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Manifest digest (`sha256:…`) of the new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// The observed state of a ShellSession.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShellSessionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Starting, Running, Committing, AwaitingDecision, Saved,
    /// Discarded, Failed or Expired.
    #[serde(default)]
    pub phase: ShellSessionPhase,
    /// The shell pod (image shells).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The namespace of the shell pod: the tenant's walt runtime namespace (`walt-run-<namespace>`,
    /// see [`crate::runtime_namespace`]), which the operator owns; the tenant may attach to its own
    /// sessions there and create nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    /// Which shell the user got in an image shell: `Init` or `Basic` (set once its pod is
    /// scheduled, while still `Starting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ImageShellMode>,
    /// Whether the image shell runs through qemu-user (the image's CPU differs from its cluster
    /// node's; set once its pod is scheduled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulated: Option<bool>,
    /// The cluster node the image shell's pod runs on, set once the pod is scheduled (while
    /// `Starting`: `kubectl walt image shell` then attaches as soon as the shell runs). The changes
    /// live in that node's walt cache: a shell pod that is lost (evicted, deleted, killed) is made
    /// again there, and continues on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_node: Option<String>,
    /// How many times the image shell's pod was lost and made again on the same changes (at most 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_restarts: Option<u32>,
    /// How to reach a node shell through the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Gateway>,
    /// What changed in the image during the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Changes>,
    /// Where the changes went (digest first, then the image name once tagged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ShellResult>,
    /// When the shell started running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the session ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Node shells: when bytes last went through the session's gateway connections, written by the
    /// gateway (the operator's ServiceAccount, field manager `walt-gateway`); the idle timer
    /// (`idleTimeout`) counts from it. Status only the operator may write: tenants cannot move it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<Time>,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}
