//! Physical nodes: the SSH probe and the reboot, through the `ssh` module's
//! node client (the operator never speaks SSH itself).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{
    ConditionStatus, ImageDigestRef, Node, NodePhase, NodeStatus, condition_types, find_condition,
};

use super::context::Context;
use super::error::{Error, Result};
use super::node_reconcile::{
    BootTarget, condition as set, mark_reboot_handled, needs_reboot, pending_reboot_request, rebooting_event,
};
use crate::ssh::{ClientConfig, HostKeyPolicy, NodeClient, NodeTarget, SshError, Transport};

/// Reboots a node over SSH, detached, so the session ends cleanly first.
async fn reboot(client: &NodeClient, ssh_target: &NodeTarget) -> Result<()> {
    client
        .exec("(sleep 1; reboot) >/dev/null 2>&1 </dev/null &")
        .await
        .map(|_| ())
        .map_err(|error| Error::Ssh(format!("cannot reboot {ssh_target}: {error}")))
}

/// Reason of the `Booted=False` condition set when the operator reboots a node: its
/// `lastTransitionTime` is when the reboot was sent.
pub const REBOOTING_REASON: &str = "Rebooting";

/// How long a rebooted node may keep answering from the boot before the reboot: past this, the
/// reboot is reported as not having happened.
pub const REBOOT_DEADLINE: Duration = Duration::from_mins(5);

/// Marks the node rebooting: phase `Rebooting`, `Booted=False` since now (the time the restart is
/// measured against: [`restarted_since`]).
fn mark_rebooting(status: &mut NodeStatus, node: &Node, what: String) {
    status.phase = NodePhase::Rebooting;
    set(
        status,
        node,
        condition_types::BOOTED,
        ConditionStatus::False,
        REBOOTING_REASON,
        what,
    );
}

/// When the operator sent the reboot it waits for, if it waits for one (pure).
pub fn reboot_sent_at(status: &NodeStatus) -> Option<Timestamp> {
    if status.phase != NodePhase::Rebooting {
        return None;
    }
    find_condition(&status.conditions, condition_types::BOOTED)
        .filter(|condition| condition.status == "False" && condition.reason == REBOOTING_REASON)
        .map(|condition| condition.last_transition_time.0)
}

/// Whether a node that has been up for `uptime` (its `/proc/uptime`) restarted after a reboot sent
/// `since` ago (pure). A node answering right after the command, before it went down, has been up
/// for longer than that. An unreadable uptime cannot tell: the node is taken as restarted.
pub fn restarted_since(uptime: Option<Duration>, since: Duration) -> bool {
    uptime.is_none_or(|uptime| uptime < since)
}

/// How long to wait before probing again (pure): the probe interval while
/// the node answers; growing with the time it has been unreachable (a
/// quarter of it), up to 10 minutes, so thousands of dead nodes cost little.
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

/// The SSH client configuration for a node (host key pinned by the spec,
/// else the recorded one, else trust on first use and record it).
pub fn client_config(context: &Context, node: &Node, status: &NodeStatus) -> Result<ClientConfig> {
    let key = crate::ssh::client::decode_key(context.config.node_key.as_bytes())
        .map_err(|e| Error::Config(e.to_string()))?;
    let pinned = node.spec.host_key.as_deref().or(status.host_key.as_deref());
    let policy = match pinned {
        Some(line) => HostKeyPolicy::Pinned(
            crate::ssh::client::parse_public_key(line)
                .map_err(|error| Error::Invalid(format!("host key of Node {}: {error}", node.name_any())))?,
        ),
        None => HostKeyPolicy::TrustOnFirstUse,
    };
    let mut config = ClientConfig::new(key, policy);
    config.connect_timeout = Duration::from_secs(8);
    if let Some(command) = &context.config.args.node_proxy_command {
        config.transport = Transport::ProxyCommand(command.clone());
    }
    Ok(config)
}

/// `root@address:port` of a physical node.
pub fn target_of(node: &Node) -> Option<NodeTarget> {
    Some(NodeTarget {
        user: "root".into(),
        host: node.spec.address.clone()?,
        port: u16::try_from(node.spec.ssh_port).ok()?,
    })
}

/// A short reason for an SSH failure.
pub fn ssh_reason(error: &SshError) -> &'static str {
    match error {
        SshError::Refused { .. } => "ConnectionRefused",
        SshError::HostKeyMismatch { .. } => "HostKeyMismatch",
        SshError::Unreachable { .. } => "Unreachable",
        _ => "SshFailed",
    }
}

