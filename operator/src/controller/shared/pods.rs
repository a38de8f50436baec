//! Pieces of the pods the operator runs (shell pods, virtual node pods) that more than one kind
//! builds or reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EmptyDirVolumeSource, EnvVar, HostPathVolumeSource, NodeAffinity,
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, PreferredSchedulingTerm,
    SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::ObjectMeta;

use crate::controller::config::LayerCache;
use crate::controller::shared::registry::{registry_credentials_mount, registry_credentials_volume};

/// The well-known label of a cluster node's CPU (Go's GOARCH names, the same as OCI platforms use).
pub const ARCH_LABEL: &str = "kubernetes.io/arch";

/// Where the layer cache is mounted in walt's runtime pods (shells, builds).
pub const CACHE_DIR: &str = "/var/cache/walt";

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

/// A pod running walt's runtime (`walt-operator shell`, `walt-operator build`): what differs per kind.
/// Everything else (isolation, layer cache, binfmt view, registry credentials) is [`runtime_pod`]'s,
/// the same for every kind.
#[derive(Clone, Debug)]
pub struct RuntimePod<'a> {
    /// The pod's name.
    pub name: String,
    /// Its namespace (the owner's).
    pub namespace: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The object it belongs to (garbage-collected with it).
    pub owner: Option<OwnerReference>,
    /// The container's name.
    pub container: &'a str,
    /// `walt-operator` arguments.
    pub args: Vec<String>,
    /// A terminal (image shells) rather than plain standard streams (builds read a tar on stdin).
    pub tty: bool,
    /// Image of the pod (the walt-operator image).
    pub runtime_image: &'a str,
    /// Run in a user namespace (`hostUsers: false`) instead of privileged.
    pub user_namespaces: bool,
    /// Where the layer cache lives.
    pub cache: &'a LayerCache,
    /// Whether the namespace has the registry credentials Secret to mount.
    pub registry_credentials: bool,
    /// Scheduling preferences ([`prefer_architecture`]: the image's CPU first).
    pub affinity: Option<Affinity>,
}

