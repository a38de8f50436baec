//! `Node`: a lab device (physical, reached over SSH) or a virtual node (a pod).

use k8s_openapi::apimachinery::pkg::{
    api::resource::Quantity,
    apis::meta::v1::{Condition, Time},
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::ImageDigestRef;

/// Annotation a user (`kubectl walt node reboot`) sets on a Node to ask for a reboot (see [`crate::request::REBOOT`]).
pub const REBOOT_REQUESTED_ANNOTATION: &str = crate::request::REBOOT.requested;
/// Annotation the operator sets to the reboot request it has handled (see [`crate::request::REBOOT`]).
pub const REBOOT_HANDLED_ANNOTATION: &str = crate::request::REBOOT.handled;

/// Whether a Node is a VM node (`spec.virtual.kind: vm`).
pub fn is_vm(node: &Node) -> bool {
    node.spec
        .virtual_node
        .as_ref()
        .is_some_and(|virtual_node| virtual_node.kind == VirtualKind::Vm)
}

/// Whether a Node is a container node (`spec.virtual` of kind `container`): reached at its own pod.
/// Physical and VM nodes are reached at their Device.
pub fn is_container_node(node: &Node) -> bool {
    node.spec
        .virtual_node
        .as_ref()
        .is_some_and(|virtual_node| virtual_node.kind == VirtualKind::Container)
}

/// Whether a reboot was asked for and the operator has not handled it yet.
pub fn reboot_pending(node: &Node) -> bool {
    crate::request::REBOOT.pending(&node.metadata).is_some()
}

/// The SSH port of a node when none is given.
pub const DEFAULT_SSH_PORT: i32 = 22;
/// The overlay upper dir of a WalT node (tmpfs holding the node's changes).
pub const DEFAULT_UPPER_DIR: &str = "/run/walt/rootfs/mnt/fs_rw";
/// The file a WalT node writes once it has booted.
pub const DEFAULT_READY_MARKER: &str = "/run/uptime-ready";

/// The desired state of a Node: what device it is, how the operator reaches it, what it boots.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "walt.dev",
    version = "v1alpha1",
    kind = "Node",
    plural = "nodes",
    namespaced,
    status = "NodeStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "wnode",
    shortname = "wn",
    category = "walt",
    doc = "A lab node: a physical Device of the lab lent to this namespace (spec.device), reached over SSH, \
           or a virtual node run as a pod (spec.virtual). It boots spec.image.",
    printcolumn = r#"{"name": "Model", "type": "string", "jsonPath": ".spec.model", "description": "Node model"}"#,
    printcolumn = r#"{"name": "Device", "type": "string", "jsonPath": ".spec.device", "description": "The lab Device this node is (empty: a virtual node)"}"#,
    printcolumn = r#"{"name": "Image", "type": "string", "jsonPath": ".spec.image", "description": "Image the node boots (empty: the model's default)"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Pending, Booting, Ready, Unreachable or Rebooting"}"#,
    printcolumn = r#"{"name": "Address", "type": "string", "jsonPath": ".status.address", "description": "Where the operator reaches the node"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.device) && has(self.virtual)) || (has(self.virtual.kind) && self.virtual.kind == 'vm')",
        "message": "a Node is either physical (spec.device) or virtual (spec.virtual), not both; only a VM node (spec.virtual.kind: vm) names the Device it runs as"
    },
    {
        "rule": "!has(self.virtual) || !has(self.virtual.kind) || self.virtual.kind != 'vm' || has(self.device)",
        "message": "a VM node (spec.virtual.kind: vm) runs as a Device of the lab: spec.device names a Device lent to your namespace with a locally administered MAC and firmware ipxe (its MAC, address and boot network are the VM's); `kubectl walt device ls`, then `kubectl walt node acquire DEVICE --vm`"
    },
    {
        "rule": "has(self.device) || has(self.virtual)",
        "message": "a Node needs spec.device (a Device lent to your namespace: `kubectl walt device ls`, then `kubectl walt node acquire DEVICE`) or spec.virtual (a virtual node run as a pod); a Node has no spec.address: lab admins register devices"
    },
    {
        "rule": "has(oldSelf.device) == has(self.device) && (!has(self.device) || self.device == oldSelf.device)",
        "message": "spec.device cannot change: release the node (`kubectl walt node release NODE`) and acquire the other device"
    },
]))]
pub struct NodeSpec {
    /// Node model (WalT's name for the kind of device: `rpi-3-b`, `rpi-4-b`,
    /// `pc-x86-64`, …). Images list the models they boot (label `walt.node.models`).
    #[schemars(length(min = 1, max = 63))]
    pub model: String,
    /// Image the node boots: an image name (`name[:tag]`) of an Image in the same
    /// namespace. Unset: the default image of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::image_name")]
    pub image: Option<String>,
    /// The Device this physical node is (its name: `kubectl walt device ls`). The Device must be
    /// lent to this namespace and bound to no other Node; the operator binds it to this Node
    /// (`Device.status.boundTo`) and reaches it only then. Set at creation, never changed
    /// (`kubectl walt node acquire DEVICE`; `kubectl walt node release NODE` deletes the Node and
    /// frees the device). A Node has no address of its own: tenants never say where a device is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::object_name")]
    pub device: Option<String>,
    /// `volatile`: the node's changes live in RAM and vanish at reboot (WalT's
    /// default); `persistent`: the node keeps them across reboots.
    #[serde(default)]
    pub boot_mode: BootMode,
    /// Run this node as a virtual node (a pod that boots the image like a device).
    #[serde(default, rename = "virtual", skip_serializing_if = "Option::is_none")]
    pub virtual_node: Option<VirtualNode>,
    /// Where the node keeps its changes (WalT's paths unless the image differs).
    #[serde(default)]
    pub overlay: NodeOverlay,
}