/// Probes a physical node, records what it found, reboots it when it must
/// boot another image.
pub async fn reconcile_physical(
    node: &Node,
    context: &Context,
    target: Option<BootTarget>,
    mut status: NodeStatus,
) -> Result<Action> {
    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let nodes: Api<Node> = Api::namespaced(context.client.clone(), &namespace);
    let interval = context.config.args.probe_interval;
    let Some(ssh_target) = target_of(node) else {
        return Err(Error::Invalid(format!(
            "Node {namespace}/{name} has neither spec.address nor spec.virtual"
        )));
    };
    status.address = Some(ssh_target.host.clone());
    let config = client_config(context, node, &status)?;
    let connected = NodeClient::connect(&ssh_target, &config).await;
    let client = match connected {
        Ok(client) => client,
        Err(error) => {
            let reason = ssh_reason(&error);
            let was_reachable = status.phase != NodePhase::Unreachable;
            if status.phase != NodePhase::Rebooting || reason == "HostKeyMismatch" {
                status.phase = NodePhase::Unreachable;
            }
            set(
                &mut status,
                node,
                condition_types::REACHABLE,
                ConditionStatus::False,
                reason,
                error.to_string(),
            );
            if was_reachable || reason == "HostKeyMismatch" {
                context
                    .event(node, EventType::Warning, reason, "Probe", error.to_string())
                    .await;
            }
            context.apply_status(&nodes, &name, &status).await?;
            return Ok(Action::requeue(probe_delay(&status, interval, Timestamp::now())));
        }
    };
    if status.host_key.is_none() && node.spec.host_key.is_none() {
        let seen = client
            .host_key()
            .to_openssh()
            .map_err(|error| Error::Ssh(format!("cannot encode the host key of {ssh_target}: {error}")))?;
        context
            .event(
                node,
                EventType::Normal,
                "HostKeyRecorded",
                "Probe",
                format!(
                    "recorded host key {} (enforced from now on)",
                    crate::ssh::client::fingerprint(client.host_key())
                ),
            )
            .await;
        status.host_key = Some(seen);
    } else if let Some(pinned) = &node.spec.host_key {
        status.host_key = Some(pinned.clone());
    }
    set(
        &mut status,
        node,
        condition_types::REACHABLE,
        ConditionStatus::True,
        "SshOk",
        format!("reached {ssh_target}"),
    );
    status.last_seen = Some(Time(Timestamp::now()));
    if let Some(requested) = pending_reboot_request(node) {
        let rebooted = reboot(&client, &ssh_target).await;
        client.close().await;
        rebooted?;
        // The phase first: a client that sees the request handled (`node wait`) must not read the
        // `Ready` of before the reboot.
        mark_rebooting(
            &mut status,
            node,
            format!("rebooted over SSH (requested at {requested}); waiting for it to come back"),
        );
        context.apply_status(&nodes, &name, &status).await?;
        mark_reboot_handled(context, node, &requested).await?;
        rebooting_event(
            context,
            node,
            format!("reboot requested at {requested}: rebooting over SSH"),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    let marker = &node.spec.overlay.ready_marker;
    // One command for both: the uptime (did a reboot happen?) and the ready marker (booted?).
    let answer = client
        .exec(&format!(
            "cat /proc/uptime 2>/dev/null; test -e '{}'",
            marker.replace('\'', "")
        ))
        .await;
    let booted = answer.as_ref().is_ok_and(|output| output.exit_status == Some(0));
    if let Some(sent) = reboot_sent_at(&status) {
        let uptime = answer.as_ref().ok().and_then(|output| {
            let text = String::from_utf8_lossy(&output.stdout);
            let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
            Duration::try_from_secs_f64(seconds).ok()
        });
        let since = Timestamp::now().duration_since(sent).unsigned_abs();
        if !restarted_since(uptime, since) {
            client.close().await;
            if since > REBOOT_DEADLINE {
                let message = format!(
                    "the node still runs the boot from before the reboot sent {} s ago: check its console, or reboot it by hand",
                    since.as_secs()
                );
                context
                    .event(
                        node,
                        EventType::Warning,
                        "RebootNotHappened",
                        "Reboot",
                        message.clone(),
                    )
                    .await;
                status.phase = NodePhase::Unreachable;
                set(
                    &mut status,
                    node,
                    condition_types::BOOTED,
                    ConditionStatus::False,
                    "RebootNotHappened",
                    message,
                );
                context.apply_status(&nodes, &name, &status).await?;
                return Ok(Action::requeue(interval));
            }
            // Still going down: the answer came from the boot before the reboot.
            context.apply_status(&nodes, &name, &status).await?;
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    }
    if !booted {
        status.phase = NodePhase::Booting;
        set(
            &mut status,
            node,
            condition_types::BOOTED,
            ConditionStatus::False,
            "NotBooted",
            format!("{marker} does not exist yet"),
        );
        client.close().await;
        context.apply_status(&nodes, &name, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    set(
        &mut status,
        node,
        condition_types::BOOTED,
        ConditionStatus::True,
        "ReadyMarker",
        format!("{marker} exists"),
    );
    let mut delay = interval;
    match &target {
        Some(target) if needs_reboot(status.booted_image.as_ref(), target) => {
            if let Err(error) = reboot(&client, &ssh_target).await {
                client.close().await;
                return Err(error);
            }
            let note = format!("rebooting to boot {} ({})", target.name, target.digest);
            rebooting_event(context, node, note.clone()).await;
            mark_rebooting(&mut status, node, note);
            status.booted_image = Some(ImageDigestRef {
                name: Some(target.name.clone()),
                digest: Some(target.digest.clone()),
            });
            delay = Duration::from_secs(10);
        }
        Some(target) => {
            status.phase = NodePhase::Ready;
            if status.booted_image.is_none() {
                // First contact: it boots what the lab serves for it now.
                status.booted_image = Some(ImageDigestRef {
                    name: Some(target.name.clone()),
                    digest: Some(target.digest.clone()),
                });
            }
        }
        None => status.phase = NodePhase::Ready,
    }
    client.close().await;
    context.apply_status(&nodes, &name, &status).await?;
    Ok(Action::requeue(delay))
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::new_condition;

    #[test]
    fn a_reboot_counts_once_the_node_has_been_up_for_less_than_since_it_was_sent() {
        let second = Duration::from_secs(1);
        // Answering 1 s after the command, up for hours: the boot before the reboot.
        assert!(!restarted_since(Some(3 * 3600 * second), second));
        // Up 20 s, the reboot sent 45 s ago: it restarted.
        assert!(restarted_since(Some(20 * second), 45 * second));
        assert!(
            restarted_since(None, second),
            "no uptime: cannot tell, taken as restarted"
        );
    }

    #[test]
    fn the_reboot_time_is_the_rebooting_condition_of_a_rebooting_node() {
        let sent = Timestamp::from_second(100_000).expect("time");
        let mut status = NodeStatus {
            phase: NodePhase::Rebooting,
            ..NodeStatus::default()
        };
        assert_eq!(reboot_sent_at(&status), None, "no condition");
        walt_crds::set_condition(
            &mut status.conditions,
            new_condition(
                condition_types::BOOTED,
                ConditionStatus::False,
                REBOOTING_REASON,
                "rebooted over SSH",
                None,
                Time(sent),
            ),
        );
        assert_eq!(reboot_sent_at(&status), Some(sent));
        status.phase = NodePhase::Ready;
        assert_eq!(reboot_sent_at(&status), None, "not waiting for a reboot");
    }

    #[test]
    fn unreachable_nodes_are_probed_less_and_less() {
        let now = Timestamp::from_second(100_000).expect("time");
        let minute = Duration::from_mins(1);
        let mut status = NodeStatus::default();
        assert_eq!(probe_delay(&status, minute, now), minute);
        let down = |seconds_ago: i64| {
            new_condition(
                condition_types::REACHABLE,
                ConditionStatus::False,
                "Unreachable",
                "x",
                None,
                Time(Timestamp::from_second(100_000 - seconds_ago).expect("time")),
            )
        };
        status.conditions = vec![down(60)];
        assert_eq!(probe_delay(&status, minute, now), minute);
        status.conditions = vec![down(1200)];
        assert_eq!(probe_delay(&status, minute, now), Duration::from_mins(5));
        status.conditions = vec![down(86_400)];
        assert_eq!(probe_delay(&status, minute, now), Duration::from_mins(10));
    }
}
