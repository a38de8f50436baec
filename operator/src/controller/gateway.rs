//! The SSH gateway inside the operator.
//!
//! Every replica serves the gateway on `--gateway-addr` (the gateway Service
//! may route a user to any of them), and every replica keeps its own
//! [`Authorizations`] in step with a watch of ShellSessions: a node shell
//! that is `Running`, not being deleted, with a `publicKey`, is authorized
//! for its node until `creationTimestamp + ttl`; anything else (ended,
//! expired, deleted) is removed, which also closes its open connections.
//! This is a read of the API only: no leader is needed, and the leader's
//! ShellSession controller alone decides the phases.
//!
//! Activity: each replica notes when bytes last went through a session's
//! connections, and writes it to the session's `status.lastActivity` (at
//! most every [`ACTIVITY_PUBLISH_INTERVAL`], field manager
//! [`GATEWAY_FIELD_MANAGER`]), so the leader can end sessions idle for their
//! `idleTimeout` whichever replica serves them. Status is written only with
//! the operator's ServiceAccount: a tenant cannot keep a session alive by
//! writing it, nor forge a `Running` phase the gateway would admit.
//!
//! The SSH user name at the gateway is the session's name (the gateway keys
//! sessions as `namespace/name`, see [`Authorizations::find`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use russh::keys::PrivateKey;
use tokio_util::sync::CancellationToken;
use walt_crds::{Device, Node, ShellSession, ShellSessionPhase};

use super::config::Config;
use super::shared::clock::ApiClock;
use super::shared::error::{Error, KubeResultExt};
use super::shared::node_access::{
    HostKeyError, NoRoute, host_key_policy, node_device, node_target, vnode_pod,
};
use super::shared::session::{
    ACCESS_RECHECK, ACTIVITY_PUBLISH_INTERVAL, GATEWAY_FIELD_MANAGER, session_duration,
};
use crate::ssh::Transport;
use crate::ssh::gateway::{Authorization, Authorizations, Gateway, GatewayConfig};

