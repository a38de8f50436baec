//! Physical nodes, the I/O half: connect over SSH (through the `ssh` module's node client: the
//! operator never speaks SSH itself), read the uptime and the ready marker in one command, let
//! [`decide`](super::decide::decide) judge, then carry out its effects: the reboot, one status
//! write, the handled request, the Events.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{ConditionStatus, Device, DeviceBinding, Node, NodePhase, NodeStatus, condition_types};

use super::decide::{Decision, Effect, Probe, Reached, SshFailure, decide};
use super::{BootTarget, netboot, reasons};
use crate::boot::state::BootRecord;
use crate::controller::shared::context::Context;
use crate::controller::shared::error::{Error, Result};
use crate::controller::shared::node_access::{
    Claim, NoRoute, binds, claim, client_config, mismatch_advice, node_device_cached, node_target, ssh_reason,
};
use crate::ssh::{NodeClient, NodeTarget, SshError};

/// Reboots a node over SSH, detached, so the session ends cleanly first.
async fn reboot(client: &NodeClient, ssh_target: &NodeTarget) -> Result<()> {
    client
        .exec("(sleep 1; reboot) >/dev/null 2>&1 </dev/null &")
        .await
        .map(|_| ())
        .map_err(|error| Error::Ssh(format!("cannot reboot {ssh_target}: {error}")))
}

/// The probe command: the uptime (did a reboot happen?) and whether the ready marker exists
/// (booted?), in one round trip.
fn probe_command(ready_marker: &str) -> String {
    format!(
        "cat /proc/uptime 2>/dev/null; test -e '{}'",
        ready_marker.replace('\'', "")
    )
}

