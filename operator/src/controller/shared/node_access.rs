//! How the operator reaches a node over SSH: the one place that decides the address, port,
//! transport, host key policy and key, for the probe, the gateway and node saves alike.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt};
use walt_crds::Node;

use super::address::{BadAddress, validate_address};
use super::context::Context;
use super::error::{Error, Result};
use super::pods::vnode_object_name;
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
    /// A physical node without an address: the spec must change.
    #[error("Node {node} has neither spec.address nor spec.virtual")]
    NoAddress {
        /// The Node's name.
        node: String,
    },
    /// `spec.address` (or a virtual node's pod IP) is not a host name or an IP address: the spec
    /// must change; nothing connects to it.
    #[error("the address of Node {node}: {error}")]
    BadAddress {
        /// The Node's name.
        node: String,
        /// What is wrong with it.
        error: BadAddress,
    },
    /// `spec.sshPort` is not a TCP port: the spec must change.
    #[error("spec.sshPort {port} of Node {node} is not a TCP port")]
    BadPort {
        /// The Node's name.
        node: String,
        /// The port it names.
        port: i32,
    },
}

impl NoRoute {
    /// Whether waiting can help (a virtual node's pod starting), as opposed to a spec to fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, NoRoute::PodNotReady { .. })
    }
}

/// Where a node is reached (pure): a physical node at `spec.address:spec.sshPort`; a virtual node
/// at its pod's IP, port 22 (pod IPs work in every cluster, with or without DNS and kube-proxy).
/// The address is checked with [`validate_address`] first: nothing connects to anything else.
pub fn node_target(node: &Node, vnode_pod: Option<&Pod>) -> Result<NodeTarget, NoRoute> {
    let target = unchecked_node_target(node, vnode_pod)?;
    validate_address(&target.host).map_err(|error| NoRoute::BadAddress {
        node: node.name_any(),
        error,
    })?;
    Ok(target)
}

/// [`node_target`] before the address is checked (pure).
fn unchecked_node_target(node: &Node, vnode_pod: Option<&Pod>) -> Result<NodeTarget, NoRoute> {
    let name = node.name_any();
    if node.spec.virtual_node.is_some() {
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
    let host = node
        .spec
        .address
        .clone()
        .ok_or_else(|| NoRoute::NoAddress { node: name.clone() })?;
    let port = u16::try_from(node.spec.ssh_port).map_err(|_| NoRoute::BadPort {
        node: name,
        port: node.spec.ssh_port,
    })?;
    Ok(NodeTarget {
        user: "root".into(),
        host,
        port,
    })
}

/// How a node's host key is checked (pure): pinned by the spec, else the one the operator
/// recorded in the status, else trust on first use.
pub fn host_key_policy(node: &Node) -> Result<HostKeyPolicy, String> {
    let pinned = node
        .spec
        .host_key
        .as_deref()
        .or_else(|| node.status.as_ref().and_then(|status| status.host_key.as_deref()));
    match pinned {
        Some(line) => crate::ssh::client::parse_public_key(line)
            .map(HostKeyPolicy::Pinned)
            .map_err(|error| format!("host key of Node {}: {error}", node.name_any())),
        None => Ok(HostKeyPolicy::TrustOnFirstUse),
    }
}

/// The SSH client configuration for a node: the lab's node key, [`host_key_policy`], and the
/// transport (virtual nodes over TCP to their pod; physical ones through `--node-proxy-command`
/// when the lab set one).
pub fn client_config(context: &Context, node: &Node) -> Result<ClientConfig> {
    let key = crate::ssh::client::decode_key(context.config.node_key.as_bytes())
        .map_err(|e| Error::Config(e.to_string()))?;
    let policy = host_key_policy(node).map_err(Error::Invalid)?;
    let mut config = ClientConfig::new(key, policy);
    config.connect_timeout = CONNECT_TIMEOUT;
    config.transport = match (&node.spec.virtual_node, &context.config.args.node_proxy_command) {
        (None, Some(command)) => Transport::ProxyCommand(command.clone()),
        _ => Transport::Tcp,
    };
    Ok(config)
}

/// The pod of a virtual node (none for a physical node, or while it does not exist).
pub async fn vnode_pod(client: &Client, node: &Node) -> Result<Option<Pod>> {
    if node.spec.virtual_node.is_none() {
        return Ok(None);
    }
    let namespace = node.namespace().unwrap_or_default();
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

/// A short reason for an SSH failure (a condition reason and Event reason).
pub fn ssh_reason(error: &SshError) -> &'static str {
    match error {
        SshError::Refused { .. } => "ConnectionRefused",
        SshError::HostKeyMismatch { .. } => "HostKeyMismatch",
        SshError::Unreachable { .. } => "Unreachable",
        _ => "SshFailed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{NodeSpec, VirtualNode};

    fn physical(address: Option<&str>, port: i32) -> Node {
        Node::new(
            "rpi1",
            NodeSpec {
                address: address.map(str::to_owned),
                ssh_port: port,
                ..NodeSpec::default()
            },
        )
    }

    #[test]
    fn a_physical_node_is_reached_at_its_address_and_port() {
        let target = node_target(&physical(Some("10.0.0.5"), 2222), None).expect("target");
        assert_eq!((target.host.as_str(), target.port), ("10.0.0.5", 2222));
        assert_eq!(
            node_target(&physical(None, 22), None),
            Err(NoRoute::NoAddress { node: "rpi1".into() })
        );
        let bad = node_target(&physical(Some("h"), 70_000), None).expect_err("port");
        assert!(!bad.is_transient());
        assert_eq!(
            bad.to_string(),
            "spec.sshPort 70000 of Node rpi1 is not a TCP port"
        );
    }

    /// Issue 15: an address that is a command never becomes a target (probe, gateway, save).
    #[test]
    fn a_node_whose_address_is_not_a_host_or_ip_is_not_reached() {
        let refused = node_target(&physical(Some("x; touch /tmp/pwned"), 22), None).expect_err("refused");
        assert!(!refused.is_transient());
        assert!(
            refused.to_string().starts_with(
                "the address of Node rpi1: `x; touch /tmp/pwned` is neither a host name nor an IP address"
            ),
            "{refused}"
        );
    }

    #[test]
    fn a_virtual_node_is_reached_at_its_pod_ip_once_it_has_one() {
        let node = Node::new(
            "v1",
            NodeSpec {
                virtual_node: Some(VirtualNode::default()),
                ..NodeSpec::default()
            },
        );
        let waiting = node_target(&node, None).expect_err("no pod");
        assert!(waiting.is_transient());
        let pod = Pod {
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some("10.244.0.9".into()),
                ..Default::default()
            }),
            ..Pod::default()
        };
        let target = node_target(&node, Some(&pod)).expect("target");
        assert_eq!(
            (target.host.as_str(), target.port),
            ("10.244.0.9", VNODE_SSH_PORT)
        );
    }
}
