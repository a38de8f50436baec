//! Node shells: dereference the Node (and a virtual node's pod) → the pure [`decide`] (ttl, idle
//! time, public key, where the node is, its host key) → one status write and an Event. The gateway
//! ([`crate::controller::gateway`]) admits the session's key while this writes it `Running`.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{
    ConditionStatus, Device, Gateway, Node, ShellSession, ShellSessionPhase, ShellSessionStatus,
};

use super::reasons;
use super::{READY, condition, end, write_status};
use crate::controller::shared::context::Context;
use crate::controller::shared::error::{KubeResultExt, Result};
use crate::controller::shared::node_access::{host_key_policy, node_device, node_target, vnode_pod};
use crate::controller::shared::session::{ACCESS_RECHECK, Bounded, session_duration};

/// How often a session waiting for its node to have an address looks again.
const ROUTE_RETRY: Duration = Duration::from_secs(5);

/// A node shell's lifetime: its `ttl` under the lab's ceiling, and the ceiling of its `idleTimeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// `spec.ttl`, at most `--max-session-ttl`.
    pub ttl: Bounded,
    /// `--max-session-idle-timeout`.
    pub max_idle_timeout: Duration,
}

/// What a node shell's reconcile does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// End the session in `phase` (Expired or Failed).
    End {
        /// Expired or Failed.
        phase: ShellSessionPhase,
        /// Condition and Event reason.
        reason: &'static str,
        /// What the user reads.
        message: String,
    },
    /// The node has no address yet: `Starting`, look again in `retry`.
    WaitForRoute {
        /// Why.
        message: String,
        /// When to look again.
        retry: Duration,
    },
    /// `Running`: the gateway admits the key for `until_ttl`, unless idle for `idle_left`.
    Authorize {
        /// Time left before the ttl.
        until_ttl: Duration,
        /// Idle time left.
        idle_left: Duration,
        /// What was over the lab's ceilings (said in the Ready condition), if anything.
        clamped: Option<String>,
    },
}

/// How long a node shell may still stay idle (pure): `idle` after the latest of its start, its
/// creation, and the activity the gateway recorded (`status.lastActivity`); zero when that is past.
/// Only status counts, which only the operator writes: annotations (the tenant's) are not read.
pub fn idle_left(session: &ShellSession, idle: Duration, now: Timestamp) -> Duration {
    let status = session.status.as_ref();
    let activity = status
        .and_then(|status| status.last_activity.as_ref())
        .map(|time| time.0);
    let started = status
        .and_then(|status| status.start_time.as_ref())
        .map(|time| time.0);
    let created = session.creation_timestamp().map(|time| time.0);
    let Some(since) = [activity, started, created].into_iter().flatten().max() else {
        return idle;
    };
    let idle_for = now.duration_since(since).unsigned_abs();
    idle.saturating_sub(idle_for)
}

fn ended(phase: ShellSessionPhase, reason: &'static str, message: String) -> Step {
    Step::End {
        phase,
        reason,
        message,
    }
}

/// What a condition says about requests over the lab's ceilings (pure).
fn ceiling_notes(ttl: Bounded, idle: Bounded) -> Option<String> {
    let notes: Vec<String> = [
        ttl.note("spec.ttl", "--max-session-ttl"),
        idle.note("spec.idleTimeout", "--max-session-idle-timeout"),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!notes.is_empty()).then(|| notes.join("; "))
}

