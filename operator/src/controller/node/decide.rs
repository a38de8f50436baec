//! The pure decision of a physical node's reconcile: from what the probe observed (did SSH connect,
//! the node's host key, uptime and ready marker), the Node, the image it should boot and the time,
//! [`decide`] returns the new status, the effects to carry out (reboot, Events, the handled request)
//! and when to look again. [`super::probe`] gathers the facts and carries out the effects.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use walt_crds::{
    ConditionStatus, ImageDigestRef, Node, NodePhase, NodeStatus, condition_types, find_condition,
};

use super::reasons;
use super::{BootTarget, needs_reboot, pending_reboot_request};
use crate::controller::shared::context::set_condition_at;

/// How long a rebooted node may keep answering from the boot before the reboot: past this, the
/// reboot is reported as not having happened.
pub const REBOOT_DEADLINE: Duration = Duration::from_mins(5);
/// How soon a node being rebooted, or booting, is probed again.
pub const REBOOT_POLL: Duration = Duration::from_secs(10);
/// How soon a node that still answers from before its reboot is probed again.
pub const GOING_DOWN_POLL: Duration = Duration::from_secs(2);

/// What the probe observed.
#[derive(Clone, Debug, PartialEq)]
pub enum Probe {
    /// SSH failed.
    Failed(SshFailure),
    /// SSH connected and the probe command ran (or failed to).
    Reached(Reached),
}

/// A failed SSH connection.
#[derive(Clone, Debug, PartialEq)]
pub struct SshFailure {
    /// Short reason (condition and Event reason).
    pub reason: &'static str,
    /// What SSH said.
    pub message: String,
    /// The node presented another host key than the pinned or recorded one.
    pub host_key_mismatch: bool,
}

/// A node that answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Reached {
    /// `user@host:port` it was reached at (for messages).
    pub target: String,
    /// Its host key, OpenSSH public key line.
    pub host_key: String,
    /// Its host key fingerprint (for the Event).
    pub fingerprint: String,
    /// Its `/proc/uptime`, when the probe command could read it.
    pub uptime: Option<Duration>,
    /// Whether the ready marker exists.
    pub booted: bool,
}

/// Something the reconcile carries out after deciding.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Reboot the node over the open SSH connection.
    Reboot,
    /// Record the reboot request with this value as handled (after the status is written, so a
    /// client that sees it handled does not read the `Ready` of before the reboot).
    MarkRebootHandled(String),
    /// Publish an Event about the Node.
    Event {
        /// Normal or Warning.
        type_: EventType,
        /// Its reason.
        reason: &'static str,
        /// Its action.
        action: &'static str,
        /// What happened.
        note: String,
    },
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status to write.
    pub status: NodeStatus,
    /// What to do, in order (the status is written after [`Effect::Reboot`] and before the rest).
    pub effects: Vec<Effect>,
    /// When to look again.
    pub requeue: Duration,
}

/// When the operator sent the reboot it waits for, if it waits for one (pure).
pub fn reboot_sent_at(status: &NodeStatus) -> Option<Timestamp> {
    if status.phase != NodePhase::Rebooting {
        return None;
    }
    find_condition(&status.conditions, condition_types::BOOTED)
        .filter(|condition| condition.status == "False" && condition.reason == reasons::REBOOTING)
        .map(|condition| condition.last_transition_time.0)
}

/// Whether a node that has been up for `uptime` (its `/proc/uptime`) restarted after a reboot sent
/// `since` ago (pure). A node answering right after the command, before it went down, has been up
/// for longer than that. An unreadable uptime cannot tell: the node is taken as restarted.
pub fn restarted_since(uptime: Option<Duration>, since: Duration) -> bool {
    uptime.is_none_or(|uptime| uptime < since)
}

/// How long to wait before probing again (pure): the probe interval while the node answers;
/// growing with the time it has been unreachable (a quarter of it), up to 10 minutes, so thousands
/// of dead nodes cost little.
pub fn probe_delay(status: &NodeStatus, interval: Duration, now: Timestamp) -> Duration {
    let unreachable_since = find_condition(&status.conditions, condition_types::REACHABLE)
        .filter(|condition| condition.status == "False")
        .map(|condition| {
            now.duration_since(condition.last_transition_time.0)
                .unsigned_abs()
        });
    match unreachable_since {
        Some(down_for) => (down_for / 4).clamp(interval, Duration::from_mins(10)),
        None => interval,
    }
}

