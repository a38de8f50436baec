//! Node reconcile: dereference (the Image it boots: [`BootTarget`]) → then, for a physical node,
//! [`probe`] gathers facts over SSH and the pure [`decide::decide`] judges them; for a virtual node,
//! [`virtual_node`] decides the pod's fate purely and applies what [`build`] builds. One status
//! write either way, conditional on the version of the Node the decision was made on
//! ([`Context::apply_status_of`]): a Node another write overtook meanwhile (a watch lagging behind,
//! a second replica) gets [`Error::Stale`], nothing of the stale decision is written and the Node is
//! decided again on its current state; but a reboot already made stays recorded ([`record_reboot`]).
//! [`reasons`] names every condition and Event reason.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use walt_crds::{ConditionStatus, Image, ImageDigestRef, Node, NodePhase, NodeStatus, condition_types};

pub mod build;
pub mod decide;
pub mod netboot;
pub mod probe;
pub mod reasons;
pub mod virtual_node;
pub mod vm_node;

use crate::controller::shared::context::Context;
use crate::controller::shared::error::{Error, Result};
use crate::controller::shared::lookup::find_image_cached;
use crate::controller::shared::registry::{NO_REBOOT_ANNOTATION, pinned_reference_of};
use crate::controller::shared::runtime::{delete, owned_by};

/// The reboot request not handled yet, if any (pure).
pub fn pending_reboot_request(node: &Node) -> Option<String> {
    walt_crds::request::REBOOT.pending(&node.metadata)
}

/// The image a node should boot now: its name and exact digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootTarget {
    /// Image name (as in `spec.image`).
    pub name: String,
    /// The Image's current digest.
    pub digest: String,
    /// `repository@digest`.
    pub pinned: String,
    /// Whether the Image asked not to reboot nodes for this digest.
    pub no_reboot: bool,
}

/// Whether a node booting `booted` must reboot to boot `wanted` (pure). A booted image of no known
/// name (a network-booted digest verified while the Node's target was not known yet) is the target
/// when it is the target's digest, and an unknown image to leave otherwise.
pub fn needs_reboot(booted: Option<&ImageDigestRef>, wanted: &BootTarget) -> bool {
    match booted {
        None => false,
        Some(booted) => {
            let digest_moved = booted.digest.as_deref() != Some(wanted.digest.as_str());
            let name_changed = match booted.name.as_deref() {
                Some(name) => name != wanted.name,
                None => digest_moved,
            };
            name_changed || (digest_moved && !wanted.no_reboot)
        }
    }
}

/// Whether a Node whose `spec.image` is `node_image` boots the image named `image` (pure). Run on every
/// Image change for the Nodes the index finds under the image's name ([`crate::controller::shared::node_index`]),
/// so the cheap test still comes first: a name that does not even start with the image's name is not parsed.
/// Tags compare with the default filled in: `debian:latest` boots `debian`.
pub fn boots_image(node_image: &str, image: &walt_crds::ImageName) -> bool {
    node_image.starts_with(image.name())
        && walt_crds::ImageName::parse(node_image)
            .is_ok_and(|parsed| parsed.name() == image.name() && parsed.tag() == image.tag())
}

/// Finds the boot target of a node, or the reason it has none.
async fn boot_target(context: &Context, node: &Node) -> Result<Option<BootTarget>> {
    let namespace = node.namespace().unwrap_or_default();
    let Some(name) = node.spec.image.clone() else {
        return Ok(None);
    };
    let Some((image, _from_catalog)) = find_image_cached(context, &namespace, &name).await? else {
        return Err(Error::Missing {
            kind: "Image",
            namespace,
            name,
            hint: ": create the Image (or fix spec.image)".into(),
        });
    };
    Ok(target_of(&name, &image))
}

/// The boot target of an Image (pure): none until it is resolved.
pub fn target_of(name: &str, image: &Image) -> Option<BootTarget> {
    let status = image.status.as_ref()?;
    let digest = status.digest.clone()?;
    let pinned = pinned_reference_of(image)?;
    Some(BootTarget {
        name: name.to_owned(),
        no_reboot: image.annotations().get(NO_REBOOT_ANNOTATION) == Some(&digest),
        digest,
        pinned,
    })
}

/// Sets one condition of a Node's status, stamped with the Node's generation and now.
pub(super) fn condition(
    status: &mut NodeStatus,
    node: &Node,
    type_: &str,
    state: ConditionStatus,
    reason: &str,
    message: String,
) {
    crate::controller::shared::context::set_condition_now(
        &mut status.conditions,
        node,
        type_,
        state,
        reason,
        message,
    );
}

