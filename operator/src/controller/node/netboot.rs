//! Devices walt network-boots (a Device with `firmware`): the booted image is observed, not assumed.
//! After [`super::decide::decide`] judged the SSH probe, [`judge`] (pure) reads what the boot service
//! saw of the device's latest boot (the digest it mounted, the digest the booted node reported):
//! `status.bootedImage` is set only when both agree (condition `ImageVerified`), and the boot
//! watchdog retries a boot that sends no notification in time (WalT's 180 s, 9 retries).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use walt_crds::{
    ConditionStatus, ImageDigestRef, Node, NodeBoot, NodePhase, condition_types, find_condition,
};

use super::BootTarget;
use super::decide::{Decision, Effect};
use crate::boot::state::{BootRecord, Mac};
use crate::boot::verify::{self, Verdict};
use crate::controller::shared::context::set_condition_at;

/// WalT's boot timeout: a boot that sends no notification within it is retried.
pub const BOOT_TIMEOUT: Duration = Duration::from_mins(3);
/// WalT's boot retries: then the watchdog gives up.
pub const BOOT_RETRIES: u32 = 9;

/// `Booted=False`: no boot notification within the timeout; retried.
pub const BOOT_TIMEOUT_REASON: &str = "BootTimeout";
/// `Booted=False`: no boot notification after all the retries.
pub const BOOT_FAILED: &str = "BootFailed";
/// `ImageVerified=Unknown`: the boot service could not be asked.
pub const BOOT_SERVICE_UNREACHABLE: &str = "BootServiceUnreachable";

/// What the boot service said of the device.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    /// Its record of the device (a default one: it saw nothing of it).
    Record(BootRecord),
    /// It could not be asked.
    Unreachable(String),
}

/// The watchdog's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watchdog {
    /// How long a boot may take to notify.
    pub timeout: Duration,
    /// Retries before giving up.
    pub retries: u32,
}

impl Default for Watchdog {
    fn default() -> Self {
        Self {
            timeout: BOOT_TIMEOUT,
            retries: BOOT_RETRIES,
        }
    }
}

/// The watchdog's step for a boot (pure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to watch: no boot in progress, or it notified.
    Idle,
    /// Waiting for the notification, this much longer at most.
    Wait(Duration),
    /// Timed out: retry (this is retry number n).
    Retry(u32),
    /// Timed out after all the retries.
    GiveUp,
}

/// What the watchdog does about a boot started at `started` (`None`: none known), retried
/// `retries` times so far, notified or not (pure).
pub fn watchdog_step(
    started: Option<Timestamp>,
    notified: bool,
    retries: u32,
    now: Timestamp,
    settings: Watchdog,
) -> Step {
    let Some(started) = started else {
        return Step::Idle;
    };
    if notified {
        return Step::Idle;
    }
    let elapsed = now.duration_since(started).unsigned_abs();
    if let Some(left) = settings
        .timeout
        .checked_sub(elapsed)
        .filter(|left| !left.is_zero())
    {
        Step::Wait(left)
    } else if retries < settings.retries {
        Step::Retry(retries + 1)
    } else {
        Step::GiveUp
    }
}

/// The boot records URL of `network` among `NETWORK=URL` entries (a bare URL is the `default`
/// network's) (pure).
pub fn status_url<'a>(entries: &'a [String], network: &str) -> Option<&'a str> {
    entries.iter().find_map(|entry| {
        let entry = entry.trim();
        match entry.split_once('=') {
            Some((name, url)) if !name.contains('/') => (name.trim() == network).then_some(url.trim()),
            _ => (network == "default" && !entry.is_empty()).then_some(entry),
        }
    })
}

/// The record of the device with this MAC among the boot service's (pure; MACs compared as
/// addresses, whatever their case or separators); an empty one when it saw nothing of it.
pub fn record_of(records: &[BootRecord], mac: &str) -> BootRecord {
    let wanted = mac.parse::<Mac>().ok();
    records
        .iter()
        .find(|r| wanted.is_some() && r.mac.parse::<Mac>().ok() == wanted)
        .cloned()
        .unwrap_or_else(|| BootRecord {
            mac: mac.to_string(),
            ..BootRecord::default()
        })
}