/// Whether a node keeps its changes across reboots.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// Changes live in RAM (tmpfs upper dir) and vanish at reboot.
    #[default]
    Volatile,
    /// Changes are kept across reboots.
    Persistent,
}

/// CPU architecture of a virtual node (OCI names).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// x86-64.
    #[default]
    Amd64,
    /// 64-bit ARM (Raspberry Pi 3/4/5 in 64-bit mode).
    Arm64,
    /// 32-bit ARM (older Raspberry Pis).
    Arm,
    /// 32-bit x86.
    #[serde(rename = "386")]
    I386,
    /// 64-bit RISC-V.
    Riscv64,
}

impl Architecture {
    /// The OCI name (`amd64`, `arm64`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
            Self::Arm => "arm",
            Self::I386 => "386",
            Self::Riscv64 => "riscv64",
        }
    }
}

/// What runs a virtual node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VirtualKind {
    /// A container: the image's files in an overlay with a RAM upper dir, its init and SSH, in a
    /// pod (through qemu-user when the architecture differs). No kernel of the image's own.
    #[default]
    Container,
    /// A virtual machine (`qemu-system-x86_64` for amd64, `qemu-system-aarch64` with U-Boot for
    /// arm64; KVM when usable, else TCG) in a pod on the lab network, that network-boots the image
    /// through the boot service exactly like a device
    /// (its kernel, NFS root, `walt-init`): the Device `spec.device` names gives it its MAC,
    /// address and boot network. Its serial console is the pod's log (`kubectl walt node
    /// console`); a reboot powers it off and on again.
    Vm,
}

/// A virtual node: a pod that runs the image like a device, as a container (overlay with a RAM
/// upper dir, init, SSH, through qemu-user when the architecture differs) or as a VM that
/// network-boots it (`kind: vm`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNode {
    /// What runs the node: `container` (the default: the image's files in a pod, with its init and
    /// SSH, no kernel of its own) or `vm` (a virtual machine, qemu-system, that network-boots
    /// the image through the boot service as the Device `spec.device` names: its MAC, address and
    /// boot network; `kubectl walt help show virtual-nodes`).
    #[serde(default)]
    pub kind: VirtualKind,
    /// CPU architecture of the node (emulated when it differs from the cluster node's). VM nodes:
    /// the Device's (amd64 for a VM slot with firmware `ipxe`, arm64 for one with `u-boot`).
    #[serde(default)]
    pub architecture: Architecture,
    /// Memory of the node (the pod's memory limit; the RAM overlay counts in it). VM nodes: the
    /// VM's memory (qemu `-m`, requested by the pod).
    #[serde(default = "default_memory")]
    #[schemars(schema_with = "crate::schema::quantity")]
    pub memory: Quantity,
    /// CPUs of the node (the pod's CPU limit). VM nodes: the VM's CPUs, rounded up (qemu `-smp`).
    #[serde(default = "default_cpu")]
    #[schemars(schema_with = "crate::schema::quantity")]
    pub cpu: Quantity,
}

