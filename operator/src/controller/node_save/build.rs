//! NodeSave controller.
//!
//! Validate (the Node exists in the same namespace and has booted an image;
//! the target image is new, or `overwrite: true`), wait for the image to be
//! free (one shell, copy or save at a time per image, see [`crate::controller::shared::lock`]),
//! then run the node save pipeline of the `ssh` module as a tracked task:
//! bounded concurrency (`--max-concurrent-saves`), progress written to
//! status every few seconds. The pipeline pushes **by digest**; only when it
//! succeeded does the operator tag the target, create or update its Image,
//! and (for an overwrite with `rebootNodes`) let the Node controller reboot
//! the nodes that boot it. A save found `Running` after an operator restart
//! is simply run again: nothing was tagged, and pushing by digest is
//! idempotent.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use walt_crds::{
    Changes, ConditionStatus, Image, ImageDigestRef, ImageName, Node, NodeSave, NodeSavePhase,
    NodeSaveResult, NodeSaveStatus, Progress, condition_types, format_duration, new_condition, set_condition,
};

use super::failure::Failure;
use super::reasons;

/// How often a running save's progress is written to its status.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(3);

/// What a valid NodeSave works on (from [`validate`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveTarget {
    /// The Image object the changes are saved as.
    pub image_object: String,
    /// Whether that Image exists already (an overwrite).
    pub exists: bool,
    /// The image the node booted: the new image's base.
    pub base: ImageDigestRef,
}

/// What a NodeSave works on, or why it cannot run (pure).
pub fn validate(save: &NodeSave, node: Option<&Node>, target: Option<&Image>) -> Result<SaveTarget, Failure> {
    let namespace = save.metadata.namespace.clone().unwrap_or_default();
    let name = ImageName::parse(&save.spec.image).map_err(Failure::InvalidImageName)?;
    crate::ssh::export::Exclusions::new(&save.spec.exclude).map_err(Failure::InvalidExclude)?;
    let Some(node) = node else {
        return Err(Failure::NodeNotFound {
            namespace,
            node: save.spec.node.clone(),
        });
    };
    if target.is_some() && !save.spec.overwrite {
        return Err(Failure::ImageExists {
            image: save.spec.image.clone(),
        });
    }
    let booted = node
        .status
        .as_ref()
        .and_then(|status| status.booted_image.clone());
    let base = match booted {
        Some(base) if base.digest.is_some() => base,
        _ => {
            return Err(Failure::NodeNotBooted {
                namespace,
                node: save.spec.node.clone(),
            });
        }
    };
    Ok(SaveTarget {
        image_object: name.object_name(),
        exists: target.is_some(),
        base,
    })
}

fn condition_complete(
    status: &mut NodeSaveStatus,
    save: &NodeSave,
    state: ConditionStatus,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    set_condition(
        &mut status.conditions,
        new_condition(
            condition_types::COMPLETE,
            state,
            reason,
            message,
            save.metadata.generation,
            Time(now),
        ),
    );
}

/// Status of a save that waits (queued, image busy), pure.
pub fn pending_status(save: &NodeSave, reason: &str, message: &str, now: Timestamp) -> NodeSaveStatus {
    let mut status = save.status.clone().unwrap_or_default();
    status.observed_generation = save.metadata.generation;
    status.phase = NodeSavePhase::Pending;
    condition_complete(&mut status, save, ConditionStatus::False, reason, message, now);
    status
}

/// Status of a running save, pure.
pub fn running_status(
    save: &NodeSave,
    target: &SaveTarget,
    progress: Progress,
    now: Timestamp,
) -> NodeSaveStatus {
    let mut status = save.status.clone().unwrap_or_default();
    status.observed_generation = save.metadata.generation;
    if status.phase != NodeSavePhase::Running {
        status.start_time = Some(Time(now));
    }
    status.phase = NodeSavePhase::Running;
    status.base_image = Some(target.base.clone());
    status.progress = Some(progress);
    condition_complete(
        &mut status,
        save,
        ConditionStatus::False,
        reasons::RUNNING,
        &format!(
            "saving the changes of node {} as {}",
            save.spec.node, save.spec.image
        ),
        now,
    );
    status
}

/// What the save pipeline produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SaveOutcome {
    /// Where the image was pushed (by digest) and tagged.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// New layer digest.
    pub layer_digest: String,
    /// New layer size (compressed).
    pub layer_size: u64,
    /// What changed.
    pub changes: Changes,
}

fn finish(status: &mut NodeSaveStatus, now: Timestamp) {
    status.completion_time = Some(Time(now));
    if let Some(start) = &status.start_time {
        status.duration = Some(format_duration(now.duration_since(start.0).unsigned_abs()));
    }
}

