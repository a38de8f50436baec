//! Virtual nodes: dereference the node's pod → the pure [`decide`] (keep, create or recreate the
//! pod, for a reboot request or a new digest) and [`status_of`] (phase, booted image and conditions
//! from the pod) → apply (claim, Service, pod) → one status write.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{
    ConditionStatus, ImageDigestRef, Node, NodePhase, NodeStatus, condition_types, runtime_namespace,
};

use super::build::{
    BOOTS_ANNOTATION, BOOTS_IMAGE_ANNOTATION, VnodeInputs, build_persist_claim, build_vnode_pod,
    build_vnode_service, pod_needs_recreate, vnode_phase,
};
use super::{BootTarget, needs_reboot, pending_reboot_request, reasons};
use crate::controller::shared::context::{Context, set_condition_at};
use crate::controller::shared::error::{KubeResultExt, Result};
use crate::controller::shared::pods::{emulated_on, on_cluster_node, scheduled_on, vnode_object_name};
use crate::controller::shared::registry::ensure_registry_secret;
use crate::controller::shared::registry_paths::{Access, REGISTRY_PATH_FORBIDDEN};
use crate::controller::shared::runtime::{ensure_runtime_namespace, owned_by};

/// What to do with a virtual node's pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodStep {
    /// It boots what it should: keep it.
    Keep,
    /// There is none: create it.
    Create,
    /// A pod of that name exists that this Node does not own (someone else made it, or a former
    /// Node of that name left it to the garbage collector): neither used, nor reached, nor replaced.
    NotOurs,
    /// Delete it so it is created again (a reboot): `note` says why, `handled` is the reboot
    /// request to record as handled, if one asked for it.
    Recreate {
        /// Why (the Event's note).
        note: String,
        /// The reboot request this handles.
        handled: Option<String>,
    },
}

/// The image a pod boots, from its annotations (pure).
pub fn booted_by(pod: &Pod) -> ImageDigestRef {
    ImageDigestRef {
        name: pod.annotations().get(BOOTS_IMAGE_ANNOTATION).cloned(),
        digest: pod
            .annotations()
            .get(BOOTS_ANNOTATION)
            .and_then(|pinned| pinned.split('@').nth(1))
            .map(str::to_owned),
    }
}

/// Decides what happens to a virtual node's pod (pure): a pod the Node does not own (owner labels
/// with its uid) is left alone; a pending reboot request recreates it; so does a
/// moved digest or another image, unless the Image asked not to reboot for it.
pub fn decide(node: &Node, target: &BootTarget, existing: Option<&Pod>) -> PodStep {
    let Some(pod) = existing else {
        return PodStep::Create;
    };
    if !owned_by(&pod.metadata, "Node", node) {
        return PodStep::NotOurs;
    }
    if let Some(requested) = pending_reboot_request(node) {
        return PodStep::Recreate {
            note: format!("reboot requested at {requested}: recreating the virtual node pod"),
            handled: Some(requested),
        };
    }
    if pod_needs_recreate(pod, &target.pinned) && needs_reboot(Some(&booted_by(pod)), target) {
        return PodStep::Recreate {
            note: format!(
                "recreating the virtual node pod to boot {} ({})",
                target.name, target.digest
            ),
            handled: None,
        };
    }
    PodStep::Keep
}

