//! How the operator reaches a node over SSH: the one place that decides the address, port,
//! transport, host key policy and key, for the probe, the gateway and node saves alike.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt};
use walt_crds::{Device, DeviceBinding, Node};

use super::address::{BadAddress, validate_address};
use super::context::Context;
use super::error::{Error, Result};
use super::pods::vnode_object_name;
use super::runtime::owned_by;
use crate::ssh::{ClientConfig, HostKeyPolicy, NodeTarget, SshError, Transport};

/// SSH port of virtual node pods.
pub const VNODE_SSH_PORT: u16 = 22;

/// How long connecting to a node may take (TCP, SSH handshake and login).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node has no SSH address (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    /// A virtual node whose pod has no IP yet: it comes once the pod runs.
    #[error("virtual node {node} has no running pod with an IP yet")]
    PodNotReady {
        /// The Node's name.
        node: String,
    },
    /// A pod with the virtual node's pod name exists that the Node does not own (someone else made
    /// it): the operator never reaches it.
    #[error(
        "the pod {pod} is not virtual node {node}'s (its owner labels do not name this Node's uid): the operator does not reach it; a pod left by a former Node of this name goes by itself, or give the Node another name"
    )]
    PodNotOurs {
        /// The Node's name.
        node: String,
        /// The pod's name.
        pod: String,
    },
    /// A Node that is neither physical nor virtual (written past the schema).
    #[error("Node {node} has neither spec.device nor spec.virtual")]
    NoDevice {
        /// The Node's name.
        node: String,
    },
    /// The address (a Device's, or a virtual node's pod IP) is not a host name or an IP address:
    /// nothing connects to it.
    #[error("the address of Node {node}: {error}")]
    BadAddress {
        /// The Node's name.
        node: String,
        /// What is wrong with it.
        error: BadAddress,
    },
    /// `spec.device` names no Device.
    #[error(
        "Node {node} names the Device {device}, which does not exist: `kubectl walt device ls` lists the devices lent to your namespace"
    )]
    DeviceNotFound {
        /// The Node's name.
        node: String,
        /// The Device it names.
        device: String,
    },
    /// The Device is not lent to the Node's namespace: the operator does not reach it for this Node.
    #[error(
        "the Device {device} is not lent to the namespace {namespace}: the operator does not reach it for Node {node}; ask a lab admin to lend it (`kubectl walt device ls` lists the devices lent to you)"
    )]
    DeviceNotLent {
        /// The Node's name.
        node: String,
        /// The Device it names.
        device: String,
        /// The Node's namespace.
        namespace: String,
    },
    /// The Device is bound to another Node (one Node per Device).
    #[error(
        "the Device {device} is bound to the Node {holder}: one Node per device; release that Node first (`kubectl walt node release {holder}`)"
    )]
    DeviceTaken {
        /// The Node's name.
        node: String,
        /// The Device it names.
        device: String,
        /// `namespace/name` of the Node bound to it.
        holder: String,
    },
    /// The Device is lent to the namespace but not bound to the Node yet: the operator binds it.
    #[error("the Device {device} is not bound to Node {node} yet")]
    DeviceNotBound {
        /// The Node's name.
        node: String,
        /// The Device it names.
        device: String,
    },
    /// The Device has no `spec.address`: it is not registered (the boot service recorded it), and
    /// the API server refuses lending it; reached only past that rule.
    #[error(
        "the Device {device} is not registered (no spec.address): a lab admin registers it (`kubectl walt device register {device} …`)"
    )]
    DeviceUnregistered {
        /// The Device.
        device: String,
    },
    /// The Device's `spec.sshPort` is not a TCP port.
    #[error("spec.sshPort {port} of Device {device} is not a TCP port")]
    BadPort {
        /// The Device's name.
        device: String,
        /// The port it names.
        port: i32,
    },
}

impl NoRoute {
    /// Whether waiting can help (a virtual node's pod starting, a binding being written), as
    /// opposed to a spec or a loan to change.
    pub fn is_transient(&self) -> bool {
        matches!(self, NoRoute::PodNotReady { .. } | NoRoute::DeviceNotBound { .. })
    }