// A little long: one guard per way a node shell ends or waits, in the order the user should hear
// about them (ttl, idle, key, node, route, host key); each guard is a few lines and returns.
/// Decides a node shell's next step (pure) from the session, its Node (if found), the Node's
/// virtual node pod (if any), its lifetime under the lab's ceilings and now.
pub fn decide(
    session: &ShellSession,
    node: Option<&Node>,
    vnode_pod: Option<&k8s_openapi::api::core::v1::Pod>,
    device: Option<&Device>,
    lifetime: Lifetime,
    now: Timestamp,
) -> Step {
    let ttl = lifetime.ttl.value;
    let age = session
        .creation_timestamp()
        .map(|created| now.duration_since(created.0).unsigned_abs())
        .unwrap_or_default();
    if age >= ttl {
        return ended(
            ShellSessionPhase::Expired,
            reasons::TTL_EXPIRED,
            format!(
                "the session reached its ttl ({}): the gateway no longer admits its key; open a new session",
                walt_crds::format_duration(ttl)
            ),
        );
    }
    let idle = match session_duration(&session.spec.idle_timeout) {
        Ok(idle) => Bounded::new(idle, lifetime.max_idle_timeout),
        Err(error) => {
            return ended(
                ShellSessionPhase::Failed,
                reasons::INVALID_IDLE_TIMEOUT,
                format!("spec.idleTimeout: {error}"),
            );
        }
    };
    let idle_left = idle_left(session, idle.value, now);
    if idle_left.is_zero() {
        return ended(
            ShellSessionPhase::Expired,
            reasons::IDLE_TIMEOUT,
            format!(
                "no input or output through the gateway for {} (spec.idleTimeout{}): the gateway no longer admits its key; open a new session",
                walt_crds::format_duration(idle.value),
                if idle.is_clamped() {
                    ", at most the lab's ceiling"
                } else {
                    ""
                }
            ),
        );
    }
    let Some(key) = session.spec.public_key.as_deref() else {
        return ended(
            ShellSessionPhase::Failed,
            reasons::NO_PUBLIC_KEY,
            "a node shell needs spec.publicKey: the OpenSSH public key that may log in through the gateway (`kubectl walt node shell` makes one)".into(),
        );
    };
    if let Err(error) = crate::ssh::client::parse_public_key(key) {
        return ended(
            ShellSessionPhase::Failed,
            reasons::INVALID_PUBLIC_KEY,
            format!("spec.publicKey: {error}"),
        );
    }
    let Some(node) = node else {
        let namespace = session.namespace().unwrap_or_default();
        let node_name = session.spec.node.clone().unwrap_or_default();
        return ended(
            ShellSessionPhase::Failed,
            reasons::NODE_NOT_FOUND,
            format!(
                "Node {namespace}/{node_name} not found: a node shell opens a Node of its own namespace (`kubectl walt node ls`)"
            ),
        );
    };
    let until_ttl = ttl.saturating_sub(age);
    if let Err(why) = node_target(node, vnode_pod, device) {
        if !why.is_transient() {
            return ended(ShellSessionPhase::Failed, why.reason(), why.to_string());
        }
        return Step::WaitForRoute {
            message: format!("{why}; the session starts once it has one"),
            retry: ROUTE_RETRY.min(until_ttl),
        };
    }
    if let Err(why) = host_key_policy(node, device) {
        return ended(
            ShellSessionPhase::Failed,
            reasons::INVALID_HOST_KEY,
            why.to_string(),
        );
    }
    Step::Authorize {
        until_ttl,
        idle_left,
        clamped: ceiling_notes(lifetime.ttl, idle),
    }
}

/// Reconciles a node shell: reads the Node and its pod, decides, writes the status once.
pub async fn reconcile(
    session: &ShellSession,
    context: &Context,
    mut status: ShellSessionStatus,
    lifetime: Lifetime,
) -> Result<Action> {
    let namespace = session.namespace().unwrap_or_default();
    let node_name = session.spec.node.clone().unwrap_or_default();
    let node = Api::<Node>::namespaced(context.client.clone(), &namespace)
        .get_opt(&node_name)
        .await
        .context(|| format!("reading Node {namespace}/{node_name}"))?;
    let (pod, device) = match &node {
        Some(node) => (
            vnode_pod(&context.client, node).await?,
            node_device(&context.client, node).await?,
        ),
        None => (None, None),
    };
    match decide(
        session,
        node.as_ref(),
        pod.as_ref(),
        device.as_ref(),
        lifetime,
        context.clock.now(),
    ) {
        Step::End {
            phase,
            reason,
            message,
        } => end(context, session, status, phase, reason, message).await,
        Step::WaitForRoute { message, retry } => {
            status.phase = ShellSessionPhase::Starting;
            condition(
                &mut status,
                session,
                READY,
                ConditionStatus::False,
                reasons::NODE_NOT_REACHABLE,
                message,
            );
            write_status(context, session, status).await?;
            Ok(Action::requeue(retry))
        }
        Step::Authorize {
            until_ttl,
            idle_left,
            clamped,
        } => {
            let created = session
                .creation_timestamp()
                .map_or_else(Timestamp::now, |created| created.0);
            let expires = created.checked_add(lifetime.ttl.value).unwrap_or(created);
            authorize(session, context, status, expires, (until_ttl, idle_left), clamped).await
        }
    }
}