/// The status of a virtual node given its pod after this reconcile (none while it is recreated) and
/// the cluster node that pod is scheduled on, and when to look again (pure).
pub fn status_of(
    node: &Node,
    mut status: NodeStatus,
    pod: Option<&Pod>,
    cluster_node: Option<&k8s_openapi::api::core::v1::Node>,
    now: Timestamp,
) -> (NodeStatus, Duration) {
    let name = node.name_any();
    let runtime = runtime_namespace(&node.namespace().unwrap_or_default());
    let service = vnode_object_name(&name);
    status.pod_namespace = Some(runtime.clone());
    match pod {
        Some(pod) => {
            status.phase = vnode_phase(Some(pod));
            status.address = Some(format!("{service}.{runtime}.svc"));
            status.booted_image = Some(booted_by(pod));
        }
        None => status.phase = NodePhase::Rebooting,
    }
    // Native CPU first: the pod preferred cluster nodes of the node's CPU; say which it got.
    status.cluster_node = pod
        .and_then(|pod| pod.spec.as_ref())
        .and_then(|spec| spec.node_name.clone());
    let architecture = node.spec.virtual_node.as_ref().map(|v| v.architecture.as_str());
    let cluster_node = cluster_node.filter(|_| status.cluster_node.is_some());
    status.emulated = emulated_on(architecture, cluster_node);
    let how = match status.emulated {
        Some(true) => ", emulated: the node's CPU is another (qemu-user)",
        Some(false) => ", native: the node's CPU is this one",
        None => "",
    };
    let placed = format!("{}{how}", on_cluster_node(cluster_node));
    let ready = status.phase == NodePhase::Ready;
    let reason = if ready {
        reasons::POD_RUNNING
    } else {
        reasons::POD_STARTING
    };
    let phase = status.phase;
    for (type_, message) in [
        (
            condition_types::BOOTED,
            format!("virtual node pod {service}: {phase:?}{placed}"),
        ),
        (
            condition_types::REACHABLE,
            format!("SSH through Service {service}"),
        ),
    ] {
        set_condition_at(
            &mut status.conditions,
            node,
            type_,
            ready.into(),
            reason,
            message,
            now,
        );
    }
    if ready {
        status.last_seen = Some(Time(now));
    }
    // Pod changes wake us through the owned-pod watch; this is a safety net.
    let requeue = if ready {
        Duration::from_mins(10)
    } else {
        Duration::from_secs(30)
    };
    (status, requeue)
}

/// The status of a virtual node that does not start (pure): pending, `Booted=False` with `reason`
/// and `message`.
pub fn pending_because(
    node: &Node,
    mut status: NodeStatus,
    reason: &str,
    message: String,
    now: Timestamp,
) -> NodeStatus {
    status.phase = NodePhase::Pending;
    set_condition_at(
        &mut status.conditions,
        node,
        condition_types::BOOTED,
        ConditionStatus::False,
        reason,
        message,
        now,
    );
    status
}

/// The status of a virtual node whose image is in a registry path its namespace may not read (pure).
pub fn path_forbidden(node: &Node, status: NodeStatus, message: String, now: Timestamp) -> NodeStatus {
    pending_because(node, status, REGISTRY_PATH_FORBIDDEN, message, now)
}

/// The status of a virtual node whose pod name is taken by a pod it does not own (pure): pending,
/// with what to do (also the message, for the Event).
pub fn pod_not_ours(node: &Node, mut status: NodeStatus, now: Timestamp) -> (NodeStatus, String) {
    let pod = vnode_object_name(&node.name_any());
    status.phase = NodePhase::Pending;
    status.address = None;
    status.booted_image = None;
    let message = format!(
        "a pod named {pod} exists in the namespace {} that is not this Node's (its owner labels do not name this Node's uid): \
         the operator neither uses, reaches nor replaces it; a pod left by a former Node of this name goes by itself \
         (the runtime namespace's sweep), or give the Node another name",
        runtime_namespace(&node.namespace().unwrap_or_default())
    );
    for type_ in [condition_types::BOOTED, condition_types::REACHABLE] {
        set_condition_at(
            &mut status.conditions,
            node,
            type_,
            ConditionStatus::False,
            reasons::POD_NOT_OURS,
            message.clone(),
            now,
        );
    }
    (status, message)
}

/// The status of a virtual node whose runtime namespace cannot be used (pure).
pub fn runtime_refused(node: &Node, status: NodeStatus, message: String, now: Timestamp) -> NodeStatus {
    pending_because(node, status, reasons::RUNTIME_NAMESPACE_REFUSED, message, now)
}

/// The status of a virtual node whose Image is not resolved yet (pure).
pub fn waiting_for_image(node: &Node, status: NodeStatus, now: Timestamp) -> NodeStatus {
    let message = format!(
        "image {} is not resolved yet (see its Ready condition); a virtual node needs spec.image",
        node.spec.image.as_deref().unwrap_or("(none)")
    );
    pending_because(node, status, reasons::IMAGE_NOT_READY, message, now)
}