    /// The short reason (condition and Event reason).
    pub fn reason(&self) -> &'static str {
        match self {
            NoRoute::PodNotReady { .. } => "PodNotReady",
            NoRoute::PodNotOurs { .. } => "PodNotOurs",
            NoRoute::NoDevice { .. } => "NoDevice",
            NoRoute::DeviceNotFound { .. } => "DeviceNotFound",
            NoRoute::DeviceNotLent { .. } => "DeviceNotLent",
            NoRoute::DeviceTaken { .. } => "DeviceTaken",
            NoRoute::DeviceNotBound { .. } => "DeviceNotBound",
            NoRoute::DeviceUnregistered { .. } => "DeviceUnregistered",
            NoRoute::BadPort { .. } => "BadPort",
            NoRoute::BadAddress { .. } => "BadAddress",
        }
    }
}

/// Whether `binding` names this very Node (namespace, name and uid) (pure).
pub fn binds(binding: &DeviceBinding, node: &Node) -> bool {
    Some(binding.namespace.as_str()) == node.namespace().as_deref()
        && binding.node == node.name_any()
        && Some(binding.uid.as_str()) == node.uid().as_deref()
}

/// The Device of a physical Node, if the operator may reach it for this Node (pure): it exists, is
/// lent to the Node's namespace and is bound to this Node. This is the check made before every
/// connection to a device (probe, gateway authorization, save).
pub fn lent_device<'a>(node: &Node, device: Option<&'a Device>) -> Result<&'a Device, NoRoute> {
    let name = node.name_any();
    let Some(wanted) = node.spec.device.clone() else {
        return Err(NoRoute::NoDevice { node: name });
    };
    let Some(device) = device.filter(|device| device.name_any() == wanted) else {
        return Err(NoRoute::DeviceNotFound {
            node: name,
            device: wanted,
        });
    };
    let namespace = node.namespace().unwrap_or_default();
    if device.lent_to() != Some(namespace.as_str()) {
        return Err(NoRoute::DeviceNotLent {
            node: name,
            device: wanted,
            namespace,
        });
    }
    match device.bound_to() {
        Some(binding) if binds(binding, node) => Ok(device),
        Some(binding) => Err(NoRoute::DeviceTaken {
            node: name,
            device: wanted,
            holder: format!("{}/{}", binding.namespace, binding.node),
        }),
        None => Err(NoRoute::DeviceNotBound {
            node: name,
            device: wanted,
        }),
    }
}

/// What the Node controller does about a physical Node's Device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Bound to this Node already: reach it.
    Bound,
    /// Lent to the Node's namespace, free (or its binding is stale): bind it to this Node.
    Bind(DeviceBinding),
    /// Not for this Node: no connection.
    Refused(NoRoute),
}

/// Whether a Node may have the Device it names (pure; the PersistentVolumeClaim rule): lent to its
/// namespace and bound to no other live Node. `holder_alive` says whether the Node the Device is
/// bound to (another one) still exists with the bound uid; a binding in a namespace the device is
/// no longer lent to is stale too.
pub fn claim(node: &Node, device: Option<&Device>, holder_alive: bool) -> Claim {
    match lent_device(node, device) {
        Ok(_) => Claim::Bound,
        Err(NoRoute::DeviceNotBound { .. }) => Claim::Bind(binding_of(node)),
        Err(taken @ NoRoute::DeviceTaken { .. }) => {
            let stale_namespace = device
                .and_then(Device::bound_to)
                .is_some_and(|binding| device.and_then(Device::lent_to) != Some(binding.namespace.as_str()));
            if holder_alive && !stale_namespace {
                Claim::Refused(taken)
            } else {
                Claim::Bind(binding_of(node))
            }
        }
        Err(refused) => Claim::Refused(refused),
    }
}

/// The binding of a Device to this Node (pure).
pub fn binding_of(node: &Node) -> DeviceBinding {
    DeviceBinding {
        namespace: node.namespace().unwrap_or_default(),
        node: node.name_any(),
        uid: node.uid().unwrap_or_default(),
    }
}

/// Where a node is reached (pure): a physical node at its Device's `address:sshPort`, only when
/// [`lent_device`] allows it; a virtual node at its own pod's IP, port 22 (pod IPs work in every
/// cluster, with or without DNS and kube-proxy), only when the Node owns that pod ([`owned_by`]:
/// its owner labels name the Node's uid).
/// The address is checked with [`validate_address`] first: nothing connects to anything else.
pub fn node_target(
    node: &Node,
    vnode_pod: Option<&Pod>,
    device: Option<&Device>,
) -> Result<NodeTarget, NoRoute> {
    let target = unchecked_node_target(node, vnode_pod, device)?;
    validate_address(&target.host).map_err(|error| NoRoute::BadAddress {
        node: node.name_any(),
        error,
    })?;
    Ok(target)
}