/// Decides what a probe of a physical node means (pure). `status` is the Node's current status
/// (its observed generation and address already set).
pub fn decide(
    node: &Node,
    status: NodeStatus,
    target: Option<&BootTarget>,
    probe: &Probe,
    now: Timestamp,
    interval: Duration,
) -> Decision {
    let mut decision = Decision {
        status,
        effects: Vec::new(),
        requeue: interval,
    };
    match probe {
        Probe::Failed(failure) => unreachable(node, &mut decision, failure, now, interval),
        Probe::Reached(reached) => reached_node(node, &mut decision, target, reached, now, interval),
    }
    decision
}

fn set(
    status: &mut NodeStatus,
    node: &Node,
    type_: &str,
    state: ConditionStatus,
    reason: &str,
    message: String,
    now: Timestamp,
) {
    set_condition_at(&mut status.conditions, node, type_, state, reason, message, now);
}

fn unreachable(
    node: &Node,
    decision: &mut Decision,
    failure: &SshFailure,
    now: Timestamp,
    interval: Duration,
) {
    let status = &mut decision.status;
    let was_reachable = status.phase != NodePhase::Unreachable;
    // A node being rebooted is expected not to answer for a while, unless it answers with another key.
    if status.phase != NodePhase::Rebooting || failure.host_key_mismatch {
        status.phase = NodePhase::Unreachable;
    }
    set(
        status,
        node,
        condition_types::REACHABLE,
        ConditionStatus::False,
        failure.reason,
        failure.message.clone(),
        now,
    );
    if was_reachable || failure.host_key_mismatch {
        decision.effects.push(Effect::Event {
            type_: EventType::Warning,
            reason: failure.reason,
            action: "Probe",
            note: failure.message.clone(),
        });
    }
    decision.requeue = probe_delay(status, interval, now);
}

// A little long: the states of a reached node in the order they are checked (reboot requested,
// reboot not happened yet, not booted, booted on the wrong image, ready), each a short early return.
/// Decides what a node that answered over SSH needs.
fn reached_node(
    node: &Node,
    decision: &mut Decision,
    target: Option<&BootTarget>,
    reached: &Reached,
    now: Timestamp,
    interval: Duration,
) {
    record_host_key(decision, reached);
    let status = &mut decision.status;
    set(
        status,
        node,
        condition_types::REACHABLE,
        ConditionStatus::True,
        reasons::SSH_OK,
        format!("reached {}", reached.target),
        now,
    );
    status.last_seen = Some(Time(now));
    if let Some(requested) = pending_reboot_request(node) {
        mark_rebooting(
            status,
            node,
            format!("rebooted over SSH (requested at {requested}); waiting for it to come back"),
            now,
        );
        decision.effects.extend([
            Effect::Reboot,
            Effect::MarkRebootHandled(requested.clone()),
            rebooting_event(format!("reboot requested at {requested}: rebooting over SSH")),
        ]);
        decision.requeue = REBOOT_POLL;
        return;
    }
    if let Some(sent) = reboot_sent_at(status) {
        let since = now.duration_since(sent).unsigned_abs();
        if !restarted_since(reached.uptime, since) {
            still_going_down(node, decision, since, now, interval);
            return;
        }
    }
    let marker = &node.spec.overlay.ready_marker;
    if !reached.booted {
        status.phase = NodePhase::Booting;
        set(
            status,
            node,
            condition_types::BOOTED,
            ConditionStatus::False,
            reasons::NOT_BOOTED,
            format!("{marker} does not exist yet"),
            now,
        );
        decision.requeue = REBOOT_POLL;
        return;
    }
    set(
        status,
        node,
        condition_types::BOOTED,
        ConditionStatus::True,
        reasons::READY_MARKER,
        format!("{marker} exists"),
        now,
    );
    match target {
        Some(target) if needs_reboot(status.booted_image.as_ref(), target) => {
            let note = format!("rebooting to boot {} ({})", target.name, target.digest);
            mark_rebooting(status, node, note.clone(), now);
            status.booted_image = Some(booted(target));
            decision.effects.extend([Effect::Reboot, rebooting_event(note)]);
            decision.requeue = REBOOT_POLL;
        }
        Some(target) => {
            status.phase = NodePhase::Ready;
            // First contact: it boots what the lab serves for it now; a digest verified before the
            // target was known is the target's (needs_reboot said so): it gets the target's name.
            let image = status.booted_image.get_or_insert_with(|| booted(target));
            if image.name.is_none() {
                image.name = Some(target.name.clone());
            }
        }
        None => status.phase = NodePhase::Ready,
    }
}