/// Reconciles a virtual node.
pub async fn reconcile(
    node: &Node,
    context: &Context,
    target: Option<BootTarget>,
    status: NodeStatus,
) -> Result<Action> {
    let namespace = node.namespace().unwrap_or_default();
    let Some(target) = target else {
        let status = waiting_for_image(node, status, Timestamp::now());
        super::write_status(context, node, &status).await?;
        return Ok(Action::requeue(Duration::from_mins(1)));
    };
    // Registry paths are per tenant: the pod pulls only the namespace's own or the catalog's images.
    if let Err(refusal) = context.config.lab_paths().check(
        &namespace,
        &target.pinned,
        Access::Read,
        &format!("image {}", target.name),
    ) {
        let status = path_forbidden(node, status, refusal.message.clone(), Timestamp::now());
        refuse(context, node, &status, REGISTRY_PATH_FORBIDDEN, refusal.message).await?;
        return Ok(Action::requeue(Duration::from_mins(10)));
    }
    let runtime = match ensure_runtime_namespace(context, &namespace).await {
        Ok(runtime) => runtime,
        Err(crate::controller::shared::error::Error::Invalid(message)) => {
            let status = runtime_refused(node, status, message.clone(), Timestamp::now());
            refuse(
                context,
                node,
                &status,
                reasons::RUNTIME_NAMESPACE_REFUSED,
                message,
            )
            .await?;
            return Ok(Action::requeue(Duration::from_mins(10)));
        }
        Err(error) => return Err(error),
    };
    let has_credentials = ensure_registry_secret(context, &namespace, &runtime).await?;
    apply_claim_and_service(context, node, &runtime).await?;
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &runtime);
    let pod_name = vnode_object_name(&node.name_any());
    let existing = pods
        .get_opt(&pod_name)
        .await
        .context(|| format!("reading Pod {pod_name}"))?;
    // The Node as this reconcile's own write of it left it (the reboot request marked handled): the
    // status write goes on from that version, with the decision made on `node`.
    let mut marked = None;
    let pod = match decide(node, &target, existing.as_ref()) {
        PodStep::NotOurs => {
            let (status, message) = pod_not_ours(node, status, Timestamp::now());
            refuse(context, node, &status, reasons::POD_NOT_OURS, message).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        PodStep::Keep => existing,
        PodStep::Create => Some(create_pod(context, node, &target, has_credentials).await?),
        PodStep::Recreate { note, handled } => {
            if existing.is_some_and(|pod| pod.metadata.deletion_timestamp.is_none()) {
                pods.delete(&pod_name, &DeleteParams::default())
                    .await
                    .context(|| format!("deleting Pod {pod_name} to reboot the virtual node"))?;
                context
                    .event(node, EventType::Normal, reasons::REBOOTING, "Reboot", note)
                    .await;
            }
            if let Some(requested) = &handled {
                marked = Some(
                    context
                        .mark_handled(node, walt_crds::request::REBOOT, requested)
                        .await?,
                );
            }
            None
        }
    };
    let cluster_node = scheduled_on(context, pod.as_ref()).await;
    let (status, requeue) = status_of(
        node,
        status,
        pod.as_ref(),
        cluster_node.as_ref(),
        Timestamp::now(),
    );
    super::write_status(context, marked.as_ref().unwrap_or(node), &status).await?;
    Ok(Action::requeue(requeue))
}

/// Writes the status of a virtual node the operator does not boot, and says why in a Warning Event
/// the first time (while the conditions stay the same, the Event is not repeated).
pub(super) async fn refuse(
    context: &Context,
    node: &Node,
    status: &NodeStatus,
    reason: &str,
    message: String,
) -> Result<()> {
    let told = node
        .status
        .as_ref()
        .is_some_and(|old| old.conditions == status.conditions);
    super::write_status(context, node, status).await?;
    if !told {
        context
            .event(node, EventType::Warning, reason, "Boot", message)
            .await;
    }
    Ok(())
}