/// [`node_target`] before the address is checked (pure).
fn unchecked_node_target(
    node: &Node,
    vnode_pod: Option<&Pod>,
    device: Option<&Device>,
) -> Result<NodeTarget, NoRoute> {
    let name = node.name_any();
    // A VM node is reached like a device: at its Device's address, through the lab network.
    if walt_crds::is_container_node(node) {
        if let Some(pod) = vnode_pod.filter(|pod| !owned_by(&pod.metadata, "Node", node)) {
            return Err(NoRoute::PodNotOurs {
                node: name,
                pod: pod.name_any(),
            });
        }
        let ip = vnode_pod
            .and_then(|pod| pod.status.as_ref())
            .and_then(|status| status.pod_ip.clone())
            .ok_or(NoRoute::PodNotReady { node: name })?;
        return Ok(NodeTarget {
            user: "root".into(),
            host: ip,
            port: VNODE_SSH_PORT,
        });
    }
    let device = lent_device(node, device)?;
    let port = u16::try_from(device.spec.ssh_port).map_err(|_| NoRoute::BadPort {
        device: device.name_any(),
        port: device.spec.ssh_port,
    })?;
    let host = device
        .spec
        .address
        .clone()
        .ok_or_else(|| NoRoute::DeviceUnregistered {
            device: device.name_any(),
        })?;
    Ok(NodeTarget {
        user: "root".into(),
        host,
        port,
    })
}

/// A node's pinned or recorded host key does not parse.
#[derive(Debug, thiserror::Error)]
#[error("host key of Node {node}: {source}")]
pub struct HostKeyError {
    /// The Node's name.
    pub node: String,
    /// The parser's error.
    pub source: Box<SshError>,
}

/// How a node's host key is checked (pure): the one its Device enforces (pinned by a lab admin, else
/// the one walt made for it and serves it at boot), else the one the operator recorded in the Node's
/// status, else trust on first use.
pub fn host_key_policy(node: &Node, device: Option<&Device>) -> Result<HostKeyPolicy, HostKeyError> {
    let pinned = device
        .and_then(Device::enforced_host_key)
        .or_else(|| node.status.as_ref().and_then(|status| status.host_key.as_deref()));
    match pinned {
        Some(line) => crate::ssh::client::parse_public_key(line)
            .map(HostKeyPolicy::Pinned)
            .map_err(|source| HostKeyError {
                node: node.name_any(),
                source: Box::new(source),
            }),
        None => Ok(HostKeyPolicy::TrustOnFirstUse),
    }
}

/// What a host key mismatch on `device` means and what to do (pure), after where its enforced key
/// comes from; `None` when the Device enforces none (the key is the Node's recorded one).
pub fn mismatch_advice(device: &Device, operator_namespace: &str) -> Option<String> {
    let name = device.name_any();
    if device.spec.host_key.is_some() {
        return Some(format!(
            "the expected key is the one a lab admin pinned in the Device {name}'s spec.hostKey: update it if the \
             device was reinstalled, else another machine answers at its address"
        ));
    }
    device.status.as_ref().and_then(|s| s.host_key.as_ref())?;
    Some(format!(
        "the expected key is the one walt made for the Device {name} (Secret {operator_namespace}/{}, its \
         status.hostKey), which the boot service serves it at every boot: a device answering with another key booted \
         before that key existed or not from walt's boot service, or another machine answers at its address; \
         power-cycle the device so it boots with its key",
        walt_crds::host_key_secret_name(&name)
    ))
}

/// The SSH client configuration for a node: the lab's node key, [`host_key_policy`], and the
/// transport (virtual nodes over TCP to their pod; physical ones through `--node-proxy-command`
/// when the lab set one).
pub fn client_config(context: &Context, node: &Node, device: Option<&Device>) -> Result<ClientConfig> {
    let key = crate::ssh::client::decode_key(context.config.node_key.as_bytes())
        .map_err(|e| Error::Config(e.to_string()))?;
    let policy = host_key_policy(node, device).map_err(|error| Error::Invalid(error.to_string()))?;
    let mut config = ClientConfig::new(key, policy);
    config.connect_timeout = CONNECT_TIMEOUT;
    config.bounds = context.config.args.node_bounds();
    config.transport = match &context.config.args.node_proxy_command {
        Some(command) if !walt_crds::is_container_node(node) => Transport::ProxyCommand(command.clone()),
        _ => Transport::Tcp,
    };
    Ok(config)
}