// Long by design: one Pod literal, read top to bottom as the pod is; splitting it would scatter
// one object over helpers that each build a fragment.
/// Builds a runtime pod (pure): user-namespaced with only the capabilities overlays and namespaces
/// need where the cluster supports it, else privileged; never restarted; no service account token;
/// standard input open once for the client that attaches; the result in the termination message.
pub fn runtime_pod(shape: &RuntimePod<'_>) -> Pod {
    let cache_volume = match shape.cache {
        LayerCache::HostPath(path) => Volume {
            name: "cache".into(),
            host_path: Some(HostPathVolumeSource {
                path: path.clone(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Volume::default()
        },
        LayerCache::EmptyDir => Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    };
    let mut volumes = vec![cache_volume, binfmt_volume()];
    let mut mounts = vec![
        VolumeMount {
            name: "cache".into(),
            mount_path: CACHE_DIR.into(),
            ..VolumeMount::default()
        },
        binfmt_mount(),
    ];
    let mut env = Vec::new();
    if shape.registry_credentials {
        volumes.push(registry_credentials_volume());
        mounts.push(registry_credentials_mount());
        env.push(EnvVar {
            name: "DOCKER_CONFIG".into(),
            value: Some("/etc/walt/registry".into()),
            ..Default::default()
        });
    }
    // Mounting overlays and making namespaces needs CAP_SYS_ADMIN: inside a
    // user namespace it only covers the pod's own namespaces.
    let security_context = if shape.user_namespaces {
        SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(
                    ["SYS_ADMIN", "SYS_CHROOT", "SETUID", "SETGID", "MKNOD", "SETFCAP"]
                        .map(str::to_owned)
                        .to_vec(),
                ),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "Unconfined".into(),
                ..SeccompProfile::default()
            }),
            allow_privilege_escalation: Some(true),
            ..SecurityContext::default()
        }
    } else {
        SecurityContext {
            privileged: Some(true),
            ..SecurityContext::default()
        }
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(shape.name.clone()),
            namespace: shape.namespace.clone(),
            labels: Some(shape.labels.clone()),
            owner_references: shape.owner.clone().map(|owner| vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            affinity: shape.affinity.clone(),
            host_users: shape.user_namespaces.then_some(false),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            containers: vec![Container {
                name: shape.container.to_owned(),
                image: Some(shape.runtime_image.to_owned()),
                args: Some(shape.args.clone()),
                env: (!env.is_empty()).then_some(env),
                stdin: Some(true),
                stdin_once: Some(true),
                tty: Some(shape.tty),
                termination_message_path: Some("/dev/termination-log".into()),
                termination_message_policy: Some("File".into()),
                security_context: Some(security_context),
                volume_mounts: Some(mounts),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// Whether the cluster's container runtimes run user-namespaced pods (pure): every Node reports a runtime
/// handler with `features.userNamespaces: true` (kubelet 1.32+ publishes what the runtime says; containerd
/// 1.x says nothing and cannot, so `hostUsers: false` pods would never start there).
pub fn runtimes_support_user_namespaces(nodes: &[k8s_openapi::api::core::v1::Node]) -> bool {
    !nodes.is_empty()
        && nodes.iter().all(|node| {
            node.status
                .as_ref()
                .and_then(|status| status.runtime_handlers.as_ref())
                .is_some_and(|handlers| {
                    handlers.iter().any(|handler| {
                        handler
                            .features
                            .as_ref()
                            .and_then(|features| features.user_namespaces)
                            .unwrap_or(false)
                    })
                })
        })
}

/// Whether runtime pods (shells, builds) run user-namespaced here. `Auto`: when the API server (1.33+) and every cluster
/// node's container runtime support it; otherwise privileged, which every runtime runs.
pub async fn user_namespaces(context: &crate::controller::shared::context::Context) -> bool {
    use crate::controller::config::UserNamespaces;
    match context.config.args.user_namespaces {
        UserNamespaces::Always => true,
        UserNamespaces::Never => false,
        UserNamespaces::Auto => {
            let api_supports = context.client.apiserver_version().await.is_ok_and(|info| {
                info.major == "1"
                    && info
                        .minor
                        .trim_end_matches('+')
                        .parse::<u32>()
                        .is_ok_and(|minor| minor >= 33)
            });
            if !api_supports {
                return false;
            }
            let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(context.client.clone());
            match nodes.list(&kube::api::ListParams::default()).await {
                Ok(list) => runtimes_support_user_namespaces(&list.items),
                Err(error) => {
                    tracing::info!(%error, "cannot list cluster nodes to see whether their runtime supports user namespaces; runtime pods run privileged");
                    false
                }
            }
        }
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

/// A cluster node's CPU, GOARCH names like OCI platforms: `status.nodeInfo.architecture`, which its
/// kubelet writes from its own CPU (and copies to the `kubernetes.io/arch` label the pods' scheduling
/// preference, [`prefer_architecture`], matches, at every status update).
pub fn node_architecture(node: &k8s_openapi::api::core::v1::Node) -> Option<&str> {
    node.status
        .as_ref()
        .and_then(|status| status.node_info.as_ref())
        .map(|info| info.architecture.as_str())
        .filter(|architecture| !architecture.is_empty())
}

/// Whether an image of CPU `architecture` runs through qemu-user on `cluster_node` (pure): the two
/// differ. `None` when either is unknown (not scheduled yet, an unreadable node, an image without a
/// platform). What walt tells users (shells, builds, virtual nodes) is this comparison, with the CPU
/// the cluster node's kubelet reports, the same the pods' scheduling preference matches.
pub fn emulated_on(
    architecture: Option<&str>,
    cluster_node: Option<&k8s_openapi::api::core::v1::Node>,
) -> Option<bool> {
    let architecture = architecture.filter(|a| !a.is_empty())?;
    cluster_node
        .and_then(node_architecture)
        .map(|node| node != architecture)
}

/// Where a pod runs, as walt says it (pure): ` on cluster node NAME (CPU)`, empty when not known.
pub fn on_cluster_node(cluster_node: Option<&k8s_openapi::api::core::v1::Node>) -> String {
    use kube::ResourceExt;
    cluster_node
        .map(|node| match node_architecture(node) {
            Some(architecture) => format!(" on cluster node {} ({architecture})", node.name_any()),
            None => format!(" on cluster node {}", node.name_any()),
        })
        .unwrap_or_default()
}

/// The cluster node `pod` was scheduled on, for its architecture (`None` when not scheduled yet, or
/// unreadable: the pod still runs, the user is just not told whether it is emulated).
pub async fn scheduled_on(
    context: &crate::controller::shared::context::Context,
    pod: Option<&Pod>,
) -> Option<k8s_openapi::api::core::v1::Node> {
    let node_name = pod?.spec.as_ref()?.node_name.clone()?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(context.client.clone());
    match nodes.get_opt(&node_name).await {
        Ok(node) => node,
        Err(error) => {
            tracing::info!(%error, node = %node_name, "cannot read the cluster node of a pod: its architecture is unknown");
            None
        }
    }
}

/// Requires the cluster node named `node` (its `metadata.name`, not a label a node could change): a
/// pod whose work is in that node's walt cache (a shell made again after its pod was lost).
pub fn pinned_to(node: &str) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_fields: Some(vec![NodeSelectorRequirement {
                        key: "metadata.name".into(),
                        operator: "In".into(),
                        values: Some(vec![node.to_owned()]),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// A cluster node named `name` whose kubelet reports CPU `architecture` (unit tests' input).
#[cfg(test)]
pub fn cluster_node_of(name: &str, architecture: &str) -> k8s_openapi::api::core::v1::Node {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "status": {"nodeInfo": {
            "architecture": architecture, "bootID": "", "containerRuntimeVersion": "",
            "kernelVersion": "", "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "",
            "operatingSystem": "linux", "osImage": "", "systemUUID": ""
        }}
    }))
    .expect("node JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulated_means_the_image_and_the_cluster_node_differ_in_cpu() {
        let arm = cluster_node_of("pi-1", "arm64");
        assert_eq!(emulated_on(Some("arm64"), Some(&arm)), Some(false));
        assert_eq!(emulated_on(Some("amd64"), Some(&arm)), Some(true));
        // Unknown either side (not scheduled, an image without a platform): no claim either way.
        assert_eq!(emulated_on(Some("arm64"), None), None);
        assert_eq!(emulated_on(None, Some(&arm)), None);
        assert_eq!(emulated_on(Some(""), Some(&arm)), None);
        assert_eq!(emulated_on(Some("arm64"), Some(&cluster_node_of("n", ""))), None);
    }

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