fn millis(ms: u64) -> Option<Timestamp> {
    Timestamp::from_millisecond(i64::try_from(ms).ok()?).ok()
}

/// The image a verified digest is (pure): the target's name when it is the target's digest, else
/// the name recorded before for that digest, else none (the node then reboots into its target).
fn booted_image(
    digest: &str,
    target: Option<&BootTarget>,
    before: Option<&ImageDigestRef>,
) -> ImageDigestRef {
    let name = match (target, before) {
        (Some(target), _) if target.digest == digest => Some(target.name.clone()),
        (_, Some(before)) if before.digest.as_deref() == Some(digest) => before.name.clone(),
        _ => None,
    };
    ImageDigestRef {
        name,
        digest: Some(digest.to_string()),
    }
}

/// Completes `decision` for a device walt network-boots (pure): the verdict on its latest boot,
/// `bootedImage` from it, and the boot watchdog. `reachable`: a retry can restart the node (the
/// probe reached it over SSH, or it is a VM node, power-cycled: [`super::probe::can_restart`]);
/// else the Event asks for a power cycle.
pub fn judge(
    node: &Node,
    decision: &mut Decision,
    target: Option<&BootTarget>,
    seen: &Seen,
    reachable: bool,
    now: Timestamp,
    settings: Watchdog,
) {
    let record = match seen {
        Seen::Record(record) => record,
        Seen::Unreachable(message) => {
            // Nothing new is known: only a digest verified before stays the booted image.
            let verified = decision
                .status
                .boot
                .as_ref()
                .filter(|b| b.served.is_some() && b.served == b.reported)
                .and_then(|b| b.served.clone());
            if decision
                .status
                .booted_image
                .as_ref()
                .and_then(|b| b.digest.clone())
                != verified
            {
                decision.status.booted_image = None;
            }
            set_condition_at(
                &mut decision.status.conditions,
                node,
                condition_types::IMAGE_VERIFIED,
                ConditionStatus::Unknown,
                BOOT_SERVICE_UNREACHABLE,
                message.clone(),
                now,
            );
            return;
        }
    };
    let verdict = verify::verify(record);
    let rebooting = decision.effects.contains(&Effect::Reboot);
    // A reboot the operator sent and the probe has not seen happen yet: the record may still be the
    // former boot's, so it says nothing of the boot to come (seen: a probe failing while the node went
    // down read the record of the image it was leaving, verified, as its booted image, and the next
    // reconcile rebooted the node a second time).
    let awaiting_restart = decision.status.phase == NodePhase::Rebooting;
    let before = decision.status.boot.clone().unwrap_or_default();
    let mounted_at = record.mounted_at_ms.and_then(millis);
    let mut boot = NodeBoot {
        served: record.mounted.clone(),
        reported: record.reported.clone(),
        started_at: before.started_at.clone(),
        retries: before.retries,
    };
    if rebooting {
        // A new boot the operator asked for: watched from now, retries counted afresh.
        boot.started_at = Some(Time(now));
        boot.retries = 0;
    } else if let Some(mounted) = mounted_at
        && boot.started_at.as_ref().is_none_or(|started| started.0 < mounted)
    {
        // The device booted by itself (power on, its own reboot): watched from its mount.
        boot.started_at = Some(Time(mounted));
    }
    set_verdict(
        node,
        decision,
        &verdict,
        target,
        rebooting || awaiting_restart,
        now,
    );
    let notified = record.notified && !rebooting && !awaiting_restart;
    let step = watchdog_step(
        boot.started_at.as_ref().map(|t| t.0),
        notified,
        boot.retries,
        now,
        settings,
    );
    watch(node, decision, &mut boot, step, reachable, settings, now);
    decision.status.boot = Some(boot);
}