/// The Device a physical Node names (none for a virtual node, or when it does not exist). Whether
/// the operator may reach it is [`lent_device`]'s call.
pub async fn node_device(client: &Client, node: &Node) -> Result<Option<Device>> {
    let Some(name) = node.spec.device.as_deref() else {
        return Ok(None);
    };
    Api::<Device>::all(client.clone())
        .get_opt(name)
        .await
        .map_err(|source| Error::kube(format!("reading the Device {name}"), source))
}

/// [`node_device`], read from the watch cache first ([`super::caches`]; a Device it does not have is
/// asked from the API server): for the probe, which runs for every physical Node every
/// `--probe-interval`. A binding written on what the cache had is conditional on its version.
pub async fn node_device_cached(context: &Context, node: &Node) -> Result<Option<Device>> {
    let Some(name) = node.spec.device.as_deref() else {
        return Ok(None);
    };
    if let Some(caches) = context.caches.get()
        && let Some(device) = caches.device(name)
    {
        return Ok(Some(device));
    }
    node_device(&context.client, node).await
}

/// The pod named for a virtual node in its tenant's runtime namespace, whoever made it
/// ([`node_target`] reaches it only when the Node owns it, see [`owned_by`], and says so otherwise);
/// none for a physical node, or while it does not exist.
pub async fn vnode_pod(client: &Client, node: &Node) -> Result<Option<Pod>> {
    if !walt_crds::is_container_node(node) {
        return Ok(None);
    }
    let namespace = walt_crds::runtime_namespace(&node.namespace().unwrap_or_default());
    let name = vnode_object_name(&node.name_any());
    Api::<Pod>::namespaced(client.clone(), &namespace)
        .get_opt(&name)
        .await
        .map_err(|source| {
            Error::kube(
                format!("reading the pod {namespace}/{name} of a virtual node"),
                source,
            )
        })
}

/// Reason: the node refused the SSH connection.
pub const CONNECTION_REFUSED: &str = "ConnectionRefused";
/// Reason: the node's host key is not the one recorded.
pub const HOST_KEY_MISMATCH: &str = "HostKeyMismatch";
/// Reason: the node did not answer.
pub const UNREACHABLE: &str = "Unreachable";
/// Reason: any other SSH failure.
pub const SSH_FAILED: &str = "SshFailed";
/// Reason: a command on the node did not finish within `--node-command-timeout` (a hung node).
pub const COMMAND_TIMED_OUT: &str = "CommandTimedOut";
/// Reason: a command on the node sent more than `--node-output-limit` bytes (a flooding node).
pub const OUTPUT_TOO_LARGE: &str = "OutputTooLarge";

/// A short reason for an SSH failure (a condition reason and Event reason).
pub fn ssh_reason(error: &SshError) -> &'static str {
    ssh_reason_or(error, SSH_FAILED)
}

