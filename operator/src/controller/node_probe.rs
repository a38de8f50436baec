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
        mark_reboot_handled(context, node, &requested).await?;
        rebooting_event(
            context,
            node,
            format!("reboot requested at {requested}: rebooting over SSH"),
        )
        .await;
        status.phase = NodePhase::Rebooting;
        context.apply_status(&nodes, &name, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    let marker = &node.spec.overlay.ready_marker;
    let booted = client
        .exec(&format!("test -e '{}'", marker.replace('\'', "")))
        .await
        .is_ok_and(|output| output.exit_status == Some(0));
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
            rebooting_event(
                context,
                node,
                format!("rebooting to boot {} ({})", target.name, target.digest),
            )
            .await;
            status.phase = NodePhase::Rebooting;
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