/// Records the host key seen on first contact (enforced from then on); a key the Device pins is in
/// the status already (set by the probe before deciding).
fn record_host_key(decision: &mut Decision, reached: &Reached) {
    if decision.status.host_key.is_none() {
        decision.status.host_key = Some(reached.host_key.clone());
        decision.effects.push(Effect::Event {
            type_: EventType::Normal,
            reason: reasons::HOST_KEY_RECORDED,
            action: "Probe",
            note: format!("recorded host key {} (enforced from now on)", reached.fingerprint),
        });
    }
}

/// The node answered from the boot before the reboot: wait, or report that it never happened.
fn still_going_down(
    node: &Node,
    decision: &mut Decision,
    since: Duration,
    now: Timestamp,
    interval: Duration,
) {
    if since <= REBOOT_DEADLINE {
        decision.requeue = GOING_DOWN_POLL;
        return;
    }
    let message = format!(
        "the node still runs the boot from before the reboot sent {} s ago: check its console, or reboot it by hand",
        since.as_secs()
    );
    decision.status.phase = NodePhase::Unreachable;
    set(
        &mut decision.status,
        node,
        condition_types::BOOTED,
        ConditionStatus::False,
        reasons::REBOOT_NOT_HAPPENED,
        message.clone(),
        now,
    );
    decision.effects.push(Effect::Event {
        type_: EventType::Warning,
        reason: reasons::REBOOT_NOT_HAPPENED,
        action: "Reboot",
        note: message,
    });
    decision.requeue = interval;
}

/// Marks the node rebooting: phase `Rebooting`, `Booted=False` since now (the time the restart is
/// measured against: [`restarted_since`]).
pub(super) fn mark_rebooting(status: &mut NodeStatus, node: &Node, what: String, now: Timestamp) {
    status.phase = NodePhase::Rebooting;
    set(
        status,
        node,
        condition_types::BOOTED,
        ConditionStatus::False,
        reasons::REBOOTING,
        what,
        now,
    );
}

/// The facts of a reboot (or power cycle) already made, recorded on the Node's current status (pure):
/// phase `Rebooting`, the image it boots now, the `Booted` condition and the boot watchdog's start, as
/// `decided`; the rest of `current` is kept. What is written when the decision's own status write
/// found the Node overtaken ([`crate::controller::shared::error::Error::Stale`]): the stale decision
/// is not written, but a reboot done must stay recorded, or the next decision would reboot again.
pub fn reboot_recorded(mut current: NodeStatus, decided: &NodeStatus) -> NodeStatus {
    current.phase = decided.phase;
    current.booted_image.clone_from(&decided.booted_image);
    current.boot.clone_from(&decided.boot);
    if let Some(booted) = walt_crds::find_condition(&decided.conditions, condition_types::BOOTED) {
        walt_crds::set_condition(&mut current.conditions, booted.clone());
    }
    current
}

fn rebooting_event(note: String) -> Effect {
    Effect::Event {
        type_: EventType::Normal,
        reason: reasons::REBOOTING,
        action: "Reboot",
        note,
    }
}