/// Whether `status` is what `node` already has (pure): then there is nothing to write. A node that
/// stays unreachable is decided the same way on every probe; at 10,000 Nodes those writes that changed
/// nothing were most of what the API server did (each a full server-side apply, even though it stores
/// nothing new).
pub fn status_unchanged(node: &Node, status: &NodeStatus) -> bool {
    node.status.as_ref() == Some(status)
}

/// Writes a status decided on `node`, conditional on that version of it
/// ([`Context::apply_status_of`]), unless it changes nothing ([`status_unchanged`]).
pub(super) async fn write_status(context: &Context, node: &Node, status: &NodeStatus) -> Result<()> {
    if status_unchanged(node, status) {
        return Ok(());
    }
    let nodes: Api<Node> = Api::namespaced(context.client.clone(), &node.namespace().unwrap_or_default());
    context.apply_status_of(&nodes, node, status).await.map(drop)
}

/// Writes the status of a decision whose reboot (or VM power cycle) is already made, conditional on
/// the version of `node` it was decided on. A reboot done is a fact: when that version was overtaken
/// ([`Error::Stale`]), the Node is read again and the reboot's facts alone
/// ([`decide::reboot_recorded`]) are written onto its current version (without it the next decision
/// would reboot the node again); the rest of the stale decision is not written.
pub(super) async fn record_reboot(context: &Context, node: &Node, status: &NodeStatus) -> Result<()> {
    let namespace = node.namespace().unwrap_or_default();
    let nodes: Api<Node> = Api::namespaced(context.client.clone(), &namespace);
    match context.apply_status_of(&nodes, node, status).await {
        Err(Error::Stale(what)) => tracing::info!(%what, "recording a reboot on a Node overtaken meanwhile"),
        written => return written.map(drop),
    }
    let name = node.name_any();
    let current = nodes
        .get(&name)
        .await
        .map_err(|source| Error::kube(format!("reading Node {namespace}/{name} again"), source))?;
    let recorded = decide::reboot_recorded(current.status.clone().unwrap_or_default(), status);
    context
        .apply_status_of(&nodes, &current, &recorded)
        .await
        .map(drop)
}

/// Finalizer of virtual Nodes: their pod, Service and claim (in the tenant's runtime namespace, where
/// owner references cannot point to the Node) are deleted before the Node goes.
pub const FINALIZER: &str = "walt.dev/node-cleanup";

/// Reconciles one Node: a virtual one through [`FINALIZER`].
pub async fn reconcile(node: Arc<Node>, context: Arc<Context>) -> Result<Action> {
    let has_finalizer = node.finalizers().iter().any(|finalizer| finalizer == FINALIZER);
    if node.spec.virtual_node.is_none() && !has_finalizer {
        return reconcile_node(node, context).await;
    }
    let api: Api<Node> = Api::namespaced(context.client.clone(), &node.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, node, |event| async {
        match event {
            Finalizer::Apply(node) => reconcile_node(node, context.clone()).await,
            Finalizer::Cleanup(node) => cleanup(&node, &context).await,
        }
    })
    .await
    .map_err(Error::from)
}

/// The Node is being deleted: what was made for it in the runtime namespace goes (only what its
/// owner labels give to this very Node, by uid).
async fn cleanup(node: &Node, context: &Context) -> Result<Action> {
    let runtime = walt_crds::runtime_namespace(&node.namespace().unwrap_or_default());
    let name = node.name_any();
    let object = crate::controller::shared::pods::vnode_object_name(&name);
    delete_owned::<Pod>(context, &runtime, &object, node).await?;
    delete_owned::<Service>(context, &runtime, &object, node).await?;
    delete_owned::<PersistentVolumeClaim>(context, &runtime, &build::persist_claim_name(&name), node).await?;
    Ok(Action::await_change())
}

/// Deletes `name` of kind `K` in `namespace` when it is `node`'s.
async fn delete_owned<K>(context: &Context, namespace: &str, name: &str, node: &Node) -> Result<()>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let existing = Api::<K>::namespaced(context.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| Error::kube(format!("reading {} {namespace}/{name}", K::kind(&())), source))?;
    match existing {
        Some(object) if owned_by(object.meta(), "Node", node) => delete::<K>(context, namespace, name).await,
        _ => Ok(()),
    }
}