/// The node's `/persist` claim (persistent boot mode) and its SSH Service.
async fn apply_claim_and_service(context: &Context, node: &Node, runtime: &str) -> Result<()> {
    if node.spec.boot_mode == walt_crds::BootMode::Persistent {
        context
            .apply(
                &Api::<PersistentVolumeClaim>::namespaced(context.client.clone(), runtime),
                &build_persist_claim(node),
            )
            .await?;
    }
    context
        .apply(
            &Api::<Service>::namespaced(context.client.clone(), runtime),
            &build_vnode_service(node),
        )
        .await?;
    Ok(())
}

/// Creates the node's pod booting `target` (mounting the namespace's registry credentials when it
/// has them), with an Event.
async fn create_pod(
    context: &Context,
    node: &Node,
    target: &BootTarget,
    has_credentials: bool,
) -> Result<Pod> {
    let runtime = runtime_namespace(&node.namespace().unwrap_or_default());
    let registry_host = context.config.registry_host.clone();
    let inputs = VnodeInputs {
        runtime_image: &context.config.args.shell_image,
        image_name: &target.name,
        boot_reference: &target.pinned,
        node_public_key: &context.config.node_public_key,
        registry_credentials: has_credentials,
        insecure_registry: context
            .config
            .args
            .registry_plain_http
            .then_some(registry_host.as_str()),
    };
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &runtime);
    let created = context.apply(&pods, &build_vnode_pod(node, &inputs)).await?;
    let note = format!(
        "started virtual node pod {} booting {} ({})",
        vnode_object_name(&node.name_any()),
        target.name,
        target.digest
    );
    context
        .event(node, EventType::Normal, reasons::BOOTING, "Boot", note)
        .await;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use walt_crds::{NodeSpec, VirtualNode};

    fn node() -> Node {
        let mut node = Node::new(
            "v1",
            NodeSpec {
                virtual_node: Some(VirtualNode::default()),
                image: Some("debian".into()),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some("lab".into());
        node.metadata.uid = Some("uid-v1".into());
        node
    }

    fn target(digest: &str) -> BootTarget {
        BootTarget {
            name: "debian".into(),
            digest: digest.into(),
            pinned: format!("r/debian@{digest}"),
            no_reboot: false,
        }
    }

    fn pod_booting(digest: &str) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.annotations = Some(BTreeMap::from([
            (BOOTS_ANNOTATION.to_owned(), format!("r/debian@{digest}")),
            (BOOTS_IMAGE_ANNOTATION.to_owned(), "debian".to_owned()),
        ]));
        pod.metadata.namespace = Some("walt-run-lab".into());
        pod.metadata.labels = Some(crate::controller::shared::runtime::owner_labels("Node", &node()));
        pod
    }

    #[test]
    fn a_pod_of_the_name_the_node_does_not_own_is_left_alone_and_said() {
        let mut squatter = pod_booting("sha256:a");
        squatter.metadata.labels = None;
        assert_eq!(
            decide(&node(), &target("sha256:a"), Some(&squatter)),
            PodStep::NotOurs
        );
        let mut former = pod_booting("sha256:a");
        if let Some(labels) = former.metadata.labels.as_mut() {
            labels.insert(
                walt_crds::runtime::OWNER_UID_LABEL.into(),
                "uid-of-a-deleted-v1".into(),
            );
        }
        assert_eq!(
            decide(&node(), &target("sha256:b"), Some(&former)),
            PodStep::NotOurs
        );
        let now = Timestamp::from_second(1_000).expect("time");
        let (status, message) = pod_not_ours(&node(), NodeStatus::default(), now);
        assert_eq!(status.phase, NodePhase::Pending);
        assert!(status.address.is_none());
        assert!(
            message.contains(
                "a pod named walt-node-v1 exists in the namespace walt-run-lab that is not this Node's"
            ),
            "{message}"
        );
        assert!(
            status
                .conditions
                .iter()
                .all(|condition| condition.reason == reasons::POD_NOT_OURS && condition.status == "False"),
            "{:?}",
            status.conditions
        );
    }

    #[test]
    fn a_missing_pod_is_created_and_a_current_one_kept() {
        assert_eq!(decide(&node(), &target("sha256:a"), None), PodStep::Create);
        assert_eq!(
            decide(&node(), &target("sha256:a"), Some(&pod_booting("sha256:a"))),
            PodStep::Keep
        );
    }

    #[test]
    fn a_new_digest_or_a_reboot_request_recreates_the_pod() {
        let step = decide(&node(), &target("sha256:b"), Some(&pod_booting("sha256:a")));
        assert!(
            matches!(step, PodStep::Recreate { handled: None, .. }),
            "{step:?}"
        );
        let mut quiet = target("sha256:b");
        quiet.no_reboot = true;
        assert_eq!(
            decide(&node(), &quiet, Some(&pod_booting("sha256:a"))),
            PodStep::Keep
        );
        let mut asked = node();
        asked.metadata.annotations = Some(BTreeMap::from([(
            walt_crds::request::REBOOT.requested.to_owned(),
            "t1".to_owned(),
        )]));
        let step = decide(&asked, &target("sha256:a"), Some(&pod_booting("sha256:a")));
        assert!(
            matches!(step, PodStep::Recreate { handled: Some(ref t), .. } if t == "t1"),
            "{step:?}"
        );
    }

    #[test]
    fn the_status_follows_the_pod() {
        let now = Timestamp::from_second(1_000).expect("time");
        let (status, requeue) = status_of(&node(), NodeStatus::default(), None, None, now);
        assert_eq!(status.phase, NodePhase::Rebooting);
        assert_eq!(requeue, Duration::from_secs(30));
        let (status, _) = status_of(
            &node(),
            NodeStatus::default(),
            Some(&pod_booting("sha256:a")),
            None,
            now,
        );
        assert_eq!(
            (status.cluster_node, status.emulated),
            (None, None),
            "not scheduled yet"
        );
        assert_eq!(status.address.as_deref(), Some("walt-node-v1.walt-run-lab.svc"));
        assert_eq!(
            status.booted_image.and_then(|booted| booted.digest).as_deref(),
            Some("sha256:a")
        );
        let waiting = waiting_for_image(&node(), NodeStatus::default(), now);
        assert_eq!(waiting.phase, NodePhase::Pending);
    }

    #[test]
    fn a_virtual_node_says_on_which_cluster_node_and_whether_natively() {
        use crate::controller::shared::pods::cluster_node_of;
        let now = Timestamp::from_second(1_000).expect("time");
        let mut arm = node();
        if let Some(virtual_node) = arm.spec.virtual_node.as_mut() {
            virtual_node.architecture = walt_crds::Architecture::Arm64;
        }
        let mut pod = pod_booting("sha256:a");
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some("pi-1".into()),
            ..k8s_openapi::api::core::v1::PodSpec::default()
        });
        let booted_message = |status: &NodeStatus| {
            walt_crds::find_condition(&status.conditions, condition_types::BOOTED)
                .map(|c| c.message.clone())
                .unwrap_or_default()
        };
        let pi = cluster_node_of("pi-1", "arm64");
        let (native, _) = status_of(&arm, NodeStatus::default(), Some(&pod), Some(&pi), now);
        assert_eq!(
            (native.cluster_node.as_deref(), native.emulated),
            (Some("pi-1"), Some(false))
        );
        assert!(
            booted_message(&native)
                .ends_with(" on cluster node pi-1 (arm64), native: the node's CPU is this one"),
            "{}",
            booted_message(&native)
        );
        let pc = cluster_node_of("pi-1", "amd64");
        let (emulated, _) = status_of(&arm, NodeStatus::default(), Some(&pod), Some(&pc), now);
        assert_eq!(emulated.emulated, Some(true));
        assert!(
            booted_message(&emulated).contains("(amd64), emulated"),
            "{}",
            booted_message(&emulated)
        );
        // The pod went (a reboot): where it ran is no longer where the node runs.
        let (rebooting, _) = status_of(&arm, emulated, None, Some(&pc), now);
        assert_eq!((rebooting.cluster_node, rebooting.emulated), (None, None));
    }
}
