//! Pieces of the pods the operator runs (shell pods, virtual node pods) that more than one kind
//! builds or reads.

use k8s_openapi::api::core::v1::{HostPathVolumeSource, Volume, VolumeMount};

/// Name of a virtual node's pod and Service.
pub fn vnode_object_name(node: &str) -> String {
    format!("walt-node-{node}")
}

/// The cluster node's binfmt_misc table (read-only): a container's `/proc/sys/fs` does not show it, and
/// the shell runtime checks there that the qemu handler of a foreign image is registered (the handlers
/// themselves are kernel-wide, so emulation works without this view; the check needs it).
pub fn binfmt_volume() -> Volume {
    Volume {
        name: "binfmt".into(),
        host_path: Some(HostPathVolumeSource {
            path: "/proc/sys/fs/binfmt_misc".into(),
            type_: Some("Directory".into()),
        }),
        ..Volume::default()
    }
}

/// Where [`binfmt_volume`] is mounted ([`crate::runtime::emulation::POD_BINFMT_DIR`]).
pub fn binfmt_mount() -> VolumeMount {
    VolumeMount {
        name: "binfmt".into(),
        mount_path: crate::runtime::emulation::POD_BINFMT_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}