/// The reason of an SSH failure that says what happened (refused, host key, unreachable), else
/// `other` (the caller's word for a failure during its work).
pub fn ssh_reason_or(error: &SshError, other: &'static str) -> &'static str {
    match error {
        SshError::Refused { .. } => CONNECTION_REFUSED,
        SshError::HostKeyMismatch { .. } => HOST_KEY_MISMATCH,
        SshError::Unreachable { .. } => UNREACHABLE,
        SshError::CommandTimedOut { .. } => COMMAND_TIMED_OUT,
        SshError::OutputTooLarge { .. } => OUTPUT_TOO_LARGE,
        _ => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{DeviceLoan, DeviceSpec, DeviceStatus, NodeSpec, VirtualNode};

    fn physical(namespace: &str, name: &str, device: &str) -> Node {
        let mut node = Node::new(
            name,
            NodeSpec {
                device: Some(device.into()),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some(namespace.into());
        node.metadata.uid = Some(format!("uid-{namespace}-{name}"));
        node
    }

    fn device(lent_to: Option<&str>, bound: Option<&Node>) -> Device {
        let mut device = Device::new(
            "rpi1",
            DeviceSpec {
                address: Some("10.0.0.5".into()),
                ssh_port: 2222,
                model: "rpi-4-b".into(),
                lent_to: lent_to.map(|namespace| DeviceLoan {
                    namespace: namespace.into(),
                }),
                ..DeviceSpec::default()
            },
        );
        device.status = Some(DeviceStatus {
            bound_to: bound.map(binding_of),
            ..DeviceStatus::default()
        });
        device
    }

    #[test]
    fn a_physical_node_is_reached_at_its_device_only_when_lent_and_bound_to_it() {
        let alice = physical("alice", "n1", "rpi1");
        let lent = device(Some("alice"), Some(&alice));
        let target = node_target(&alice, None, Some(&lent)).expect("target");
        assert_eq!((target.host.as_str(), target.port), ("10.0.0.5", 2222));
        let not_found = node_target(&alice, None, None).expect_err("no device");
        assert_eq!(not_found.reason(), "DeviceNotFound");
        let bob = physical("bob", "n1", "rpi1");
        let to_bob = device(Some("bob"), Some(&bob));
        let refused = node_target(&alice, None, Some(&to_bob)).expect_err("lent to bob");
        assert_eq!(refused.reason(), "DeviceNotLent");
        assert!(!refused.is_transient());
        assert!(
            refused.to_string().contains("not lent to the namespace alice"),
            "{refused}"
        );
        let unlent = device(None, None);
        assert_eq!(
            node_target(&alice, None, Some(&unlent))
                .expect_err("unlent")
                .reason(),
            "DeviceNotLent"
        );
        let unbound = device(Some("alice"), None);
        let waiting = node_target(&alice, None, Some(&unbound)).expect_err("unbound");
        assert!(waiting.is_transient());
        let other = physical("alice", "n2", "rpi1");
        let taken = device(Some("alice"), Some(&other));
        let refused = node_target(&alice, None, Some(&taken)).expect_err("taken");
        assert_eq!(refused.reason(), "DeviceTaken");
        assert!(refused.to_string().contains("alice/n2"), "{refused}");
    }

    #[test]
    fn a_node_recreated_under_the_same_name_is_another_claim() {
        let old = physical("alice", "n1", "rpi1");
        let lent = device(Some("alice"), Some(&old));
        let mut new = old.clone();
        new.metadata.uid = Some("another".into());
        assert_eq!(
            node_target(&new, None, Some(&lent))
                .expect_err("old uid")
                .reason(),
            "DeviceTaken"
        );
    }

    /// Issue 15: an address that is a command never becomes a target (probe, gateway, save).
    #[test]
    fn a_node_whose_address_is_not_a_host_or_ip_is_not_reached() {
        // A Device written past its schema (its CEL rule refuses this address at admission).
        let node = physical("alice", "n1", "rpi1");
        let mut hostile = device(Some("alice"), Some(&node));
        hostile.spec.address = Some("x; touch /tmp/pwned".into());
        let refused = node_target(&node, None, Some(&hostile)).expect_err("refused");
        assert!(!refused.is_transient());
        assert!(
            refused.to_string().starts_with(
                "the address of Node n1: `x; touch /tmp/pwned` is neither a host name nor an IP address"
            ),
            "{refused}"
        );
    }

    #[test]
    fn claims_follow_the_loan_and_one_live_node_per_device() {
        let alice = physical("alice", "n1", "rpi1");
        assert_eq!(
            claim(&alice, Some(&device(Some("alice"), Some(&alice))), true),
            Claim::Bound
        );
        assert_eq!(
            claim(&alice, Some(&device(Some("alice"), None)), false),
            Claim::Bind(binding_of(&alice))
        );
        let other = physical("alice", "n2", "rpi1");
        let taken = device(Some("alice"), Some(&other));
        assert!(matches!(
            claim(&alice, Some(&taken), true),
            Claim::Refused(NoRoute::DeviceTaken { .. })
        ));
        // Its holder is gone (released): the device is free again.
        assert_eq!(
            claim(&alice, Some(&taken), false),
            Claim::Bind(binding_of(&alice))
        );
        // Taken back from bob and lent to alice: bob's binding is stale, alive or not.
        let bob = physical("bob", "n1", "rpi1");
        let moved = device(Some("alice"), Some(&bob));
        assert_eq!(claim(&alice, Some(&moved), true), Claim::Bind(binding_of(&alice)));
        // Never for a namespace it is not lent to, free or not.
        for device in [
            device(Some("bob"), None),
            device(None, None),
            device(Some("bob"), Some(&bob)),
        ] {
            assert!(matches!(
                claim(&alice, Some(&device), false),
                Claim::Refused(NoRoute::DeviceNotLent { .. })
            ));
        }
        assert!(matches!(
            claim(&alice, None, false),
            Claim::Refused(NoRoute::DeviceNotFound { .. })
        ));
    }

    #[test]
    fn a_device_pins_the_host_key() {
        let alice = physical("alice", "n1", "rpi1");
        let mut lent = device(Some("alice"), Some(&alice));
        assert!(matches!(
            host_key_policy(&alice, Some(&lent)),
            Ok(HostKeyPolicy::TrustOnFirstUse)
        ));
        lent.spec.host_key =
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ".into());
        assert!(matches!(
            host_key_policy(&alice, Some(&lent)),
            Ok(HostKeyPolicy::Pinned(_))
        ));
        assert!(
            mismatch_advice(&lent, "walt-system")
                .is_some_and(|a| a.contains("pinned in the Device rpi1's spec.hostKey")),
            "{:?}",
            mismatch_advice(&lent, "walt-system")
        );
    }

    #[test]
    fn the_key_walt_made_for_a_device_is_enforced_over_the_nodes_first_seen_one() {
        let served = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
        let first_seen = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDVyM7T7Fy8w7L0iYGJm8Hfy7QnSS5n2A4rsdKXxBFH7";
        let mut alice = physical("alice", "n1", "rpi1");
        alice.status = Some(walt_crds::NodeStatus {
            host_key: Some(first_seen.into()),
            ..walt_crds::NodeStatus::default()
        });
        let mut lent = device(Some("alice"), Some(&alice));
        assert_eq!(
            mismatch_advice(&lent, "walt-system"),
            None,
            "no key of the Device's"
        );
        lent.status.get_or_insert_with(DeviceStatus::default).host_key = Some(served.into());
        let Ok(HostKeyPolicy::Pinned(pinned)) = host_key_policy(&alice, Some(&lent)) else {
            panic!("pinned");
        };
        assert_eq!(
            pinned.to_openssh().ok().as_deref(),
            Some(served),
            "the Device's key, not the first seen"
        );
        let advice = mismatch_advice(&lent, "walt-system").unwrap_or_default();
        assert!(
            advice.contains("Secret walt-system/walt-hostkey-rpi1") && advice.contains("power-cycle"),
            "{advice}"
        );
    }

    fn vnode() -> Node {
        let mut node = Node::new(
            "v1",
            NodeSpec {
                virtual_node: Some(VirtualNode::default()),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some("alice".into());
        node.metadata.uid = Some("uid-v1".into());
        node
    }

    fn pod_owned_by(uid: &str) -> Pod {
        let mut owner = vnode();
        owner.metadata.uid = Some(uid.into());
        Pod {
            metadata: kube::api::ObjectMeta {
                namespace: Some("walt-run-alice".into()),
                labels: Some(crate::controller::shared::runtime::owner_labels("Node", &owner)),
                ..Default::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some("10.244.0.9".into()),
                ..Default::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn a_virtual_node_is_reached_at_its_own_pod_ip_once_it_has_one() {
        let node = vnode();
        let waiting = node_target(&node, None, None).expect_err("no pod");
        assert!(waiting.is_transient());
        let target = node_target(&node, Some(&pod_owned_by("uid-v1")), None).expect("target");
        assert_eq!(
            (target.host.as_str(), target.port),
            ("10.244.0.9", VNODE_SSH_PORT)
        );
    }

    #[test]
    fn a_vm_node_is_reached_at_its_device_never_at_a_pod() {
        let mut vm = physical("alice", "n1", "rpi1");
        vm.spec.virtual_node = Some(VirtualNode {
            kind: walt_crds::VirtualKind::Vm,
            ..VirtualNode::default()
        });
        let lent = device(Some("alice"), Some(&vm));
        let target = node_target(&vm, Some(&pod_owned_by("uid-alice-n1")), Some(&lent)).expect("its Device");
        assert_eq!(Some(target.host), lent.spec.address);
    }

    #[test]
    fn a_pod_the_node_does_not_own_is_never_reached() {
        let node = vnode();
        for pod in [pod_owned_by("uid-of-bobs-node"), Pod::default()] {
            assert!(!owned_by(&pod.metadata, "Node", &node));
            let refused = node_target(&node, Some(&pod), None).expect_err("not its pod");
            assert_eq!(refused.reason(), "PodNotOurs");
            assert!(
                !refused.is_transient(),
                "a shell or save on it must end, saying why"
            );
        }
    }
}
