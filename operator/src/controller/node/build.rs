//! Node controller.
//!
//! - **Physical** nodes (`spec.device`): once the Device is lent to the Node's
//!   namespace and bound to it (see `shared::node_access::claim`), an SSH probe
//!   with the lab's node key (host key pinned by the Device's `hostKey`, else
//!   recorded in `status.hostKey` on
//!   first contact and enforced from then on) sets `Reachable`, `Booted` (the
//!   ready marker exists), `lastSeen` and `bootedImage`. When `spec.image`
//!   changes, or the Image it boots is overwritten (its digest moves), the node
//!   is rebooted over SSH and reported `Rebooting` until it is back.
//! - **Virtual** nodes (`spec.virtual`): a pod running `walt-operator vnode`,
//!   a Service for its SSH endpoint, and a PersistentVolumeClaim for `/persist`
//!   when `bootMode: persistent`. The pod carries the digest it boots; when the
//!   Image's digest moves (or `spec.image` changes) the pod is recreated.
//!
//! Everything here lives in the tenant's runtime namespace (`walt-run-<namespace>`) and carries
//! the Node's owner labels (kind, namespace, name, uid): deleting a Node removes its pod, Service
//! and claim (the Node's finalizer, and the runtime namespace's sweep for what is left).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource,
    EmptyDirVolumeSource, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, Probe, ResourceRequirements, SecurityContext, Service,
    ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use walt_crds::{BootMode, Node, NodePhase, runtime_namespace};

use crate::controller::shared::context::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::controller::shared::pods::{binfmt_mount, binfmt_volume, prefer_architecture, vnode_object_name};
use crate::controller::shared::registry::{registry_credentials_mount, registry_credentials_volume};
use crate::controller::shared::runtime::owner_labels;

/// Label naming the Node a pod, Service or claim belongs to.
pub const NODE_LABEL: &str = "walt.dev/node";
/// Annotation: the image reference (with digest) a virtual node pod boots.
pub const BOOTS_ANNOTATION: &str = "walt.dev/boots";
/// Annotation: the Image name a virtual node pod boots.
pub const BOOTS_IMAGE_ANNOTATION: &str = "walt.dev/boots-image";
/// Annotation holding the node public key, projected into the pod as its
/// `authorized_keys` file through the downward API (no extra object needed).
pub const AUTHORIZED_KEYS_ANNOTATION: &str = "walt.dev/authorized-keys";
/// Size of a persistent virtual node's `/persist` claim.
pub const PERSIST_SIZE: &str = "1Gi";

/// Where a virtual node pod keeps its SSH host key (in its cache volume).
pub const VNODE_HOST_KEY: &str = "/var/cache/walt/ssh_host_ed25519_key";

/// Name of a persistent virtual node's claim.
pub fn persist_claim_name(node: &str) -> String {
    format!("walt-node-{node}-persist")
}

/// Labels of everything built for `node`.
pub fn node_labels(node: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (NODE_LABEL.to_owned(), node.to_owned()),
    ])
}

