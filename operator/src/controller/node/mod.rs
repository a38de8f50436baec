//! Node reconcile: dereference (the Image it boots) → validate → build
//! (pure, in [`build`]) → apply → status.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{ConditionStatus, Image, ImageDigestRef, Node, NodePhase, NodeStatus, condition_types};

pub mod build;
pub mod decide;
pub mod probe;
pub mod reasons;

use self::build::{
    VnodeInputs, build_persist_claim, build_vnode_pod, build_vnode_service, pod_needs_recreate, vnode_phase,
};
use crate::controller::shared::context::Context;
use crate::controller::shared::error::KubeResultExt;
use crate::controller::shared::error::{Error, Result};
use crate::controller::shared::lookup::find_image;
use crate::controller::shared::pods::vnode_object_name;
use crate::controller::shared::registry::{
    NO_REBOOT_ANNOTATION, ensure_registry_secret, pinned_reference_of,
};

/// The reboot request not handled yet, if any (pure).
pub fn pending_reboot_request(node: &Node) -> Option<String> {
    walt_crds::request::REBOOT.pending(&node.metadata)
}

/// Publishes the `Rebooting` Event of a node.
pub async fn rebooting_event(context: &Context, node: &Node, note: String) {
    context
        .event(node, EventType::Normal, reasons::REBOOTING, "Reboot", note)
        .await;
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

/// Whether a node booting `booted` must reboot to boot `wanted` (pure).
pub fn needs_reboot(booted: Option<&ImageDigestRef>, wanted: &BootTarget) -> bool {
    match booted {
        None => false,
        Some(booted) => {
            let name_changed = booted.name.as_deref() != Some(wanted.name.as_str());
            let digest_moved = booted.digest.as_deref() != Some(wanted.digest.as_str());
            name_changed || (digest_moved && !wanted.no_reboot)
        }
    }
}

/// Finds the boot target of a node, or the reason it has none.
async fn boot_target(context: &Context, node: &Node) -> Result<Option<BootTarget>> {
    let namespace = node.namespace().unwrap_or_default();
    let Some(name) = node.spec.image.clone() else {
        return Ok(None);
    };
    let Some((image, _from_catalog)) = find_image(context, &namespace, &name).await? else {
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

/// Reconciles one Node.
pub async fn reconcile(node: Arc<Node>, context: Arc<Context>) -> Result<Action> {
    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let nodes: Api<Node> = Api::namespaced(context.client.clone(), &namespace);
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
            context.apply_status(&nodes, &name, &status).await?;
            return Ok(Action::requeue(Duration::from_mins(1)));
        }
        Err(error) => return Err(error),
    };
    if node.spec.virtual_node.is_some() {
        reconcile_virtual(&node, &context, target, status).await
    } else {
        probe::reconcile_physical(&node, &context, target, status).await
    }
}

async fn reconcile_virtual(
    node: &Node,
    context: &Context,
    target: Option<BootTarget>,
    mut status: NodeStatus,
) -> Result<Action> {
    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let nodes: Api<Node> = Api::namespaced(context.client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &namespace);
    let Some(target) = target else {
        status.phase = NodePhase::Pending;
        condition(
            &mut status,
            node,
            condition_types::BOOTED,
            ConditionStatus::False,
            reasons::IMAGE_NOT_READY,
            format!(
                "image {} is not resolved yet (see its Ready condition); a virtual node needs spec.image",
                node.spec.image.as_deref().unwrap_or("(none)")
            ),
        );
        context.apply_status(&nodes, &name, &status).await?;
        return Ok(Action::requeue(Duration::from_mins(1)));
    };
    let has_credentials = ensure_registry_secret(context, &namespace).await?;
    if node.spec.boot_mode == walt_crds::BootMode::Persistent {
        context
            .apply(
                &Api::<PersistentVolumeClaim>::namespaced(context.client.clone(), &namespace),
                &build_persist_claim(node),
            )
            .await?;
    }
    context
        .apply(
            &Api::<Service>::namespaced(context.client.clone(), &namespace),
            &build_vnode_service(node),
        )
        .await?;
    let pod_name = vnode_object_name(&name);
    let existing = pods
        .get_opt(&pod_name)
        .await
        .context(|| format!("reading Pod {pod_name}"))?;
    let current_boot = existing
        .as_ref()
        .and_then(|pod| pod.annotations().get(build::BOOTS_ANNOTATION).cloned());
    let booted = existing.as_ref().map(|pod| ImageDigestRef {
        name: pod.annotations().get(build::BOOTS_IMAGE_ANNOTATION).cloned(),
        digest: current_boot
            .as_deref()
            .and_then(|pinned| pinned.split('@').nth(1))
            .map(str::to_owned),
    });
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
    let requested = pending_reboot_request(node);
    let reboot_note = match (&existing, &requested) {
        (Some(_), Some(requested)) => Some(format!(
            "reboot requested at {requested}: recreating the virtual node pod"
        )),
        (Some(pod), None)
            if pod_needs_recreate(pod, &target.pinned) && needs_reboot(booted.as_ref(), &target) =>
        {
            Some(format!(
                "recreating the virtual node pod to boot {} ({})",
                target.name, target.digest
            ))
        }
        _ => None,
    };
    let pod = match (existing, reboot_note) {
        (Some(pod), Some(note)) => {
            if pod.metadata.deletion_timestamp.is_none() {
                pods.delete(&pod_name, &DeleteParams::default())
                    .await
                    .context(|| format!("deleting Pod {pod_name} to reboot the virtual node"))?;
                rebooting_event(context, node, note).await;
            }
            if let Some(requested) = &requested {
                context
                    .mark_handled(node, walt_crds::request::REBOOT, requested)
                    .await?;
            }
            status.phase = NodePhase::Rebooting;
            None
        }
        (Some(pod), None) => Some(pod),
        (None, _) => {
            let created = context.apply(&pods, &build_vnode_pod(node, &inputs)).await?;
            context
                .event(
                    node,
                    EventType::Normal,
                    reasons::BOOTING,
                    "Boot",
                    format!(
                        "started virtual node pod {pod_name} booting {} ({})",
                        target.name, target.digest
                    ),
                )
                .await;
            Some(created)
        }
    };
    if let Some(pod) = &pod {
        status.phase = vnode_phase(Some(pod));
        status.address = Some(format!("{}.{namespace}.svc", vnode_object_name(&name)));
        status.booted_image = Some(ImageDigestRef {
            name: pod.annotations().get(build::BOOTS_IMAGE_ANNOTATION).cloned(),
            digest: pod
                .annotations()
                .get(build::BOOTS_ANNOTATION)
                .and_then(|pinned| pinned.split('@').nth(1))
                .map(str::to_owned),
        });
    }
    let ready = status.phase == NodePhase::Ready;
    let phase = status.phase;
    condition(
        &mut status,
        node,
        condition_types::BOOTED,
        ready.into(),
        if ready {
            reasons::POD_RUNNING
        } else {
            reasons::POD_STARTING
        },
        format!("virtual node pod {pod_name}: {phase:?}"),
    );
    condition(
        &mut status,
        node,
        condition_types::REACHABLE,
        ready.into(),
        if ready {
            reasons::POD_RUNNING
        } else {
            reasons::POD_STARTING
        },
        format!("SSH through Service {}", vnode_object_name(&name)),
    );
    if ready {
        status.last_seen = Some(Time(Timestamp::now()));
    }
    context.apply_status(&nodes, &name, &status).await?;
    // Pod changes wake us through the owned-pod watch; this is a safety net.
    Ok(Action::requeue(if ready {
        Duration::from_mins(10)
    } else {
        Duration::from_secs(30)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