/// Writes the session `Running` with where the gateway is; an Event the first time.
async fn authorize(
    session: &ShellSession,
    context: &Context,
    mut status: ShellSessionStatus,
    expires: Timestamp,
    (until_ttl, idle_left): (Duration, Duration),
    clamped: Option<String>,
) -> Result<Action> {
    let name = session.name_any();
    let node_name = session.spec.node.clone().unwrap_or_default();
    let was_running = status.phase == ShellSessionPhase::Running;
    status.phase = ShellSessionPhase::Running;
    status.start_time = status.start_time.or_else(|| Some(Time(context.clock.now())));
    status.gateway = Some(Gateway {
        service: format!(
            "{}.{}",
            context.config.args.gateway_service, context.config.args.namespace
        ),
        port: i32::from(context.config.args.gateway_service_port),
        user: name.clone(),
    });
    // The expiry, not the time left: the message stays the same from one check to the next, so
    // an unchanged session writes nothing.
    let mut message =
        format!("the gateway admits spec.publicKey as SSH user {name} for Node {node_name} until {expires}");
    if let Some(clamped) = clamped {
        message = format!("{message}; {clamped}");
    }
    condition(
        &mut status,
        session,
        READY,
        ConditionStatus::True,
        reasons::AUTHORIZED,
        message.clone(),
    );
    write_status(context, session, status).await?;
    if !was_running {
        context
            .event(
                session,
                EventType::Normal,
                reasons::AUTHORIZED,
                "Authorize",
                message,
            )
            .await;
    }
    Ok(Action::requeue(
        until_ttl.min(idle_left).min(ACCESS_RECHECK) + Duration::from_secs(1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::shared::node_access::binding_of;
    use walt_crds::{DeviceLoan, DeviceSpec, DeviceStatus, NodeSpec, ShellSessionSpec};

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINmSuQ/gQGDMIEuOaUKquLGqbQDj1Arq8ZriXb9X8SgB walt";

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("time")
    }

    fn session(public_key: Option<&str>) -> ShellSession {
        let mut session = ShellSession::new(
            "s",
            ShellSessionSpec {
                node: Some("rpi1".into()),
                public_key: public_key.map(str::to_owned),
                idle_timeout: "30m".into(),
                ..ShellSessionSpec::default()
            },
        );
        session.metadata.creation_timestamp = Some(Time(at(1_000)));
        session
    }

    fn node() -> Node {
        let mut node = Node::new(
            "rpi1",
            NodeSpec {
                device: Some("pi".into()),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some("alice".into());
        node.metadata.uid = Some("uid-rpi1".into());
        node
    }

    /// The Device `pi`, lent to `lent_to`, bound to `node` when given.
    fn device(lent_to: &str, bound: Option<&Node>) -> Device {
        let mut device = Device::new(
            "pi",
            DeviceSpec {
                address: Some("10.0.0.5".into()),
                ssh_port: 22,
                model: "rpi-4-b".into(),
                lent_to: Some(DeviceLoan {
                    namespace: lent_to.into(),
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

    /// A lifetime of `ttl` under ceilings of a day and an hour of idle time.
    fn lifetime(ttl: Duration) -> Lifetime {
        Lifetime {
            ttl: Bounded::new(ttl, Duration::from_hours(24)),
            max_idle_timeout: Duration::from_hours(1),
        }
    }

    fn reason(step: &Step) -> &'static str {
        match step {
            Step::End { reason, .. } => reason,
            Step::WaitForRoute { .. } => reasons::NODE_NOT_REACHABLE,
            Step::Authorize { .. } => reasons::AUTHORIZED,
        }
    }

    #[test]
    fn a_valid_session_on_a_reachable_node_is_authorized_until_its_ttl() {
        let hour = Duration::from_hours(1);
        let reachable = node();
        let pi = device("alice", Some(&reachable));
        let step = decide(
            &session(Some(KEY)),
            Some(&reachable),
            None,
            Some(&pi),
            lifetime(hour),
            at(1_600),
        );
        assert_eq!(
            step,
            Step::Authorize {
                until_ttl: Duration::from_mins(50),
                idle_left: Duration::from_mins(20),
                clamped: None,
            }
        );
    }

    /// Issue 15: a session asking for more than the lab's ceilings gets the ceilings, and its
    /// condition says so; past the ceiling (not its request) it is over.
    #[test]
    fn requests_over_the_lab_ceilings_are_clamped_and_said() {
        let mut greedy = session(Some(KEY));
        greedy.spec.idle_timeout = "240h".into();
        let ceilings = Lifetime {
            ttl: Bounded::new(Duration::from_hours(1000), Duration::from_hours(12)),
            max_idle_timeout: Duration::from_hours(1),
        };
        let reachable = node();
        let pi = device("alice", Some(&reachable));
        let Step::Authorize {
            until_ttl,
            idle_left,
            clamped: Some(note),
        } = decide(&greedy, Some(&reachable), None, Some(&pi), ceilings, at(1_060))
        else {
            panic!("authorized with a note");
        };
        assert_eq!(until_ttl, Duration::from_mins(12 * 60 - 1));
        assert_eq!(idle_left, Duration::from_mins(59));
        assert!(
            note.contains("spec.ttl 1000h0m0s is over the lab's ceiling 12h0m0s (--max-session-ttl)"),
            "{note}"
        );
        assert!(
            note.contains("spec.idleTimeout 240h0m0s is over the lab's ceiling 1h0m0s"),
            "{note}"
        );
        let idle = decide(
            &greedy,
            Some(&reachable),
            None,
            Some(&pi),
            ceilings,
            at(1_000 + 3_600),
        );
        assert_eq!(reason(&idle), reasons::IDLE_TIMEOUT);
        let old = decide(
            &greedy,
            Some(&reachable),
            None,
            Some(&pi),
            ceilings,
            at(1_000 + 12 * 3600),
        );
        assert_eq!(reason(&old), reasons::TTL_EXPIRED);
    }

    // Long: one table of every refusal and its reason, read in one place.
    #[test]
    fn each_refusal_has_its_reason() {
        let hour = Duration::from_hours(1);
        let reachable = node();
        let pi = device("alice", Some(&reachable));
        assert_eq!(
            reason(&decide(
                &session(Some(KEY)),
                Some(&reachable),
                None,
                Some(&pi),
                lifetime(hour),
                at(5_000)
            )),
            reasons::TTL_EXPIRED
        );
        assert_eq!(
            reason(&decide(
                &session(Some(KEY)),
                Some(&reachable),
                None,
                Some(&pi),
                lifetime(hour),
                at(3_000)
            )),
            reasons::IDLE_TIMEOUT
        );
        assert_eq!(
            reason(&decide(
                &session(None),
                Some(&reachable),
                None,
                Some(&pi),
                lifetime(hour),
                at(1_010)
            )),
            reasons::NO_PUBLIC_KEY
        );
        assert_eq!(
            reason(&decide(
                &session(Some("ssh-rsa nope")),
                Some(&reachable),
                None,
                Some(&pi),
                lifetime(hour),
                at(1_010)
            )),
            reasons::INVALID_PUBLIC_KEY
        );
        assert_eq!(
            reason(&decide(
                &session(Some(KEY)),
                None,
                None,
                None,
                lifetime(hour),
                at(1_010)
            )),
            reasons::NODE_NOT_FOUND
        );
        assert_eq!(
            reason(&decide(
                &session(Some(KEY)),
                Some(&reachable),
                None,
                Some(&device("alice", None)),
                lifetime(hour),
                at(1_010)
            )),
            reasons::NODE_NOT_REACHABLE
        );
        assert_eq!(
            reason(&decide(
                &session(Some(KEY)),
                Some(&reachable),
                None,
                Some(&device("bob", Some(&reachable))),
                lifetime(hour),
                at(1_010)
            )),
            "DeviceNotLent"
        );
        let mut bad_key = pi.clone();
        bad_key.spec.host_key = Some("not a key".into());
        assert_eq!(
            reason(&decide(
                &session(Some(KEY)),
                Some(&reachable),
                None,
                Some(&bad_key),
                lifetime(hour),
                at(1_010)
            )),
            reasons::INVALID_HOST_KEY
        );
        let mut bad_idle = session(Some(KEY));
        bad_idle.spec.idle_timeout = "soon".into();
        assert_eq!(
            reason(&decide(
                &bad_idle,
                Some(&reachable),
                None,
                Some(&pi),
                lifetime(hour),
                at(1_010)
            )),
            reasons::INVALID_IDLE_TIMEOUT
        );
    }

    #[test]
    fn idle_time_counts_from_the_latest_activity() {
        let mut session = ShellSession::new("s", ShellSessionSpec::default());
        session.metadata.creation_timestamp = Some(Time(at(1_000)));
        let idle = Duration::from_mins(10);
        assert_eq!(idle_left(&session, idle, at(1_060)), Duration::from_mins(9));
        session.status = Some(ShellSessionStatus {
            start_time: Some(Time(at(1_100))),
            ..ShellSessionStatus::default()
        });
        assert_eq!(idle_left(&session, idle, at(1_160)), Duration::from_mins(9));
        if let Some(status) = session.status.as_mut() {
            status.last_activity = Some(Time(at(1_500)));
        }
        assert_eq!(idle_left(&session, idle, at(1_560)), Duration::from_mins(9));
        assert_eq!(idle_left(&session, idle, at(2_200)), Duration::ZERO);
    }

    /// Issue 15: the tenant writes the annotation the gateway once used, far in the future; the idle
    /// timer does not read it.
    #[test]
    fn a_tenant_written_activity_annotation_does_not_extend_the_idle_time() {
        let mut session = session(Some(KEY));
        session.metadata.annotations =
            Some([("walt.dev/last-activity".to_owned(), at(1_000_000).to_string())].into());
        let idle = Duration::from_mins(30);
        assert_eq!(idle_left(&session, idle, at(1_000 + 1_800)), Duration::ZERO);
        let reachable = node();
        let pi = device("alice", Some(&reachable));
        let step = decide(
            &session,
            Some(&reachable),
            None,
            Some(&pi),
            lifetime(Duration::from_hours(1)),
            at(1_000 + 1_800),
        );
        assert_eq!(reason(&step), reasons::IDLE_TIMEOUT);
    }
}