/// Status of a successful save, pure.
pub fn succeeded_status(
    save: &NodeSave,
    outcome: &SaveOutcome,
    rebooting: usize,
    now: Timestamp,
) -> NodeSaveStatus {
    let mut status = save.status.clone().unwrap_or_default();
    status.observed_generation = save.metadata.generation;
    status.phase = NodeSavePhase::Succeeded;
    status.result = Some(NodeSaveResult {
        reference: Some(outcome.reference.clone()),
        digest: Some(outcome.digest.clone()),
        layer_digest: Some(outcome.layer_digest.clone()),
        layer_size: Some(outcome.layer_size),
    });
    status.changes = Some(outcome.changes.clone());
    finish(&mut status, now);
    let reboot_note = if rebooting > 0 {
        format!("; rebooting {rebooting} node(s) that boot it")
    } else {
        String::new()
    };
    condition_complete(
        &mut status,
        save,
        ConditionStatus::True,
        reasons::SAVED,
        &format!("saved as {} ({}){reboot_note}", save.spec.image, outcome.digest),
        now,
    );
    status
}

/// Status of a save whose layer is pushed (by digest) while the operator
/// moves the tag and updates the Image, pure.
pub fn pushing_status(save: &NodeSave, progress: Progress, now: Timestamp) -> NodeSaveStatus {
    let mut status = save.status.clone().unwrap_or_default();
    status.observed_generation = save.metadata.generation;
    status.phase = NodeSavePhase::Pushing;
    status.progress = Some(progress);
    condition_complete(
        &mut status,
        save,
        ConditionStatus::False,
        reasons::TAGGING,
        &format!(
            "the new image is pushed by digest; tagging it {}",
            save.spec.image
        ),
        now,
    );
    status
}

/// Bytes between two progress Events.
pub const MILESTONE_BYTES: u64 = 256 * 1024 * 1024;

/// The milestone (a multiple of [`MILESTONE_BYTES`]) crossed between two
/// progress readings, if any, pure.
pub fn milestone_crossed(before: u64, now: u64) -> Option<u64> {
    let reached = now / MILESTONE_BYTES;
    (reached > before / MILESTONE_BYTES).then_some(reached * MILESTONE_BYTES)
}

/// How many of `nodes` boot the Image object `image_object`, pure.
pub fn nodes_booting(nodes: &[Node], image_object: &str) -> usize {
    nodes
        .iter()
        .filter(|node| {
            node.spec
                .image
                .as_deref()
                .and_then(|name| ImageName::parse(name).ok())
                .is_some_and(|name| name.object_name() == image_object)
        })
        .count()
}

/// Whether a status write can be skipped: same phase, same `Complete`
/// condition (reason and message), pure. Keeps idle waits from writing.
pub fn same_wait(old: Option<&NodeSaveStatus>, new: &NodeSaveStatus) -> bool {
    let complete = |status: &NodeSaveStatus| {
        walt_crds::find_condition(&status.conditions, condition_types::COMPLETE)
            .map(|condition| (condition.reason.clone(), condition.message.clone()))
    };
    old.is_some_and(|old| old.phase == new.phase && complete(old) == complete(new))
}