fn set_verdict(
    node: &Node,
    decision: &mut Decision,
    verdict: &Verdict,
    target: Option<&BootTarget>,
    rebooting: bool,
    now: Timestamp,
) {
    let status = &mut decision.status;
    let previous =
        find_condition(&status.conditions, condition_types::IMAGE_VERIFIED).map(|c| c.reason.clone());
    let (state, reason, message) = if rebooting {
        (
            ConditionStatus::False,
            verify::NOT_NOTIFIED,
            "rebooting: waiting for the boot notification".to_string(),
        )
    } else if verdict.verified() {
        (ConditionStatus::True, verdict.reason, verdict.message.clone())
    } else {
        (ConditionStatus::False, verdict.reason, verdict.message.clone())
    };
    set_condition_at(
        &mut status.conditions,
        node,
        condition_types::IMAGE_VERIFIED,
        state,
        reason,
        message,
        now,
    );
    status.booted_image = match (&verdict.digest, rebooting) {
        (Some(digest), false) => Some(booted_image(digest, target, status.booted_image.as_ref())),
        _ => None,
    };
    if verdict.reason == verify::DIGEST_MISMATCH
        && !rebooting
        && previous.as_deref() != Some(verify::DIGEST_MISMATCH)
    {
        decision.effects.push(Effect::Event {
            type_: EventType::Warning,
            reason: verify::DIGEST_MISMATCH,
            action: "Verify",
            note: verdict.message.clone(),
        });
    }
}

