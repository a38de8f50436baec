//! The pure decision of a NodeSave that is not running in this process: from the NodeSave, its Node,
//! the Image it would overwrite (unless this very save wrote it) and the claims on images of the
//! namespace, [`decide`] says whether it starts, waits (and why) or fails for good. And, for a save
//! running in this process whose status write the API server refused (the NodeSave changed since the
//! task's last own write), [`after_refusal`] says whether the task writes again or stops.

use walt_crds::{Image, Node, NodePhase, NodeSave, NodeSaveStatus, condition_types, find_condition};

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

/// Which of a save task's status writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskWrite {
    /// Its progress: `Running` with the bytes read, `Pushing` before the tag moves.
    Progress,
    /// Its end: `Succeeded` or `Failed` (the tag moved or not: a fact of this run).
    End,
}

/// What a save task does after the API server refused its status write because the NodeSave changed
/// since the task's last own write.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The NodeSave already holds the status the task meant to write (its own write whose answer was
    /// lost, the API server restarting): nothing to write.
    Landed,
    /// Only what the task's decision does not depend on changed (metadata, or the task's own write
    /// whose answer was lost): write again onto the current version.
    WriteAgain,
    /// Someone else decided meanwhile: the task stops, writes nothing more and moves no tag (why).
    Stop(String),
}

/// Decides what a save task does when its status write was refused (pure). `uid` is the NodeSave
/// the task runs for, `ours` the statuses the task wrote or tried to write last, `wanted` the status
/// refused, `current` the NodeSave as read again. A save deleted (or replaced by another of its name),
/// or ended by another writer, stops: an end is never overwritten, a save ended elsewhere is never
/// published. A progress write also stops when another writer wrote a status of its own (a second
/// replica that took the save over runs it: only one run goes on, never two publishing). The end of
/// a run is written onto any unfinished status: the tag moved (or not), that is a fact, and it tells
/// another run still going to stop at its next write.
pub fn after_refusal(
    uid: &str,
    ours: &[&NodeSaveStatus],
    wanted: &NodeSaveStatus,
    current: Option<&NodeSave>,
    write: TaskWrite,
) -> Refusal {
    let Some(current) = current.filter(|current| {
        current.metadata.uid.as_deref() == Some(uid) && current.metadata.deletion_timestamp.is_none()
    }) else {
        return Refusal::Stop("the NodeSave was deleted".into());
    };
    let default = NodeSaveStatus::default();
    let status = current.status.as_ref().unwrap_or(&default);
    if same_status(status, wanted) {
        return Refusal::Landed;
    }
    if status.phase.is_finished() {
        let said = find_condition(&status.conditions, condition_types::COMPLETE)
            .map(|complete| format!(" ({}: {})", complete.reason, complete.message))
            .unwrap_or_default();
        return Refusal::Stop(format!(
            "another writer ended it meanwhile: {:?}{said}",
            status.phase
        ));
    }
    if write == TaskWrite::End || ours.iter().any(|ours| same_status(status, ours)) {
        return Refusal::WriteAgain;
    }
    Refusal::Stop(format!(
        "another writer wrote its status meanwhile ({:?}, another run of this save?): that run goes on, this one stops",
        status.phase
    ))
}

/// Whether two statuses say the same as written to the API server (pure): compared as JSON, so a
/// status read back equals the one written, whatever precision its times had in memory.
fn same_status(left: &NodeSaveStatus, right: &NodeSaveStatus) -> bool {
    serde_json::to_value(left).ok() == serde_json::to_value(right).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{ImageDigestRef, NodeSavePhase, NodeSaveSpec, NodeSpec, NodeStatus, Progress};

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

    fn running(bytes: u64) -> NodeSaveStatus {
        NodeSaveStatus {
            phase: NodeSavePhase::Running,
            progress: Some(Progress { bytes, files: 1 }),
            ..NodeSaveStatus::default()
        }
    }

    fn with_status(status: NodeSaveStatus) -> NodeSave {
        let mut current = save();
        current.metadata.uid = Some("u1".into());
        current.status = Some(status);
        current
    }

    #[test]
    fn a_refused_progress_write_goes_on_only_over_its_own_status() {
        let (last, wanted) = (running(10), running(20));
        let ours = [&last];
        // A label or annotation written meanwhile: the status is still the task's own.
        let current = with_status(running(10));
        let refusal = after_refusal("u1", &ours, &wanted, Some(&current), TaskWrite::Progress);
        assert_eq!(refusal, Refusal::WriteAgain);
        // The task's own write landed, its answer lost.
        let current = with_status(running(20));
        let refusal = after_refusal("u1", &ours, &wanted, Some(&current), TaskWrite::Progress);
        assert_eq!(refusal, Refusal::Landed);
        // Another run (a second replica) wrote its own progress: this one stops.
        let current = with_status(running(3));
        let refusal = after_refusal("u1", &ours, &wanted, Some(&current), TaskWrite::Progress);
        assert!(
            matches!(refusal, Refusal::Stop(ref why) if why.contains("another run")),
            "{refusal:?}"
        );
        // The end of it is written over another run's progress (that run stops at its next write).
        let ended = NodeSaveStatus {
            phase: NodeSavePhase::Succeeded,
            ..NodeSaveStatus::default()
        };
        let refusal = after_refusal("u1", &ours, &ended, Some(&current), TaskWrite::End);
        assert_eq!(refusal, Refusal::WriteAgain);
    }

    #[test]
    fn a_save_ended_or_deleted_meanwhile_stops_its_task_even_at_its_end() {
        let last = running(10);
        let ours = [&last];
        let failed = NodeSaveStatus {
            phase: NodeSavePhase::Failed,
            ..NodeSaveStatus::default()
        };
        let succeeded = NodeSaveStatus {
            phase: NodeSavePhase::Succeeded,
            ..NodeSaveStatus::default()
        };
        let current = with_status(failed);
        for write in [TaskWrite::Progress, TaskWrite::End] {
            let refusal = after_refusal("u1", &ours, &succeeded, Some(&current), write);
            assert!(
                matches!(refusal, Refusal::Stop(ref why) if why.contains("ended it meanwhile: Failed")),
                "{refusal:?}"
            );
        }
        let refusal = after_refusal("u1", &ours, &running(20), None, TaskWrite::Progress);
        assert_eq!(refusal, Refusal::Stop("the NodeSave was deleted".into()));
        let refusal = after_refusal("u2", &ours, &running(20), Some(&current), TaskWrite::End);
        assert_eq!(
            refusal,
            Refusal::Stop("the NodeSave was deleted".into()),
            "another NodeSave of the same name"
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