fn default_memory() -> Quantity {
    Quantity("512Mi".to_owned())
}

fn default_cpu() -> Quantity {
    Quantity("1".to_owned())
}

impl Default for VirtualNode {
    fn default() -> Self {
        Self {
            kind: VirtualKind::default(),
            architecture: Architecture::default(),
            memory: default_memory(),
            cpu: default_cpu(),
        }
    }
}

/// Where a node keeps its changes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeOverlay {
    /// Writable upper dir of the node's overlay root (what a node save reads).
    #[serde(default = "default_upper_dir")]
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub upper_dir: String,
    /// File the node writes once booted.
    #[serde(default = "default_ready_marker")]
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub ready_marker: String,
}

fn default_upper_dir() -> String {
    DEFAULT_UPPER_DIR.to_owned()
}

fn default_ready_marker() -> String {
    DEFAULT_READY_MARKER.to_owned()
}

impl Default for NodeOverlay {
    fn default() -> Self {
        Self {
            upper_dir: default_upper_dir(),
            ready_marker: default_ready_marker(),
        }
    }
}

/// Lifecycle of a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NodePhase {
    /// Not contacted yet.
    #[default]
    Pending,
    /// Reachable, not booted yet (no ready marker).
    Booting,
    /// Booted and reachable.
    Ready,
    /// The operator cannot reach it.
    Unreachable,
    /// A reboot was requested (new image).
    Rebooting,
}

/// The observed state of a Node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Booting, Ready, Unreachable or Rebooting.
    #[serde(default)]
    pub phase: NodePhase,
    /// The Device this node is bound to (set by the operator once `Device.status.boundTo` names this
    /// Node; cleared when the device is not lent to the namespace or taken by another Node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Where the operator reaches the node (its Device's address, or the virtual node's pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Virtual nodes: the namespace of the node's pod, Service and `/persist` claim, the tenant's
    /// walt runtime namespace (`walt-run-<namespace>`, see [`crate::runtime_namespace`]), which the
    /// operator owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    /// Virtual nodes (`kind: container`): the cluster node the node's pod runs on, once scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_node: Option<String>,
    /// Virtual nodes (`kind: container`): whether the node runs through qemu-user emulation, its
    /// `virtual.architecture` differing from the CPU of `clusterNode` (its `nodeInfo.architecture`);
    /// `false`: natively. Its pod prefers cluster nodes of the node's CPU; emulation is the fallback.
    /// Unset while unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulated: Option<bool>,
    /// The image the node booted, and its digest then. For a Device walt network-boots, set only
    /// once verified (condition `ImageVerified`): the digest the boot service mounted is the one the
    /// booted node reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_image: Option<ImageDigestRef>,
    /// What walt's boot service saw of the node's latest network boot (Devices it network-boots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<NodeBoot>,
    /// The node's SSH host key (pinned or first seen), enforced on every connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// When the operator last reached the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// Standard conditions: `Reachable`, `Booted`, `ImageVerified` (network-booted Devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// What walt's boot service saw of a node's latest network boot, and the boot watchdog's count.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeBoot {
    /// The digest whose root the boot service mounted for the node (its latest boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub served: Option<String>,
    /// The digest the booted node reported (its boot notification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub reported: Option<String>,
    /// When the boot the watchdog waits for started (the reboot sent, or the root mounted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// Retries of that boot so far (the watchdog gives up after 9, WalT's default).
    #[serde(default)]
    pub retries: u32,
}