/// The uptime in the probe command's output (its first number), if any (pure).
fn parse_uptime(stdout: &[u8]) -> Option<Duration> {
    let text = String::from_utf8_lossy(stdout);
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// The probe's failure; a host key mismatch says where the expected key comes from and what to do
/// (`advice`, [`mismatch_advice`]).
fn failure_of(error: &SshError, advice: Option<&str>) -> SshFailure {
    let host_key_mismatch = matches!(error, SshError::HostKeyMismatch { .. });
    let message = match advice {
        Some(advice) if host_key_mismatch => format!("{error} ({advice})"),
        _ => error.to_string(),
    };
    SshFailure {
        reason: ssh_reason(error),
        message,
        host_key_mismatch,
    }
}

/// Runs the probe command on a connected node and gathers what it says; `Ok(Err(…))` when the
/// command could not run to its end (it hung past `--node-command-timeout`, flooded past
/// `--node-output-limit`, or the connection dropped): the node is then not reachable for walt.
async fn observe(
    client: &NodeClient,
    ssh_target: &NodeTarget,
    ready_marker: &str,
) -> Result<std::result::Result<Reached, SshError>> {
    let host_key = client
        .host_key()
        .to_openssh()
        .map_err(|error| Error::Ssh(format!("cannot encode the host key of {ssh_target}: {error}")))?;
    let output = match client.exec(&probe_command(ready_marker)).await {
        Ok(output) => output,
        Err(error) => return Ok(Err(error)),
    };
    Ok(Ok(Reached {
        target: ssh_target.to_string(),
        host_key,
        fingerprint: crate::ssh::client::fingerprint(client.host_key()),
        uptime: parse_uptime(&output.stdout),
        booted: output.exit_status == Some(0),
    }))
}

/// Whether the boot watchdog's retry can restart the node (pure): over SSH when the probe reached
/// it; a VM node always, by a power cycle (its pod made again), hung or not.
pub fn can_restart(node: &Node, reached: bool) -> bool {
    reached || walt_crds::is_vm(node)
}

/// Probes a physical node, records what it found, reboots it when it must boot another image.
pub async fn reconcile_physical(
    node: &Node,
    context: &Context,
    target: Option<BootTarget>,
    mut status: NodeStatus,
) -> Result<Action> {
    let device = match claim_device(context, node).await? {
        Ok(device) => device,
        Err(refused) => return refuse(context, node, status, &refused).await,
    };
    let ssh_target = match node_target(node, None, Some(&device)) {
        Ok(ssh_target) => ssh_target,
        Err(refused) => return refuse(context, node, status, &refused).await,
    };
    status.device = Some(device.name_any());
    status.address = Some(ssh_target.host.clone());
    if let Some(enforced) = device.enforced_host_key() {
        status.host_key = Some(enforced.to_owned());
    }
    let advice = mismatch_advice(&device, &context.config.args.namespace);
    let config = client_config(context, node, Some(&device))?;
    let interval = context.config.args.probe_interval;
    let watchdog = netboot::Watchdog {
        timeout: context.config.args.boot_timeout,
        retries: context.config.args.boot_retries,
    };
    let client = match NodeClient::connect(&ssh_target, &config).await {
        Ok(client) => client,
        Err(error) => {
            let probe = Probe::Failed(failure_of(&error, advice.as_deref()));
            let seen = boot_seen(context, &device).await;
            let now = Timestamp::now();
            let mut decision = decide(node, status, target.as_ref(), &probe, now, interval);
            if let Some(seen) = &seen {
                let restart = can_restart(node, false);
                netboot::judge(node, &mut decision, target.as_ref(), seen, restart, now, watchdog);
            }
            return apply(context, node, None, decision).await;
        }
    };
    let observed = observe(&client, &ssh_target, &node.spec.overlay.ready_marker).await;
    let probe = match observed {
        Ok(Ok(reached)) => Probe::Reached(reached),
        Ok(Err(failed)) => Probe::Failed(failure_of(&failed, advice.as_deref())),
        Err(error) => {
            client.close().await;
            return Err(error);
        }
    };
    let seen = boot_seen(context, &device).await;
    let now = Timestamp::now();
    let mut decision = decide(node, status, target.as_ref(), &probe, now, interval);
    if let Some(seen) = &seen {
        let restart = can_restart(node, matches!(probe, Probe::Reached(_)));
        netboot::judge(node, &mut decision, target.as_ref(), seen, restart, now, watchdog);
    }
    // The one place the connection ends, whatever the decision.
    let applied = apply(context, node, Some((&client, &ssh_target)), decision).await;
    client.close().await;
    applied
}

/// What the boot service saw of a device walt network-boots (none for another device). Asked after
/// the probe, never before: a node that rebooted while the probe waited for its SSH (up to
/// `CONNECT_TIMEOUT`) must not be judged on the record of its former boot (seen: the record of the
/// image it left, verified, read as the new boot's, and the node rebooted a second time).
async fn boot_seen(context: &Context, device: &Device) -> Option<netboot::Seen> {
    let (Some(_), Some(mac)) = (&device.spec.firmware, &device.spec.mac) else {
        return None;
    };
    let network = crate::controller::boot_source::network_of(device);
    Some(boot_record(context, network, mac).await)
}

/// Asks the boot service of `network` (`--boot-status-url`) what it saw of the device with this MAC.
async fn boot_record(context: &Context, network: &str, mac: &str) -> netboot::Seen {
    let Some(url) = netboot::status_url(&context.config.args.boot_status_url, network) else {
        return netboot::Seen::Unreachable(format!(
            "the operator has no --boot-status-url for the lab network {network}: it cannot verify what the device booted"
        ));
    };
    let url = format!("{}/boots", url.trim_end_matches('/'));
    let fetched = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
        let response = response.error_for_status().map_err(|e| e.to_string())?;
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        serde_json::from_slice::<Vec<BootRecord>>(&body).map_err(|e| format!("not boot records: {e}"))
    };
    match fetched.await {
        Ok(records) => netboot::Seen::Record(netboot::record_of(&records, mac)),
        Err(error) => netboot::Seen::Unreachable(format!("asking the boot service ({url}): {error}")),
    }
}

/// How soon a Node whose Device the operator may not reach is looked at again (a Device change
/// wakes it sooner).
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Whether the Node a Device is bound to still exists with the bound uid.
async fn holder_alive(context: &Context, binding: &DeviceBinding) -> Result<bool> {
    let holder = Api::<Node>::namespaced(context.client.clone(), &binding.namespace)
        .get_opt(&binding.node)
        .await
        .map_err(|source| {
            Error::kube(
                format!(
                    "reading Node {}/{}, bound to a Device",
                    binding.namespace, binding.node
                ),
                source,
            )
        })?;
    Ok(holder.is_some_and(|holder| holder.uid().as_deref() == Some(binding.uid.as_str())))
}

