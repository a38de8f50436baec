//! Pieces of the pods the operator runs (shell pods, virtual node pods) that more than one kind
//! builds or reads.

use k8s_openapi::api::core::v1::{
    Affinity, HostPathVolumeSource, NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm,
    PreferredSchedulingTerm, Volume, VolumeMount,
};

/// The well-known label of a cluster node's CPU (Go's GOARCH names, the same as OCI platforms use).
pub const ARCH_LABEL: &str = "kubernetes.io/arch";

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

/// Scheduling that prefers cluster nodes whose CPU is `architecture` (an image's OCI platform
/// architecture): the image then runs natively where such a node exists, and through qemu-user
/// wherever else the scheduler puts it (a preference, never a requirement: a lab of amd64 nodes
/// still opens arm64 shells). `None` when the architecture is unknown.
pub fn prefer_architecture(architecture: Option<&str>) -> Option<Affinity> {
    let architecture = architecture.filter(|a| !a.is_empty())?;
    Some(Affinity {
        node_affinity: Some(NodeAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![PreferredSchedulingTerm {
                weight: 100,
                preference: NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: ARCH_LABEL.into(),
                        operator: "In".into(),
                        values: Some(vec![architecture.to_owned()]),
                    }]),
                    ..NodeSelectorTerm::default()
                },
            }]),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_prefer_nodes_of_the_images_cpu_and_never_require_them() {
        let affinity = prefer_architecture(Some("arm64")).expect("an affinity");
        let node = affinity.node_affinity.expect("node affinity");
        assert!(
            node.required_during_scheduling_ignored_during_execution.is_none(),
            "a preference only: emulation is the fallback"
        );
        let terms = node
            .preferred_during_scheduling_ignored_during_execution
            .expect("preferred terms");
        assert_eq!(terms.len(), 1);
        let wanted = &terms[0]
            .preference
            .match_expressions
            .as_ref()
            .expect("expressions")[0];
        assert_eq!(
            (
                wanted.key.as_str(),
                wanted.operator.as_str(),
                wanted.values.as_deref()
            ),
            ("kubernetes.io/arch", "In", Some(&["arm64".to_owned()][..]))
        );
        assert_eq!(prefer_architecture(None), None);
        assert_eq!(prefer_architecture(Some("")), None);
    }
}