/// Reconciles one Node (its finalizer in place, for a virtual one).
async fn reconcile_node(node: Arc<Node>, context: Arc<Context>) -> Result<Action> {
    let mut status = node.status.clone().unwrap_or_default();
    status.observed_generation = node.metadata.generation;
    let target = match boot_target(&context, &node).await {
        Ok(target) => target,
        Err(error @ (Error::Missing { .. } | Error::Invalid(_))) => {
            condition(
                &mut status,
                &node,
                condition_types::BOOTED,
                ConditionStatus::False,
                reasons::IMAGE_NOT_FOUND,
                error.to_string(),
            );
            if status.phase == NodePhase::Pending || node.spec.virtual_node.is_some() {
                status.phase = NodePhase::Pending;
            }
            write_status(&context, &node, &status).await?;
            return Ok(Action::requeue(Duration::from_mins(1)));
        }
        Err(error) => return Err(error),
    };
    if walt_crds::is_vm(&node) {
        vm_node::reconcile(&node, &context, target, status).await
    } else if node.spec.virtual_node.is_some() {
        // Boxed: its state (the pod, the cluster node it runs on) would make every Node's future large.
        Box::pin(virtual_node::reconcile(&node, &context, target, status)).await
    } else {
        probe::reconcile_physical(&node, &context, target, status).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_boots_an_image_by_its_name_with_or_without_the_default_tag() {
        let image = |object: &str| walt_crds::ImageName::from_object_name(object).unwrap();
        assert!(boots_image("debian", &image("debian")));
        assert!(boots_image("debian:latest", &image("debian")));
        assert!(boots_image("debian:v2", &image("debian.v2")));
        assert!(!boots_image("debian", &image("debian.v2")));
        assert!(!boots_image("debian-arm", &image("debian")));
        assert!(!boots_image("ubuntu", &image("debian")));
        assert!(!boots_image("debian:", &image("debian")), "not a name");
    }

    #[test]
    fn an_unreachable_node_probed_again_has_nothing_to_write() {
        use decide::{Probe, SshFailure, decide};
        let mut node = Node::new(
            "n1",
            walt_crds::NodeSpec {
                model: "pc-x86-64".into(),
                ..walt_crds::NodeSpec::default()
            },
        );
        node.metadata.generation = Some(1);
        let refused = Probe::Failed(SshFailure {
            reason: "ConnectionRefused",
            message: "connection refused".into(),
            host_key_mismatch: false,
        });
        let interval = Duration::from_mins(1);
        let first_probe = k8s_openapi::jiff::Timestamp::UNIX_EPOCH;
        let first = decide(
            &node,
            NodeStatus::default(),
            None,
            &refused,
            first_probe,
            interval,
        );
        assert!(
            !status_unchanged(&node, &first.status),
            "the first probe is written"
        );
        node.status = Some(first.status.clone());
        let later = first_probe + std::time::Duration::from_mins(3);
        let second = decide(&node, first.status.clone(), None, &refused, later, interval);
        assert!(status_unchanged(&node, &second.status), "{:?}", second.status);
        let mut reached_again = second.status;
        reached_again.phase = NodePhase::Booting;
        assert!(!status_unchanged(&node, &reached_again));
    }

    fn target(digest: &str, no_reboot: bool) -> BootTarget {
        BootTarget {
            name: "debian".into(),
            digest: digest.into(),
            pinned: format!("r/debian@{digest}"),
            no_reboot,
        }
    }

    fn booted(name: &str, digest: &str) -> ImageDigestRef {
        ImageDigestRef {
            name: Some(name.into()),
            digest: Some(digest.into()),
        }
    }

    #[test]
    fn reboot_rules() {
        assert!(!needs_reboot(None, &target("sha256:a", false)));
        assert!(!needs_reboot(
            Some(&booted("debian", "sha256:a")),
            &target("sha256:a", false)
        ));
        assert!(needs_reboot(
            Some(&booted("debian", "sha256:a")),
            &target("sha256:b", false)
        ));
        assert!(!needs_reboot(
            Some(&booted("debian", "sha256:a")),
            &target("sha256:b", true)
        ));
        assert!(needs_reboot(
            Some(&booted("alpine", "sha256:b")),
            &target("sha256:b", true)
        ));
        // A digest verified while the target was unknown has no name: it is the target when the
        // digests agree (seen in CI: an arm64 VM node verified, then rebooted "to boot os" into the
        // very digest it ran), another image otherwise, even for a digest that asks for no reboot.
        let nameless = |digest: &str| ImageDigestRef {
            name: None,
            digest: Some(digest.into()),
        };
        assert!(!needs_reboot(
            Some(&nameless("sha256:a")),
            &target("sha256:a", false)
        ));
        assert!(needs_reboot(
            Some(&nameless("sha256:a")),
            &target("sha256:b", false)
        ));
        assert!(needs_reboot(
            Some(&nameless("sha256:a")),
            &target("sha256:b", true)
        ));
    }
}