/// Status of a failed save, pure: no tag moved.
pub fn failed_status(save: &NodeSave, reason: &str, message: &str, now: Timestamp) -> NodeSaveStatus {
    let mut status = save.status.clone().unwrap_or_default();
    status.observed_generation = save.metadata.generation;
    status.phase = NodeSavePhase::Failed;
    finish(&mut status, now);
    condition_complete(
        &mut status,
        save,
        ConditionStatus::True,
        reason,
        &format!("{message} (no tag was moved)"),
        now,
    );
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{ImageSpec, NodeSaveSpec, NodeSpec, NodeStatus, find_condition};

    fn save(image: &str, overwrite: bool) -> NodeSave {
        let mut save = NodeSave::new(
            "save1",
            NodeSaveSpec {
                node: "rpi1".into(),
                image: image.into(),
                overwrite,
                ..NodeSaveSpec::default()
            },
        );
        save.metadata.namespace = Some("alice".into());
        save
    }

    fn booted_node() -> Node {
        let mut node = Node::new("rpi1", NodeSpec::default());
        node.status = Some(NodeStatus {
            booted_image: Some(ImageDigestRef {
                name: Some("debian".into()),
                digest: Some("sha256:base".into()),
            }),
            ..NodeStatus::default()
        });
        node
    }

    #[test]
    fn validation_reasons() {
        let node = booted_node();
        let existing = Image::new("debian.v2", ImageSpec::default());
        let ok = validate(&save("debian:v2", false), Some(&node), None).expect("valid");
        assert_eq!(ok.image_object, "debian.v2");
        assert_eq!(ok.base.digest.as_deref(), Some("sha256:base"));
        assert!(!ok.exists);
        let reason = |result: Result<SaveTarget, Failure>| result.map_err(|failure| failure.reason()).err();
        assert_eq!(
            reason(validate(&save("debian:v2", false), None, None)),
            Some(reasons::NODE_NOT_FOUND)
        );
        let exists = validate(&save("debian:v2", false), Some(&node), Some(&existing)).unwrap_err();
        assert_eq!(exists.reason(), reasons::IMAGE_EXISTS);
        assert!(exists.to_string().contains("overwrite: true"), "{exists}");
        assert!(
            validate(&save("debian:v2", true), Some(&node), Some(&existing))
                .expect("valid")
                .exists
        );
        let fresh = Node::new("rpi1", NodeSpec::default());
        assert_eq!(
            reason(validate(&save("x", false), Some(&fresh), None)),
            Some(reasons::NODE_NOT_BOOTED)
        );
        let mut bad_pattern = save("x", false);
        bad_pattern.spec.exclude = vec!["[".into()];
        assert_eq!(
            reason(validate(&bad_pattern, Some(&node), None)),
            Some(reasons::INVALID_EXCLUDE)
        );
        assert_eq!(
            reason(validate(&save("Bad_Name", false), Some(&node), None)),
            Some(reasons::INVALID_IMAGE_NAME)
        );
    }

    #[test]
    fn milestones_and_helpers() {
        assert_eq!(milestone_crossed(0, 10), None);
        assert_eq!(milestone_crossed(10, MILESTONE_BYTES), Some(MILESTONE_BYTES));
        assert_eq!(
            milestone_crossed(MILESTONE_BYTES - 1, 3 * MILESTONE_BYTES + 5),
            Some(3 * MILESTONE_BYTES)
        );
        assert_eq!(milestone_crossed(MILESTONE_BYTES, MILESTONE_BYTES + 1), None);
        let boots = |image: Option<&str>| {
            Node::new(
                "n",
                NodeSpec {
                    image: image.map(str::to_owned),
                    ..NodeSpec::default()
                },
            )
        };
        let nodes = [
            boots(Some("debian")),
            boots(Some("debian:latest")),
            boots(Some("debian:v2")),
            boots(None),
        ];
        assert_eq!(nodes_booting(&nodes, "debian"), 2);
        assert_eq!(nodes_booting(&nodes, "debian.v2"), 1);
        let s = save("debian:v2", false);
        let t = Timestamp::from_second(5).expect("time");
        let waiting = pending_status(&s, "WaitingForSlot", "2 saves run", t);
        assert!(same_wait(
            Some(&waiting),
            &pending_status(&s, "WaitingForSlot", "2 saves run", t)
        ));
        assert!(!same_wait(
            Some(&waiting),
            &pending_status(&s, "ImageBusy", "x", t)
        ));
        assert!(!same_wait(None, &waiting));
        let pushing = pushing_status(&s, Progress { bytes: 1, files: 1 }, t);
        assert_eq!(pushing.phase, NodeSavePhase::Pushing);
    }

    #[test]
    fn lifecycle_statuses() {
        let mut s = save("debian:v2", false);
        let target = validate(&s, Some(&booted_node()), None).expect("valid");
        let t0 = Timestamp::from_second(100).expect("time");
        let running = running_status(&s, &target, Progress { bytes: 10, files: 2 }, t0);
        assert_eq!(running.phase, NodeSavePhase::Running);
        assert_eq!(running.start_time, Some(Time(t0)));
        s.status = Some(running);
        let outcome = SaveOutcome {
            reference: "reg/alice/debian:v2".into(),
            digest: "sha256:new".into(),
            layer_digest: "sha256:layer".into(),
            layer_size: 99,
            changes: Changes {
                added: 1,
                ..Changes::default()
            },
        };
        let t1 = Timestamp::from_second(172).expect("time");
        let done = succeeded_status(&s, &outcome, 2, t1);
        assert_eq!(done.phase, NodeSavePhase::Succeeded);
        assert_eq!(done.duration.as_deref(), Some("1m12s"));
        assert_eq!(done.result.as_ref().and_then(|r| r.layer_size), Some(99));
        let complete = find_condition(&done.conditions, "Complete").expect("Complete");
        assert!(
            complete.message.contains("rebooting 2 node(s)"),
            "{}",
            complete.message
        );
        let failed = failed_status(&s, "NodeUnreachable", "connection refused", t1);
        assert_eq!(failed.phase, NodeSavePhase::Failed);
        let complete = find_condition(&failed.conditions, "Complete").expect("Complete");
        assert_eq!(complete.reason, "NodeUnreachable");
        assert!(complete.message.ends_with("(no tag was moved)"));
    }
}