/// The Device of a physical Node, bound to it now if [`claim`] allows (the binding is written with
/// the Device's resourceVersion: of two Nodes claiming at once, one wins, the other retries and is
/// refused); or why the operator must not reach it for this Node.
pub(super) async fn claim_device(context: &Context, node: &Node) -> Result<Result<Device, NoRoute>> {
    let device = node_device_cached(context, node).await?;
    let holder_alive = match device.as_ref().and_then(Device::bound_to) {
        Some(binding) if !binds(binding, node) => holder_alive(context, binding).await?,
        _ => false,
    };
    let binding = match claim(node, device.as_ref(), holder_alive) {
        Claim::Refused(refused) => return Ok(Err(refused)),
        Claim::Bound => None,
        Claim::Bind(binding) => Some(binding),
    };
    let Some(mut device) = device else {
        return Err(Error::Invalid(format!(
            "Node {}: claimed a Device that was not read",
            node.name_any()
        )));
    };
    if let Some(binding) = binding {
        let name = device.name_any();
        device.status.get_or_insert_with(Default::default).bound_to = Some(binding);
        device = Api::<Device>::all(context.client.clone())
            .replace_status(&name, &PostParams::default(), &device)
            .await
            .map_err(|source| match source {
                // The Device changed since it was read (another Node bound it, or the cache was
                // behind): decided again on its current version.
                kube::Error::Api(response) if response.code == 409 => Error::Stale(format!("Device {name}")),
                source => Error::kube(
                    format!("binding the Device {name} to Node {}", node.name_any()),
                    source,
                ),
            })?;
        context
            .event(
                node,
                EventType::Normal,
                reasons::DEVICE_BOUND,
                "Bind",
                format!(
                    "bound to the Device {name} ({})",
                    device.spec.address.as_deref().unwrap_or("unregistered")
                ),
            )
            .await;
    }
    Ok(Ok(device))
}

/// A physical Node the operator does not reach (its Device is missing, not lent to its namespace or
/// bound to another Node): no connection; `Reachable=False` with the reason and a Warning Event say
/// why and what to do.
pub(super) async fn refuse(
    context: &Context,
    node: &Node,
    mut status: NodeStatus,
    refused: &NoRoute,
) -> Result<Action> {
    status.device = None;
    status.address = None;
    status.phase = NodePhase::Unreachable;
    super::condition(
        &mut status,
        node,
        condition_types::REACHABLE,
        ConditionStatus::False,
        refused.reason(),
        refused.to_string(),
    );
    super::write_status(context, node, &status).await?;
    context
        .event(
            node,
            EventType::Warning,
            refused.reason(),
            "Probe",
            refused.to_string(),
        )
        .await;
    let retry = if refused.is_transient() {
        Duration::from_secs(2)
    } else {
        REFUSED_RETRY
    };
    Ok(Action::requeue(retry))
}

/// Carries out a decision: the reboot first (nothing is recorded if it fails), then the one status
/// write (of a reboot made, through [`super::record_reboot`]: recorded even on a Node overtaken
/// meanwhile), then the handled request and the Events.
async fn apply(
    context: &Context,
    node: &Node,
    connection: Option<(&NodeClient, &NodeTarget)>,
    decision: Decision,
) -> Result<Action> {
    if decision.effects.contains(&Effect::Reboot) && walt_crds::is_vm(node) {
        // A VM node's reboot is a power cycle, whether it answers or not.
        let runtime = walt_crds::runtime_namespace(&node.namespace().unwrap_or_default());
        super::vm_node::power_off(context, node, &runtime).await?;
    } else if decision.effects.contains(&Effect::Reboot) {
        let (client, ssh_target) =
            connection.ok_or_else(|| Error::Ssh("a reboot was decided without a connection".into()))?;
        reboot(client, ssh_target).await?;
    }
    if decision.effects.contains(&Effect::Reboot) {
        super::record_reboot(context, node, &decision.status).await?;
    } else {
        super::write_status(context, node, &decision.status).await?;
    }
    for effect in decision.effects {
        match effect {
            Effect::Reboot => {}
            Effect::MarkRebootHandled(value) => {
                context
                    .mark_handled(node, walt_crds::request::REBOOT, &value)
                    .await?;
            }
            Effect::Event {
                type_,
                reason,
                action,
                note,
            } => context.event(node, type_, reason, action, note).await,
        }
    }
    Ok(Action::requeue(decision.requeue))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uptime_is_the_first_number_the_node_prints() {
        assert_eq!(
            parse_uptime(b"123.45 400.00\n"),
            Some(Duration::from_secs_f64(123.45))
        );
        assert_eq!(parse_uptime(b""), None);
        assert_eq!(parse_uptime(b"cat: /proc/uptime: No such file"), None);
    }

    #[test]
    fn the_probe_command_cannot_be_broken_out_of_by_the_marker_path() {
        assert_eq!(
            probe_command("/run/x'; reboot; '"),
            "cat /proc/uptime 2>/dev/null; test -e '/run/x; reboot; '"
        );
    }
}