/// Metadata of what is built for `node`: in the tenant's runtime namespace, with the owner labels
/// (owner references cannot cross namespaces) and [`node_labels`] (the Service's selector).
pub(super) fn owned_meta(node: &Node, name: String) -> ObjectMeta {
    let mut labels = owner_labels("Node", node);
    labels.extend(node_labels(&node.name_any()));
    ObjectMeta {
        name: Some(name),
        namespace: node.namespace().map(|namespace| runtime_namespace(&namespace)),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

/// What a virtual node pod needs beyond the Node itself.
#[derive(Clone, Debug)]
pub struct VnodeInputs<'a> {
    /// Image of the pod (the walt-operator image).
    pub runtime_image: &'a str,
    /// Image name the node boots (for display).
    pub image_name: &'a str,
    /// Exact reference it boots: `repository@sha256:…`.
    pub boot_reference: &'a str,
    /// The lab's node public key (what the node's SSH server accepts).
    pub node_public_key: &'a str,
    /// Whether a [`REGISTRY_SECRET`] exists in the namespace to mount.
    pub registry_credentials: bool,
    /// Whether the registry speaks plain HTTP (its host is given).
    pub insecure_registry: Option<&'a str>,
}

// Long by design: one Pod literal, read top to bottom as the pod is (args, volumes, security,
// probe); splitting it would scatter one object over helpers that each build a fragment.
/// Builds the pod of a virtual node (pure).
pub fn build_vnode_pod(node: &Node, inputs: &VnodeInputs<'_>) -> Pod {
    let name = node.name_any();
    let mut meta = owned_meta(node, vnode_object_name(&name));
    meta.annotations = Some(BTreeMap::from([
        (BOOTS_ANNOTATION.to_owned(), inputs.boot_reference.to_owned()),
        (BOOTS_IMAGE_ANNOTATION.to_owned(), inputs.image_name.to_owned()),
        (
            AUTHORIZED_KEYS_ANNOTATION.to_owned(),
            format!("{}\n", inputs.node_public_key.trim()),
        ),
    ]));
    let mut args = vec![
        "vnode".to_owned(),
        "--image".to_owned(),
        inputs.boot_reference.to_owned(),
        "--name".to_owned(),
        name.clone(),
        "--authorized-keys".to_owned(),
        "/etc/walt/node/authorized_keys".to_owned(),
        "--listen".to_owned(),
        "0.0.0.0:22".to_owned(),
        // Kept in the cache volume: the same host key across container restarts.
        "--host-key".to_owned(),
        VNODE_HOST_KEY.to_owned(),
    ];
    if let Some(host) = inputs.insecure_registry {
        args.extend(["--insecure-registry".to_owned(), host.to_owned()]);
    }
    let mut volume_mounts = vec![
        VolumeMount {
            name: "authorized-keys".into(),
            mount_path: "/etc/walt/node".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "cache".into(),
            mount_path: "/var/cache/walt".into(),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "authorized-keys".into(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![DownwardAPIVolumeFile {
                    path: "authorized_keys".into(),
                    field_ref: Some(ObjectFieldSelector {
                        field_path: format!("metadata.annotations['{AUTHORIZED_KEYS_ANNOTATION}']"),
                        ..ObjectFieldSelector::default()
                    }),
                    ..DownwardAPIVolumeFile::default()
                }]),
                ..DownwardAPIVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    if node.spec.boot_mode == BootMode::Persistent {
        args.extend(["--persist".to_owned(), "/persist".to_owned()]);
        volume_mounts.push(VolumeMount {
            name: "persist".into(),
            mount_path: "/persist".into(),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "persist".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: persist_claim_name(&name),
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if inputs.registry_credentials {
        volume_mounts.push(registry_credentials_mount());
        volumes.push(registry_credentials_volume());
    }
    volume_mounts.push(binfmt_mount());
    volumes.push(binfmt_volume());
    let resources = node.spec.virtual_node.as_ref().map(|virtual_node| {
        let limits = BTreeMap::from([
            ("memory".to_owned(), virtual_node.memory.clone()),
            ("cpu".to_owned(), virtual_node.cpu.clone()),
        ]);
        ResourceRequirements {
            requests: Some(limits.clone()),
            limits: Some(limits),
            ..ResourceRequirements::default()
        }
    });
    Pod {
        metadata: meta,
        spec: Some(PodSpec {
            hostname: Some(name.chars().take(63).collect()),
            restart_policy: Some("Always".into()),
            affinity: prefer_architecture(
                node.spec
                    .virtual_node
                    .as_ref()
                    .map(|virtual_node| virtual_node.architecture.as_str()),
            ),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            containers: vec![Container {
                name: "node".into(),
                image: Some(inputs.runtime_image.to_owned()),
                args: Some(args),
                env: Some(vec![k8s_openapi::api::core::v1::EnvVar {
                    name: "DOCKER_CONFIG".into(),
                    value: Some("/etc/walt/registry".into()),
                    ..Default::default()
                }]),
                ports: Some(vec![ContainerPort {
                    name: Some("ssh".into()),
                    container_port: 22,
                    ..ContainerPort::default()
                }]),
                // The node runtime mounts overlays and makes namespaces:
                // it needs CAP_SYS_ADMIN and friends (privileged, like a device).
                security_context: Some(SecurityContext {
                    privileged: Some(true),
                    capabilities: Some(Capabilities {
                        add: Some(vec!["SYS_ADMIN".into()]),
                        ..Capabilities::default()
                    }),
                    ..SecurityContext::default()
                }),
                resources,
                volume_mounts: Some(volume_mounts),
                // `walt-operator vnode` listens only once the node is booted
                // (and `/run/uptime-ready` written): an open port means Ready.
                readiness_probe: Some(Probe {
                    tcp_socket: Some(TCPSocketAction {
                        port: IntOrString::Int(22),
                        ..TCPSocketAction::default()
                    }),
                    period_seconds: Some(2),
                    ..Probe::default()
                }),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// Builds the Service in front of a virtual node's SSH server (pure).
pub fn build_vnode_service(node: &Node) -> Service {
    let name = node.name_any();
    Service {
        metadata: owned_meta(node, vnode_object_name(&name)),
        spec: Some(ServiceSpec {
            selector: Some(node_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("ssh".into()),
                port: 22,
                target_port: Some(IntOrString::Int(22)),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Builds the claim holding a persistent virtual node's `/persist` (pure).
pub fn build_persist_claim(node: &Node) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: owned_meta(node, persist_claim_name(&node.name_any())),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(PERSIST_SIZE.to_owned()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// Whether an existing virtual node pod must be recreated to boot `wanted`
/// (the image reference with digest).
pub fn pod_needs_recreate(pod: &Pod, wanted: &str) -> bool {
    pod.annotations().get(BOOTS_ANNOTATION).map(String::as_str) != Some(wanted)
        || pod.metadata.deletion_timestamp.is_some()
}

/// Phase of a virtual node from its pod (pure): Ready when the container
/// runs and is ready, Booting while it starts, Unreachable when it failed.
pub fn vnode_phase(pod: Option<&Pod>) -> NodePhase {
    let Some(pod) = pod else {
        return NodePhase::Pending;
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return NodePhase::Rebooting;
    }
    let status = pod.status.as_ref();
    let phase = status
        .and_then(|status| status.phase.as_deref())
        .unwrap_or("Pending");
    let running = status
        .and_then(|status| status.container_statuses.as_ref())
        .and_then(|statuses| statuses.first())
        .is_some_and(|container| {
            container
                .state
                .as_ref()
                .is_some_and(|state| state.running.is_some())
        });
    match phase {
        "Running" if running => NodePhase::Ready,
        "Failed" | "Unknown" => NodePhase::Unreachable,
        _ => NodePhase::Booting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{NodeSpec, VirtualNode};

    fn virtual_node(name: &str, boot_mode: BootMode) -> Node {
        let mut node = Node::new(
            name,
            NodeSpec {
                model: "pc-x86-64".into(),
                image: Some("debian".into()),
                boot_mode,
                virtual_node: Some(VirtualNode::default()),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some("alice".into());
        node.metadata.uid = Some("uid-1".into());
        node
    }

    fn inputs() -> VnodeInputs<'static> {
        VnodeInputs {
            runtime_image: "reg.lab/walt/operator:1",
            image_name: "debian",
            boot_reference: "reg.lab/alice/debian@sha256:abc",
            node_public_key: "ssh-ed25519 AAAA lab",
            registry_credentials: true,
            insecure_registry: Some("reg.lab"),
        }
    }

    #[test]
    fn volatile_vnode_pod() {
        let node = virtual_node("vn1", BootMode::Volatile);
        let pod = build_vnode_pod(&node, &inputs());
        assert_eq!(pod.name_any(), "walt-node-vn1");
        crate::controller::shared::runtime::assert_placed_for(&pod.metadata, "walt-run-alice", "Node", &node);
        assert_eq!(pod.labels()[NODE_LABEL], "vn1");
        assert_eq!(
            pod.annotations()[BOOTS_ANNOTATION],
            "reg.lab/alice/debian@sha256:abc"
        );
        assert_eq!(
            pod.annotations()[AUTHORIZED_KEYS_ANNOTATION],
            "ssh-ed25519 AAAA lab\n"
        );
        let spec = pod.spec.expect("spec");
        let container = &spec.containers[0];
        let args = container.args.clone().expect("args").join(" ");
        assert_eq!(
            args,
            "vnode --image reg.lab/alice/debian@sha256:abc --name vn1 --authorized-keys \
             /etc/walt/node/authorized_keys --listen 0.0.0.0:22 --host-key \
             /var/cache/walt/ssh_host_ed25519_key --insecure-registry reg.lab"
        );
        let probe = container.readiness_probe.clone().expect("readiness probe");
        assert_eq!(probe.tcp_socket.expect("tcp probe").port, IntOrString::Int(22));
        assert!(!args.contains("--persist"));
        let limits = container
            .resources
            .clone()
            .expect("resources")
            .limits
            .expect("limits");
        assert_eq!(limits["memory"], Quantity("512Mi".into()));
        let volumes: Vec<_> = spec
            .volumes
            .expect("volumes")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(volumes, ["authorized-keys", "cache", "registry", "binfmt"]);
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(
            spec.affinity,
            prefer_architecture(Some("amd64")),
            "a virtual node prefers cluster nodes of its own CPU"
        );
    }

    #[test]
    fn persistent_vnode_gets_a_claim() {
        let node = virtual_node("vn2", BootMode::Persistent);
        let pod = build_vnode_pod(&node, &inputs());
        let pod_labels = pod.labels().clone();
        let spec = pod.spec.expect("spec");
        assert!(
            spec.containers[0]
                .args
                .clone()
                .expect("args")
                .join(" ")
                .contains("--persist /persist")
        );
        let claim_volume = spec
            .volumes
            .expect("volumes")
            .into_iter()
            .find(|volume| volume.name == "persist")
            .expect("persist volume");
        assert_eq!(
            claim_volume.persistent_volume_claim.expect("claim").claim_name,
            "walt-node-vn2-persist"
        );
        let claim = build_persist_claim(&node);
        assert_eq!(claim.name_any(), "walt-node-vn2-persist");
        assert_eq!(claim.namespace().as_deref(), Some("walt-run-alice"));
        assert!(crate::controller::shared::runtime::owned_by(
            &claim.metadata,
            "Node",
            &node
        ));
        let service = build_vnode_service(&node);
        assert_eq!(service.namespace().as_deref(), Some("walt-run-alice"));
        let selector = service.spec.and_then(|spec| spec.selector).expect("selector");
        assert!(
            selector
                .iter()
                .all(|(key, value)| pod_labels.get(key) == Some(value))
        );
    }

    #[test]
    fn service_selects_the_node_pod() {
        let node = virtual_node("vn1", BootMode::Volatile);
        let service = build_vnode_service(&node);
        let spec = service.spec.expect("spec");
        assert_eq!(spec.selector.expect("selector")[NODE_LABEL], "vn1");
        assert_eq!(spec.ports.expect("ports")[0].port, 22);
        let pod = build_vnode_pod(&node, &inputs());
        assert_eq!(pod.labels()[NODE_LABEL], "vn1");
    }

    #[test]
    fn recreate_when_the_digest_moves() {
        let node = virtual_node("vn1", BootMode::Volatile);
        let pod = build_vnode_pod(&node, &inputs());
        assert!(!pod_needs_recreate(&pod, "reg.lab/alice/debian@sha256:abc"));
        assert!(pod_needs_recreate(&pod, "reg.lab/alice/debian@sha256:def"));
    }

    #[test]
    fn phases_from_pods() {
        assert_eq!(vnode_phase(None), NodePhase::Pending);
        let node = virtual_node("vn1", BootMode::Volatile);
        let mut pod = build_vnode_pod(&node, &inputs());
        assert_eq!(vnode_phase(Some(&pod)), NodePhase::Booting);
        pod.status = Some(serde_json::from_value(serde_json::json!({
            "phase": "Running",
            "containerStatuses": [{"name": "node", "ready": true, "restartCount": 0, "image": "x", "imageID": "y",
                                   "state": {"running": {}}}]
        })).expect("status"));
        assert_eq!(vnode_phase(Some(&pod)), NodePhase::Ready);
        pod.status = Some(serde_json::from_value(serde_json::json!({"phase": "Failed"})).expect("status"));
        assert_eq!(vnode_phase(Some(&pod)), NodePhase::Unreachable);
    }
}