fn booted(target: &BootTarget) -> ImageDigestRef {
    ImageDigestRef {
        name: Some(target.name.clone()),
        digest: Some(target.digest.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{NodeSpec, new_condition};

    const MINUTE: Duration = Duration::from_mins(1);

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("time")
    }

    fn node() -> Node {
        Node::new(
            "rpi1",
            NodeSpec {
                device: Some("rpi1".into()),
                ..NodeSpec::default()
            },
        )
    }

    fn reached(uptime_secs: u64, booted: bool) -> Probe {
        Probe::Reached(Reached {
            target: "root@10.0.0.5:22".into(),
            host_key: "ssh-ed25519 AAAA".into(),
            fingerprint: "SHA256:x".into(),
            uptime: Some(Duration::from_secs(uptime_secs)),
            booted,
        })
    }

    fn target(digest: &str) -> BootTarget {
        BootTarget {
            name: "debian".into(),
            digest: digest.into(),
            pinned: format!("r/debian@{digest}"),
            no_reboot: false,
        }
    }

    fn reasons_of(decision: &Decision) -> Vec<&'static str> {
        decision
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Event { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_first_contact_records_the_host_key_and_the_image_it_boots() {
        let decision = decide(
            &node(),
            NodeStatus::default(),
            Some(&target("sha256:a")),
            &reached(600, true),
            at(1000),
            MINUTE,
        );
        assert_eq!(decision.status.phase, NodePhase::Ready);
        assert_eq!(decision.status.host_key.as_deref(), Some("ssh-ed25519 AAAA"));
        assert_eq!(decision.status.booted_image, Some(booted(&target("sha256:a"))));
        assert_eq!(reasons_of(&decision), vec![reasons::HOST_KEY_RECORDED]);
        assert_eq!(decision.requeue, MINUTE);
    }

    #[test]
    fn a_node_without_its_ready_marker_is_booting() {
        let decision = decide(
            &node(),
            NodeStatus::default(),
            None,
            &reached(5, false),
            at(1000),
            MINUTE,
        );
        assert_eq!(decision.status.phase, NodePhase::Booting);
        assert_eq!(decision.requeue, REBOOT_POLL);
    }

    #[test]
    fn a_moved_digest_reboots_and_a_request_reboots_once() {
        let mut status = NodeStatus {
            phase: NodePhase::Ready,
            host_key: Some("ssh-ed25519 AAAA".into()),
            booted_image: Some(booted(&target("sha256:a"))),
            ..NodeStatus::default()
        };
        let decision = decide(
            &node(),
            status.clone(),
            Some(&target("sha256:b")),
            &reached(600, true),
            at(1000),
            MINUTE,
        );
        assert_eq!(decision.status.phase, NodePhase::Rebooting);
        assert_eq!(decision.effects.first(), Some(&Effect::Reboot));
        assert_eq!(reboot_sent_at(&decision.status), Some(at(1000)));

        let mut asked = node();
        asked.metadata.annotations =
            Some([(walt_crds::request::REBOOT.requested.to_owned(), "t1".to_owned())].into());
        status.booted_image = Some(booted(&target("sha256:b")));
        let decision = decide(
            &asked,
            status,
            Some(&target("sha256:b")),
            &reached(600, true),
            at(1000),
            MINUTE,
        );
        assert_eq!(decision.effects[0], Effect::Reboot);
        assert_eq!(decision.effects[1], Effect::MarkRebootHandled("t1".into()));
        assert_eq!(decision.status.phase, NodePhase::Rebooting);
    }

    #[test]
    fn a_reboot_done_is_recorded_on_the_newer_status_and_nothing_else_of_the_stale_decision() {
        let stale = NodeStatus {
            phase: NodePhase::Ready,
            host_key: Some("ssh-ed25519 AAAA".into()),
            booted_image: Some(booted(&target("sha256:a"))),
            address: Some("10.0.0.1".into()),
            ..NodeStatus::default()
        };
        let decision = decide(
            &node(),
            stale,
            Some(&target("sha256:b")),
            &reached(600, true),
            at(1000),
            MINUTE,
        );
        assert_eq!(decision.effects.first(), Some(&Effect::Reboot));
        // Another write changed the address meanwhile: kept; the reboot is recorded on top of it.
        let newer = NodeStatus {
            phase: NodePhase::Ready,
            booted_image: Some(booted(&target("sha256:a"))),
            address: Some("10.0.0.2".into()),
            ..NodeStatus::default()
        };
        let recorded = reboot_recorded(newer, &decision.status);
        assert_eq!(recorded.phase, NodePhase::Rebooting);
        assert_eq!(recorded.booted_image, Some(booted(&target("sha256:b"))));
        assert_eq!(recorded.address.as_deref(), Some("10.0.0.2"));
        assert_eq!(
            reboot_sent_at(&recorded),
            Some(at(1000)),
            "the restart is measured from it"
        );
    }

    #[test]
    fn a_node_answering_from_before_its_reboot_is_waited_for_then_reported() {
        let mut status = NodeStatus {
            host_key: Some("ssh-ed25519 AAAA".into()),
            ..NodeStatus::default()
        };
        mark_rebooting(&mut status, &node(), "rebooting".into(), at(1000));
        // 30 s later it still has been up for hours: going down.
        let waiting = decide(
            &node(),
            status.clone(),
            None,
            &reached(3 * 3600, true),
            at(1030),
            MINUTE,
        );
        assert_eq!(waiting.status.phase, NodePhase::Rebooting);
        assert_eq!(waiting.requeue, GOING_DOWN_POLL);
        assert!(reasons_of(&waiting).is_empty());
        // Past the deadline: it never rebooted.
        let late = decide(
            &node(),
            status.clone(),
            None,
            &reached(3 * 3600, true),
            at(1400),
            MINUTE,
        );
        assert_eq!(late.status.phase, NodePhase::Unreachable);
        assert_eq!(reasons_of(&late), vec![reasons::REBOOT_NOT_HAPPENED]);
        // Up for 20 s, 45 s after the reboot: it restarted and is Ready.
        let back = decide(&node(), status, None, &reached(20, true), at(1045), MINUTE);
        assert_eq!(back.status.phase, NodePhase::Ready);
    }

    #[test]
    fn an_unreachable_node_is_reported_once_and_a_rebooting_one_waits() {
        let failure = Probe::Failed(SshFailure {
            reason: "Unreachable",
            message: "no route".into(),
            host_key_mismatch: false,
        });
        let ready = NodeStatus {
            phase: NodePhase::Ready,
            ..NodeStatus::default()
        };
        let first = decide(&node(), ready, None, &failure, at(1000), MINUTE);
        assert_eq!(first.status.phase, NodePhase::Unreachable);
        assert_eq!(reasons_of(&first), vec!["Unreachable"]);
        let again = decide(&node(), first.status, None, &failure, at(1060), MINUTE);
        assert!(
            reasons_of(&again).is_empty(),
            "no second Event while it stays unreachable"
        );
        let rebooting = NodeStatus {
            phase: NodePhase::Rebooting,
            ..NodeStatus::default()
        };
        assert_eq!(
            decide(&node(), rebooting.clone(), None, &failure, at(1000), MINUTE)
                .status
                .phase,
            NodePhase::Rebooting
        );
        let mismatch = Probe::Failed(SshFailure {
            reason: "HostKeyMismatch",
            message: "other key".into(),
            host_key_mismatch: true,
        });
        let decision = decide(&node(), rebooting, None, &mismatch, at(1000), MINUTE);
        assert_eq!(decision.status.phase, NodePhase::Unreachable);
        assert_eq!(reasons_of(&decision), vec!["HostKeyMismatch"]);
    }

    #[test]
    fn a_reboot_counts_once_the_node_has_been_up_for_less_than_since_it_was_sent() {
        let second = Duration::from_secs(1);
        assert!(!restarted_since(Some(3 * 3600 * second), second));
        assert!(restarted_since(Some(20 * second), 45 * second));
        assert!(
            restarted_since(None, second),
            "no uptime: cannot tell, taken as restarted"
        );
    }

    #[test]
    fn unreachable_nodes_are_probed_less_and_less() {
        let now = at(100_000);
        let mut status = NodeStatus::default();
        assert_eq!(probe_delay(&status, MINUTE, now), MINUTE);
        let down = |seconds_ago: i64| {
            new_condition(
                condition_types::REACHABLE,
                ConditionStatus::False,
                "Unreachable",
                "x",
                None,
                Time(at(100_000 - seconds_ago)),
            )
        };
        status.conditions = vec![down(60)];
        assert_eq!(probe_delay(&status, MINUTE, now), MINUTE);
        status.conditions = vec![down(1200)];
        assert_eq!(probe_delay(&status, MINUTE, now), Duration::from_mins(5));
        status.conditions = vec![down(86_400)];
        assert_eq!(probe_delay(&status, MINUTE, now), Duration::from_mins(10));
    }
}
