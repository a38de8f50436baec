//! The pure decision of a NodeSave that is not running in this process: from the NodeSave, its Node,
//! the Image it would overwrite (unless this very save wrote it) and the claims on images of the
//! namespace, [`decide`] says whether it starts, waits (and why) or fails for good.

use walt_crds::{Image, Node, NodePhase, NodeSave};

use super::build::{SaveTarget, validate};
use super::failure::Failure;
use crate::controller::shared::lock::{Claim, holder_other_than};

/// What the reconcile does next.
#[derive(Debug)]
pub enum Step {
    /// Look again soon: why it waits.
    Wait(Failure),
    /// Fail for good (only a new NodeSave can help): why.
    Fail(Failure),
    /// Prepare and run the save.
    Start(SaveTarget),
}

/// Decides what to do with `save` (pure).
pub fn decide(save: &NodeSave, node: Option<&Node>, other: Option<&Image>, claims: &[Claim]) -> Step {
    let target = match validate(save, node, other) {
        Ok(target) => target,
        Err(failure) if failure.is_transient() => return Step::Wait(failure),
        Err(failure) => return Step::Fail(failure),
    };
    let namespace = save.metadata.namespace.clone().unwrap_or_default();
    let node_phase = node
        .and_then(|node| node.status.as_ref())
        .map(|status| status.phase)
        .unwrap_or_default();
    if node_phase != NodePhase::Ready {
        return Step::Wait(Failure::NodeNotReady {
            namespace,
            node: save.spec.node.clone(),
            phase: node_phase,
        });
    }
    let me = save.metadata.name.clone().unwrap_or_default();
    if let Some(holder) = holder_other_than(claims, &target.image_object, "NodeSave", &me) {
        return Step::Wait(Failure::ImageBusy {
            image: save.spec.image.clone(),
            holder: holder.label(),
        });
    }
    Step::Start(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{ImageDigestRef, NodeSaveSpec, NodeSpec, NodeStatus};

    fn save() -> NodeSave {
        let mut save = NodeSave::new(
            "s1",
            NodeSaveSpec {
                node: "rpi1".into(),
                image: "mine".into(),
                ..NodeSaveSpec::default()
            },
        );
        save.metadata.namespace = Some("alice".into());
        save
    }

    fn node(phase: NodePhase) -> Node {
        let mut node = Node::new("rpi1", NodeSpec::default());
        node.status = Some(NodeStatus {
            phase,
            booted_image: Some(ImageDigestRef {
                name: Some("debian".into()),
                digest: Some("sha256:a".into()),
            }),
            ..NodeStatus::default()
        });
        node
    }

    fn claim(kind: &'static str, name: &str, image: &str) -> Claim {
        Claim {
            kind,
            name: name.into(),
            image: image.into(),
            started: true,
            created: k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_ready_node_and_a_free_image_start() {
        assert!(matches!(
            decide(&save(), Some(&node(NodePhase::Ready)), None, &[]),
            Step::Start(_)
        ));
        let own = [claim("NodeSave", "s1", "mine")];
        assert!(matches!(
            decide(&save(), Some(&node(NodePhase::Ready)), None, &own),
            Step::Start(_)
        ));
    }

    #[test]
    fn a_node_not_ready_or_a_busy_image_waits() {
        let step = decide(&save(), Some(&node(NodePhase::Rebooting)), None, &[]);
        assert!(
            matches!(step, Step::Wait(Failure::NodeNotReady { .. })),
            "{step:?}"
        );
        let busy = [claim("ShellSession", "sh", "mine")];
        let step = decide(&save(), Some(&node(NodePhase::Ready)), None, &busy);
        assert!(
            matches!(step, Step::Wait(Failure::ImageBusy { ref holder, .. }) if holder.contains("sh")),
            "{step:?}"
        );
    }

    #[test]
    fn an_existing_image_without_overwrite_fails() {
        let existing = Image::new("mine", walt_crds::ImageSpec::default());
        let step = decide(&save(), Some(&node(NodePhase::Ready)), Some(&existing), &[]);
        assert!(
            matches!(step, Step::Fail(Failure::ImageExists { .. })),
            "{step:?}"
        );
    }
}