fn watch(
    node: &Node,
    decision: &mut Decision,
    boot: &mut NodeBoot,
    step: Step,
    reachable: bool,
    settings: Watchdog,
    now: Timestamp,
) {
    match step {
        Step::Idle => {}
        Step::Wait(left) => decision.requeue = decision.requeue.min(left.max(Duration::from_secs(1))),
        Step::Retry(retry) => {
            boot.retries = retry;
            boot.started_at = Some(Time(now));
            let what = if reachable && walt_crds::is_vm(node) {
                decision.effects.push(Effect::Reboot);
                "power-cycling the VM"
            } else if reachable {
                decision.effects.push(Effect::Reboot);
                "rebooting it"
            } else {
                "power-cycle the device (it does not answer over SSH)"
            };
            let message = format!(
                "no boot notification within {} s: {what} (retry {retry} of {})",
                settings.timeout.as_secs(),
                settings.retries
            );
            set_condition_at(
                &mut decision.status.conditions,
                node,
                condition_types::BOOTED,
                ConditionStatus::False,
                BOOT_TIMEOUT_REASON,
                message.clone(),
                now,
            );
            decision.effects.push(Effect::Event {
                type_: EventType::Warning,
                reason: BOOT_TIMEOUT_REASON,
                action: "Watchdog",
                note: message,
            });
            decision.requeue = decision.requeue.min(settings.timeout);
        }
        Step::GiveUp => {
            let failed_before = find_condition(&decision.status.conditions, condition_types::BOOTED)
                .is_some_and(|c| c.reason == BOOT_FAILED);
            let message = format!(
                "no boot notification after {} retries of {} s: check the device's console and its image (does it have /bin/busybox and sshd?), then `kubectl walt node reboot`",
                settings.retries,
                settings.timeout.as_secs()
            );
            set_condition_at(
                &mut decision.status.conditions,
                node,
                condition_types::BOOTED,
                ConditionStatus::False,
                BOOT_FAILED,
                message.clone(),
                now,
            );
            if !failed_before {
                decision.effects.push(Effect::Event {
                    type_: EventType::Warning,
                    reason: BOOT_FAILED,
                    action: "Watchdog",
                    note: message,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{NodeSpec, NodeStatus};

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("time")
    }

    fn node() -> Node {
        Node::new(
            "pc1",
            NodeSpec {
                device: Some("pc1".into()),
                ..NodeSpec::default()
            },
        )
    }

    fn target(digest: &str) -> BootTarget {
        BootTarget {
            name: "debian".into(),
            digest: digest.into(),
            pinned: format!("r/debian@{digest}"),
            no_reboot: false,
        }
    }

    fn record(mounted: &str, at_second: u64, reported: Option<&str>) -> Seen {
        Seen::Record(BootRecord {
            mac: "52:54:00:00:00:01".into(),
            served: Some(mounted.into()),
            mounted: Some(mounted.into()),
            mounted_at_ms: Some(at_second * 1000),
            notified: reported.is_some(),
            reported: reported.map(str::to_string),
            ..BootRecord::default()
        })
    }

    fn decision(status: NodeStatus) -> Decision {
        Decision {
            status,
            effects: Vec::new(),
            requeue: Duration::from_mins(1),
        }
    }

    fn condition<'a>(decision: &'a Decision, type_: &str) -> (&'a str, &'a str) {
        find_condition(&decision.status.conditions, type_)
            .map_or(("", ""), |c| (c.status.as_str(), c.reason.as_str()))
    }

    fn events(decision: &Decision) -> Vec<&'static str> {
        decision
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Event { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_watchdog_waits_retries_then_gives_up() {
        let settings = Watchdog::default();
        assert_eq!(watchdog_step(None, false, 0, at(1000), settings), Step::Idle);
        assert_eq!(
            watchdog_step(Some(at(1000)), true, 0, at(5000), settings),
            Step::Idle
        );
        assert_eq!(
            watchdog_step(Some(at(1000)), false, 0, at(1100), settings),
            Step::Wait(Duration::from_secs(80))
        );
        assert_eq!(
            watchdog_step(Some(at(1000)), false, 0, at(1180), settings),
            Step::Retry(1)
        );
        assert_eq!(
            watchdog_step(Some(at(1000)), false, 8, at(1200), settings),
            Step::Retry(9)
        );
        assert_eq!(
            watchdog_step(Some(at(1000)), false, 9, at(1200), settings),
            Step::GiveUp
        );
    }

    #[test]
    fn the_booted_image_is_set_only_when_served_and_reported_agree() {
        let mut d = decision(NodeStatus::default());
        judge(
            &node(),
            &mut d,
            Some(&target("sha256:a")),
            &record("sha256:a", 1000, Some("sha256:a")),
            true,
            at(1010),
            Watchdog::default(),
        );
        assert_eq!(
            condition(&d, condition_types::IMAGE_VERIFIED),
            ("True", verify::VERIFIED)
        );
        assert_eq!(
            d.status.booted_image,
            Some(ImageDigestRef {
                name: Some("debian".into()),
                digest: Some("sha256:a".into())
            })
        );
        let boot = d.status.boot.clone().expect("boot");
        assert_eq!(
            (boot.served.as_deref(), boot.reported.as_deref()),
            (Some("sha256:a"), Some("sha256:a"))
        );

        let mut d = decision(d.status);
        judge(
            &node(),
            &mut d,
            Some(&target("sha256:a")),
            &record("sha256:a", 2000, Some("sha256:b")),
            true,
            at(2010),
            Watchdog::default(),
        );
        assert_eq!(
            condition(&d, condition_types::IMAGE_VERIFIED),
            ("False", verify::DIGEST_MISMATCH)
        );
        assert_eq!(d.status.booted_image, None, "a mismatch is not a booted image");
        assert_eq!(events(&d), vec![verify::DIGEST_MISMATCH]);
        let mut again = decision(d.status);
        judge(
            &node(),
            &mut again,
            Some(&target("sha256:a")),
            &record("sha256:a", 2000, Some("sha256:b")),
            true,
            at(2070),
            Watchdog::default(),
        );
        assert!(events(&again).is_empty(), "the mismatch Event is published once");
    }

    #[test]
    fn the_former_boots_record_is_not_taken_for_the_boot_a_reboot_awaits() {
        // Rebooted to boot sha256:new; the probe failed while the node went down, and the boot service
        // still has the record of the boot it left (sha256:old, verified).
        let status = NodeStatus {
            phase: NodePhase::Rebooting,
            boot: Some(NodeBoot {
                started_at: Some(Time(at(2000))),
                ..NodeBoot::default()
            }),
            ..NodeStatus::default()
        };
        let mut d = decision(status);
        judge(
            &node(),
            &mut d,
            Some(&target("sha256:new")),
            &record("sha256:old", 1000, Some("sha256:old")),
            true,
            at(2005),
            Watchdog::default(),
        );
        assert_eq!(
            d.status.booted_image, None,
            "not the old digest: it would reboot the node again"
        );
        assert_eq!(
            condition(&d, condition_types::IMAGE_VERIFIED),
            ("False", verify::NOT_NOTIFIED)
        );
        assert!(!d.effects.contains(&Effect::Reboot));
        // Once the probe has seen the node restarted (phase no longer Rebooting), its new boot counts.
        let mut status = d.status;
        status.phase = NodePhase::Ready;
        let mut d = decision(status);
        judge(
            &node(),
            &mut d,
            Some(&target("sha256:new")),
            &record("sha256:new", 2010, Some("sha256:new")),
            true,
            at(2020),
            Watchdog::default(),
        );
        assert_eq!(
            d.status.booted_image.and_then(|b| b.digest),
            Some("sha256:new".to_owned())
        );
    }

    #[test]
    fn a_digest_that_is_not_the_target_keeps_no_name_so_the_node_reboots_into_its_target() {
        let image = booted_image("sha256:old", Some(&target("sha256:new")), None);
        assert_eq!(image.name, None);
        assert!(super::super::needs_reboot(Some(&image), &target("sha256:new")));
    }

    #[test]
    fn a_silent_boot_is_retried_by_reboot_and_then_given_up() {
        let settings = Watchdog::default();
        let mut d = decision(NodeStatus::default());
        judge(
            &node(),
            &mut d,
            None,
            &record("sha256:a", 1000, None),
            true,
            at(1150),
            settings,
        );
        assert_eq!(
            condition(&d, condition_types::IMAGE_VERIFIED),
            ("False", verify::NOT_NOTIFIED)
        );
        assert_eq!(
            d.requeue,
            Duration::from_secs(30),
            "looks again when the timeout is due"
        );
        assert!(!d.effects.contains(&Effect::Reboot));

        let mut d = decision(d.status);
        judge(
            &node(),
            &mut d,
            None,
            &record("sha256:a", 1000, None),
            true,
            at(1180),
            settings,
        );
        assert!(d.effects.contains(&Effect::Reboot), "retried by a reboot");
        assert_eq!(
            condition(&d, condition_types::BOOTED),
            ("False", BOOT_TIMEOUT_REASON)
        );
        assert_eq!(events(&d), vec![BOOT_TIMEOUT_REASON]);
        assert_eq!(d.status.boot.as_ref().map(|b| b.retries), Some(1));

        let mut status = d.status;
        if let Some(boot) = status.boot.as_mut() {
            boot.retries = 9;
        }
        let mut d = decision(status);
        judge(
            &node(),
            &mut d,
            None,
            &record("sha256:a", 1000, None),
            false,
            at(1400),
            settings,
        );
        assert_eq!(condition(&d, condition_types::BOOTED), ("False", BOOT_FAILED));
        assert!(!d.effects.contains(&Effect::Reboot));
        assert_eq!(events(&d), vec![BOOT_FAILED]);
    }

    #[test]
    fn an_unreachable_device_is_asked_to_be_power_cycled() {
        let mut d = decision(NodeStatus::default());
        judge(
            &node(),
            &mut d,
            None,
            &record("sha256:a", 1000, None),
            false,
            at(1200),
            Watchdog::default(),
        );
        assert!(!d.effects.contains(&Effect::Reboot));
        let message = find_condition(&d.status.conditions, condition_types::BOOTED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(message.contains("power-cycle"), "{message}");
    }

    #[test]
    fn a_hung_vm_node_is_power_cycled_by_the_watchdog() {
        let mut vm = node();
        vm.spec.virtual_node = Some(walt_crds::VirtualNode {
            kind: walt_crds::VirtualKind::Vm,
            ..walt_crds::VirtualNode::default()
        });
        // It does not answer over SSH, yet the operator can restart it: a power cycle.
        let restart = super::super::probe::can_restart(&vm, false);
        assert!(restart);
        assert!(!super::super::probe::can_restart(&node(), false));
        let mut d = decision(NodeStatus::default());
        judge(
            &vm,
            &mut d,
            None,
            &record("sha256:a", 1000, None),
            restart,
            at(1200),
            Watchdog::default(),
        );
        assert!(d.effects.contains(&Effect::Reboot));
        let message = find_condition(&d.status.conditions, condition_types::BOOTED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(
            message.contains("power-cycling the VM (retry 1 of 9)"),
            "{message}"
        );
    }

    #[test]
    fn a_reboot_the_operator_sends_starts_a_watched_boot() {
        let mut d = decision(NodeStatus {
            boot: Some(NodeBoot {
                retries: 3,
                ..NodeBoot::default()
            }),
            ..NodeStatus::default()
        });
        d.effects.push(Effect::Reboot);
        judge(
            &node(),
            &mut d,
            Some(&target("sha256:b")),
            &record("sha256:a", 1000, Some("sha256:a")),
            true,
            at(2000),
            Watchdog::default(),
        );
        let boot = d.status.boot.clone().expect("boot");
        assert_eq!(boot.retries, 0);
        assert_eq!(boot.started_at, Some(Time(at(2000))));
        assert_eq!(
            d.status.booted_image, None,
            "not known until the new boot notifies"
        );
        assert_eq!(
            condition(&d, condition_types::IMAGE_VERIFIED),
            ("False", verify::NOT_NOTIFIED)
        );
    }

    #[test]
    fn each_network_has_its_boot_service() {
        let entries = vec![
            "http://10.0.0.1:9470".to_string(),
            "lab2=http://10.0.2.1:9470".to_string(),
        ];
        assert_eq!(status_url(&entries, "default"), Some("http://10.0.0.1:9470"));
        assert_eq!(status_url(&entries, "lab2"), Some("http://10.0.2.1:9470"));
        assert_eq!(status_url(&entries, "lab3"), None);
        assert_eq!(status_url(&[], "default"), None);
    }

    #[test]
    fn records_are_found_by_mac_whatever_its_spelling() {
        let records = vec![BootRecord {
            mac: "52:54:00:aa:00:01".into(),
            mounted: Some("sha256:a".into()),
            ..BootRecord::default()
        }];
        assert_eq!(
            record_of(&records, "52-54-00-AA-00-01").mounted.as_deref(),
            Some("sha256:a")
        );
        assert_eq!(record_of(&records, "52:54:00:aa:00:02").mounted, None);
        assert_eq!(record_of(&records, "not a mac").mounted, None);
    }

    #[test]
    fn an_unreachable_boot_service_leaves_the_verdict_unknown() {
        let verified = |digest: &str| ImageDigestRef {
            name: Some("debian".into()),
            digest: Some(digest.into()),
        };
        let mut d = decision(NodeStatus {
            booted_image: Some(verified("sha256:a")),
            boot: Some(NodeBoot {
                served: Some("sha256:a".into()),
                reported: Some("sha256:a".into()),
                ..NodeBoot::default()
            }),
            ..NodeStatus::default()
        });
        judge(
            &node(),
            &mut d,
            None,
            &Seen::Unreachable("connection refused".into()),
            true,
            at(1),
            Watchdog::default(),
        );
        assert_eq!(
            d.status.booted_image,
            Some(verified("sha256:a")),
            "verified before: kept"
        );
        let mut d = decision(NodeStatus {
            booted_image: Some(verified("sha256:b")),
            ..NodeStatus::default()
        });
        judge(
            &node(),
            &mut d,
            None,
            &Seen::Unreachable("connection refused".into()),
            true,
            at(1),
            Watchdog::default(),
        );
        assert_eq!(
            condition(&d, condition_types::IMAGE_VERIFIED),
            ("Unknown", BOOT_SERVICE_UNREACHABLE)
        );
        assert_eq!(
            d.status.booted_image, None,
            "an assumed image is not a booted one"
        );
    }
}