/// Why the gateway cannot start, or cannot authorize a session.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The session's `ttl` is not a duration (the parser's words).
    #[error("spec.ttl of ShellSession {session}: {reason}")]
    Ttl {
        /// The session's name.
        session: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The session carries no public key.
    #[error("ShellSession {session} has no spec.publicKey")]
    NoPublicKey {
        /// The session's name.
        session: String,
    },
    /// The session's public key does not parse.
    #[error("spec.publicKey of ShellSession {session}: {source}")]
    PublicKey {
        /// The session's name.
        session: String,
        /// The parser's error.
        source: Box<crate::ssh::SshError>,
    },
    /// The node has no route the operator may use (not lent, not bound, pod not running…).
    #[error(transparent)]
    NoRoute(#[from] NoRoute),
    /// The node's recorded or pinned host key does not parse.
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    /// The Node of the session does not exist.
    #[error("Node {namespace}/{node} not found")]
    NodeNotFound {
        /// The session's namespace.
        namespace: String,
        /// `spec.node`.
        node: String,
    },
    /// The API server failed.
    #[error(transparent)]
    Api(#[from] Error),
    /// The configured gateway host key is not usable.
    #[error("the gateway host key is not usable: {0}")]
    GatewayHostKey(#[source] russh::keys::Error),
    /// No randomness for a fresh gateway host key.
    #[error("reading /dev/urandom for the gateway host key: {0}")]
    Random(#[source] std::io::Error),
    /// The lab's node key is not usable.
    #[error("the lab node key: {0}")]
    NodeKey(#[source] Box<crate::ssh::SshError>),
    /// The gateway address cannot be listened on.
    #[error("cannot listen on {address} for the SSH gateway: {source}")]
    Listen {
        /// `--gateway-addr`.
        address: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The listener has no local address.
    #[error("the gateway listener has no address: {0}")]
    NoAddress(#[source] std::io::Error),
}

/// The key of a session in the gateway's authorization set: `namespace/name`.
pub fn session_key(session: &ShellSession) -> String {
    format!(
        "{}/{}",
        session.namespace().unwrap_or_default(),
        session.name_any()
    )
}

/// Whether the gateway should admit a session now (pure): a node shell,
/// `Running`, not being deleted, with a public key.
pub fn admits(session: &ShellSession) -> bool {
    session.spec.node.is_some()
        && session.spec.public_key.is_some()
        && session.metadata.deletion_timestamp.is_none()
        && session
            .status
            .as_ref()
            .is_some_and(|status| status.phase == ShellSessionPhase::Running)
}

/// When a session's authorization ends (pure): its creation time plus its ttl.
pub fn expiry(session: &ShellSession) -> Result<SystemTime, GatewayError> {
    let ttl = session_duration(&session.spec.ttl).map_err(|reason| GatewayError::Ttl {
        session: session.name_any(),
        reason,
    })?;
    let created = session
        .creation_timestamp()
        .map_or_else(SystemTime::now, |time| SystemTime::from(time.0));
    Ok(created + ttl)
}

/// The authorization of a session, given its node and (virtual nodes) the
/// node's pod (pure).
pub fn authorization_of(
    session: &ShellSession,
    node: &Node,
    vnode_pod: Option<&Pod>,
    device: Option<&Device>,
) -> Result<Authorization, GatewayError> {
    let key_line = session
        .spec
        .public_key
        .as_deref()
        .ok_or_else(|| GatewayError::NoPublicKey {
            session: session.name_any(),
        })?;
    let public_key =
        crate::ssh::client::parse_public_key(key_line).map_err(|source| GatewayError::PublicKey {
            session: session.name_any(),
            source: Box::new(source),
        })?;
    Ok(Authorization {
        session_id: session_key(session),
        node: node_target(node, vnode_pod, device)?,
        node_host_key: host_key_policy(node, device)?,
        public_key,
        expires_at: expiry(session)?,
    })
}

/// Reads the Node (and its pod, for a virtual node) a session targets and
/// builds its authorization.
pub async fn resolve_authorization(
    client: &Client,
    session: &ShellSession,
) -> Result<Authorization, GatewayError> {
    let namespace = session.namespace().unwrap_or_default();
    let node_name = session.spec.node.clone().unwrap_or_default();
    let nodes: Api<Node> = Api::namespaced(client.clone(), &namespace);
    let node = nodes
        .get_opt(&node_name)
        .await
        .context(|| format!("reading Node {namespace}/{node_name}"))?
        .ok_or_else(|| GatewayError::NodeNotFound {
            namespace: namespace.clone(),
            node: node_name.clone(),
        })?;
    let pod = vnode_pod(client, &node).await?;
    let device = node_device(client, &node).await?;
    authorization_of(session, &node, pod.as_ref(), device.as_ref())
}

/// The gateway's host key: the configured one, else a fresh Ed25519 key.
pub fn host_key(config: &Config) -> Result<PrivateKey, GatewayError> {
    if let Some(text) = &config.gateway_host_key {
        return russh::keys::decode_secret_key(text, None).map_err(GatewayError::GatewayHostKey);
    }
    let mut seed = [0_u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut seed))
        .map_err(GatewayError::Random)?;
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    Ok(PrivateKey::from(pair))
}

/// Starts the gateway on `--gateway-addr` and keeps its authorizations in
/// step with the ShellSessions, until `shutdown`. Returns the bound address.
pub async fn start(
    client: Client,
    config: Arc<Config>,
    clock: Arc<ApiClock>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, Authorizations), GatewayError> {
    let node_key = crate::ssh::client::decode_key(config.node_key.as_bytes())
        .map_err(|error| GatewayError::NodeKey(Box::new(error)))?;
    let mut gateway_config = GatewayConfig::new(host_key(&config)?, node_key);
    if let Some(command) = &config.args.node_proxy_command {
        gateway_config.node_transport = Transport::ProxyCommand(command.clone());
    }
    let fingerprint = crate::ssh::client::fingerprint(gateway_config.host_key.public_key());
    let listener = tokio::net::TcpListener::bind(config.args.gateway_addr)
        .await
        .map_err(|source| GatewayError::Listen {
            address: config.args.gateway_addr,
            source,
        })?;
    let address = listener.local_addr().map_err(GatewayError::NoAddress)?;
    let authorizations = Authorizations::new();
    let gateway = Gateway::new(gateway_config, authorizations.clone());
    let serve_stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            outcome = gateway.serve(listener) => {
                if let Err(error) = outcome {
                    tracing::error!(%error, "the SSH gateway stopped");
                }
            }
            () = serve_stop.cancelled() => {}
        }
    });
    tokio::spawn(sync(client, config, clock, authorizations.clone(), shutdown));
    tracing::info!(%address, host_key = %fingerprint, "serving the SSH gateway");
    Ok((address, authorizations))
}

/// Keeps `authorizations` equal to the admitted sessions.
async fn sync(
    client: Client,
    config: Arc<Config>,
    clock: Arc<ApiClock>,
    authorizations: Authorizations,
    shutdown: CancellationToken,
) {
    let sessions: Api<ShellSession> = match &config.args.watch_namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let mut events = watcher(sessions, watcher::Config::default()).boxed();
    // Sessions seen during a relist, to drop those that vanished meanwhile.
    let mut relisted: Option<std::collections::HashSet<String>> = None;
    let mut published: HashMap<String, SystemTime> = HashMap::new();
    let mut publish = tokio::time::interval(Duration::from_secs(5));
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The sessions as last seen, to check again that their nodes may still be reached.
    let mut seen: HashMap<String, ShellSession> = HashMap::new();
    let mut recheck = tokio::time::interval(ACCESS_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = publish.tick() => {
                publish_activity(&client, &clock, &authorizations, &mut published).await;
                continue;
            }
            _ = recheck.tick() => {
                // A Device taken back (or its binding moved) changes no ShellSession: look again
                // at every admitted one, and revoke (closing its connections) what may no longer go.
                for session in seen.values() {
                    update(&client, &clock, &authorizations, session).await;
                }
                continue;
            }
            () = shutdown.cancelled() => return,
        };
        let Some(event) = event else { return };
        match event {
            Ok(watcher::Event::Apply(session) | watcher::Event::InitApply(session)) => {
                if let Some(relisted) = relisted.as_mut() {
                    relisted.insert(session_key(&session));
                }
                update(&client, &clock, &authorizations, &session).await;
                if admits(&session) {
                    seen.insert(session_key(&session), session);
                } else {
                    seen.remove(&session_key(&session));
                }
            }
            Ok(watcher::Event::Delete(session)) => {
                seen.remove(&session_key(&session));
                revoke(&authorizations, &session_key(&session), "the session was deleted");
            }
            Ok(watcher::Event::Init) => relisted = Some(std::collections::HashSet::new()),
            Ok(watcher::Event::InitDone) => {
                if let Some(relisted) = relisted.take() {
                    seen.retain(|id, _| relisted.contains(id));
                    for id in authorizations.session_ids() {
                        if !relisted.contains(&id) {
                            revoke(&authorizations, &id, "the session is gone");
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "watching ShellSessions for the gateway");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Whether activity seen at `seen` must be written, given what was written last (pure).
pub fn activity_to_publish(seen: SystemTime, last_published: Option<SystemTime>) -> bool {
    last_published.is_none_or(|last| {
        seen.duration_since(last)
            .is_ok_and(|newer_by| newer_by >= ACTIVITY_PUBLISH_INTERVAL)
    })
}

/// The server-side apply body that records a session's activity in its status (pure).
pub fn activity_patch(when: Timestamp) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "walt.dev/v1alpha1",
        "kind": "ShellSession",
        "status": {"lastActivity": when.to_string()},
    })
}

/// Writes the activity of the sessions served here to their `status.lastActivity`.
async fn publish_activity(
    client: &Client,
    clock: &ApiClock,
    authorizations: &Authorizations,
    published: &mut HashMap<String, SystemTime>,
) {
    let ids = authorizations.session_ids();
    published.retain(|id, _| ids.contains(id));
    for id in ids {
        let Some(seen) = authorizations.last_activity(&id) else {
            continue;
        };
        if !activity_to_publish(seen, published.get(&id).copied()) {
            continue;
        }
        let Some((namespace, name)) = id.split_once('/') else {
            continue;
        };
        // The idle timer compares it with the API server's clock.
        let Some(when) = Timestamp::try_from(seen)
            .ok()
            .and_then(|local| local.checked_add(clock.offset()).ok())
        else {
            continue;
        };
        let sessions: Api<ShellSession> = Api::namespaced(client.clone(), namespace);
        let patch = activity_patch(when);
        match sessions
            .patch_status(
                name,
                &PatchParams::apply(GATEWAY_FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => {
                published.insert(id, seen);
            }
            Err(error) => tracing::debug!(session = %id, %error, "gateway: cannot record activity"),
        }
    }
}

async fn update(client: &Client, clock: &ApiClock, authorizations: &Authorizations, session: &ShellSession) {
    let id = session_key(session);
    if !admits(session) {
        revoke(authorizations, &id, "the session is not running");
        return;
    }
    match resolve_authorization(client, session).await {
        Ok(mut authorization) => {
            // The session's ttl counts from its creationTimestamp, on the API server's clock; the
            // gateway checks expiry against this host's.
            authorization.expires_at = clock.to_local(authorization.expires_at);
            if authorizations.get(&id).is_none() {
                tracing::info!(session = %id, node = %authorization.node, "gateway: session authorized");
            }
            authorizations.add(authorization);
        }
        Err(error) if keeps_authorization(&error) => {
            tracing::warn!(session = %id, %error, "gateway: cannot check the session now; its authorization stays until the API server answers");
        }
        Err(error) => {
            tracing::warn!(session = %id, %error, "gateway: cannot authorize the session");
            revoke(authorizations, &id, &error.to_string());
        }
    }
}

/// Whether a session keeps the authorization it has when checking it again failed (pure): yes when
/// the API server did not answer (restarting, overloaded: the open shells go on, and the next check
/// decides; the session's expiry is enforced here either way), no when the answer says no.
pub fn keeps_authorization(error: &GatewayError) -> bool {
    matches!(error, GatewayError::Api(_))
}

fn revoke(authorizations: &Authorizations, id: &str, why: &str) {
    if authorizations.remove(id).is_some() {
        tracing::info!(session = %id, why, "gateway: session revoked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::shared::node_access::binding_of;
    use crate::ssh::HostKeyPolicy;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use walt_crds::{
        DeviceLoan, DeviceSpec, DeviceStatus, NodeSpec, ShellSessionSpec, ShellSessionStatus, VirtualNode,
    };

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user";

    fn session(phase: ShellSessionPhase) -> ShellSession {
        let mut session = ShellSession::new(
            "s1",
            ShellSessionSpec {
                node: Some("rpi1".into()),
                public_key: Some(KEY.into()),
                ttl: "1h30m".into(),
                idle_timeout: "30m".into(),
                ..ShellSessionSpec::default()
            },
        );
        session.metadata.namespace = Some("alice".into());
        session.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1_000).expect("time")));
        session.status = Some(ShellSessionStatus {
            phase,
            ..ShellSessionStatus::default()
        });
        session
    }

    fn physical() -> Node {
        let mut node = Node::new(
            "rpi1",
            NodeSpec {
                model: "rpi-4-b".into(),
                device: Some("pi".into()),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some("alice".into());
        node.metadata.uid = Some("uid-rpi1".into());
        node
    }

    /// The Device `pi`, lent to `lent_to` and bound to `node`.
    fn device(lent_to: &str, node: &Node) -> Device {
        let mut device = Device::new(
            "pi",
            DeviceSpec {
                address: Some("192.168.152.10".into()),
                ssh_port: 2022,
                model: "rpi-4-b".into(),
                lent_to: Some(DeviceLoan {
                    namespace: lent_to.into(),
                }),
                ..DeviceSpec::default()
            },
        );
        device.status = Some(DeviceStatus {
            bound_to: Some(binding_of(node)),
            ..DeviceStatus::default()
        });
        device
    }

    #[test]
    fn no_authorization_for_a_device_not_lent_to_the_namespace() {
        let node = physical();
        let refused = authorization_of(
            &session(ShellSessionPhase::Running),
            &node,
            None,
            Some(&device("bob", &node)),
        )
        .expect_err("not lent");
        assert!(
            matches!(refused, GatewayError::NoRoute(NoRoute::DeviceNotLent { .. })),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("not lent to the namespace alice"),
            "{refused}"
        );
        let refused =
            authorization_of(&session(ShellSessionPhase::Running), &node, None, None).expect_err("no device");
        assert!(
            matches!(refused, GatewayError::NoRoute(NoRoute::DeviceNotFound { .. })),
            "{refused}"
        );
        assert!(refused.to_string().contains("does not exist"), "{refused}");
    }

    #[test]
    fn activity_is_recorded_in_status_not_in_an_annotation() {
        let patch = activity_patch(Timestamp::from_second(1_000).expect("time"));
        assert_eq!(patch["status"]["lastActivity"], "1970-01-01T00:16:40Z");
        assert!(patch.get("metadata").is_none(), "{patch}");
    }

    /// Issue 15: a session a tenant created with `status.phase: Running` in the body, or patched
    /// so, is admitted only if the operator wrote that status (the API server drops status on
    /// create, and no tenant role may write `shellsessions/status`: see the control-plane test
    /// `a_tenant_cannot_write_status_forge_running_or_extend_idle_time`); what the gateway reads
    /// is the phase alone, so anything short of `Running` is refused.
    #[test]
    fn an_api_server_that_does_not_answer_revokes_nothing_but_a_refusal_does() {
        let blip = GatewayError::Api(Error::Kube {
            action: "reading Node alice/rpi1".into(),
            source: kube::Error::Service("connection refused".into()),
        });
        assert!(keeps_authorization(&blip));
        let gone = GatewayError::NodeNotFound {
            namespace: "alice".into(),
            node: "rpi1".into(),
        };
        assert!(!keeps_authorization(&gone));
        assert!(!keeps_authorization(&GatewayError::NoRoute(
            NoRoute::DeviceNotLent {
                node: "rpi1".into(),
                device: "pi".into(),
                namespace: "alice".into(),
            }
        )));
    }

    #[test]
    fn only_the_running_phase_is_admitted() {
        for phase in [
            ShellSessionPhase::Pending,
            ShellSessionPhase::Starting,
            ShellSessionPhase::Failed,
            ShellSessionPhase::Expired,
        ] {
            assert!(!admits(&session(phase)), "{phase:?}");
        }
        let mut no_status = session(ShellSessionPhase::Running);
        no_status.status = None;
        assert!(!admits(&no_status));
    }

    #[test]
    fn only_running_node_sessions_with_a_key_are_admitted() {
        assert!(admits(&session(ShellSessionPhase::Running)));
        assert!(!admits(&session(ShellSessionPhase::Starting)));
        assert!(!admits(&session(ShellSessionPhase::Expired)));
        let mut deleting = session(ShellSessionPhase::Running);
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(2_000).expect("time")));
        assert!(!admits(&deleting));
        let mut image = session(ShellSessionPhase::Running);
        image.spec.node = None;
        image.spec.image = Some("debian".into());
        assert!(!admits(&image));
    }

    #[test]
    fn physical_and_virtual_targets() {
        let node = physical();
        let authorization = authorization_of(
            &session(ShellSessionPhase::Running),
            &node,
            None,
            Some(&device("alice", &node)),
        )
        .expect("authorized");
        assert_eq!(authorization.session_id, "alice/s1");
        assert_eq!(authorization.node.to_string(), "root@192.168.152.10:2022");
        assert!(matches!(
            authorization.node_host_key,
            HostKeyPolicy::TrustOnFirstUse
        ));
        assert_eq!(
            authorization.expires_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + 5_400)
        );

        let mut virtual_node = physical();
        virtual_node.spec.device = None;
        virtual_node.spec.virtual_node = Some(VirtualNode::default());
        let error = node_target(&virtual_node, None, None).unwrap_err();
        assert!(error.to_string().contains("no running pod"), "{error}");
        let pod = Pod {
            metadata: kube::api::ObjectMeta {
                labels: Some(crate::controller::shared::runtime::owner_labels(
                    "Node",
                    &virtual_node,
                )),
                ..Default::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some("10.88.0.7".into()),
                ..Default::default()
            }),
            ..Pod::default()
        };
        assert_eq!(
            node_target(&virtual_node, Some(&pod), None)
                .expect("target")
                .to_string(),
            "root@10.88.0.7:22"
        );
    }

    #[test]
    fn activity_is_written_at_most_every_interval() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(activity_to_publish(t0, None));
        assert!(!activity_to_publish(t0 + Duration::from_secs(3), Some(t0)));
        assert!(activity_to_publish(t0 + ACTIVITY_PUBLISH_INTERVAL, Some(t0)));
        assert!(!activity_to_publish(t0, Some(t0 + Duration::from_secs(1))));
    }

    #[test]
    fn a_pinned_or_recorded_host_key_is_enforced() {
        let node = physical();
        let mut pi = device("alice", &node);
        pi.spec.host_key = Some(KEY.into());
        assert!(matches!(
            host_key_policy(&node, Some(&pi)),
            Ok(HostKeyPolicy::Pinned(_))
        ));
        pi.spec.host_key = Some("not a key".into());
        assert!(
            host_key_policy(&node, Some(&pi))
                .unwrap_err()
                .to_string()
                .contains("host key of Node rpi1")
        );
    }
}
