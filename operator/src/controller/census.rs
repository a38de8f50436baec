//! The census: how many objects of each kind are in each phase, counted from the controllers'
//! caches every [`CENSUS_INTERVAL`] for the gauges `walt_objects`, `walt_active_shells` and
//! `walt_shells_stuck` that the chart's alerts and dashboard read. Counting is pure ([`count`]);
//! [`run`] only reads the caches and sets the gauges.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use walt_crds::{ImageBuild, Node, NodeSave, ShellSession, ShellSessionPhase};

use super::metrics::Metrics;
use super::shared::cached::Cached;

/// How often the census is taken (a scrape sees counts at most this old).
pub const CENSUS_INTERVAL: Duration = Duration::from_secs(15);

/// A shell session still Pending or Starting this long after it was created is stuck (its pod
/// cannot be scheduled or pulled, its node cannot be reached): `walt_shells_stuck` counts it.
pub const STUCK_AFTER: Duration = Duration::from_mins(5);

/// The counts of one census.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Objects per (kind, phase). An object without a status yet is counted as `Pending`.
    pub objects: BTreeMap<(&'static str, String), i64>,
    /// Shell sessions that hold a shell open or a decision pending (Starting, Running, Committing,
    /// AwaitingDecision).
    pub active_shells: i64,
    /// Shell sessions Pending or Starting for longer than [`STUCK_AFTER`].
    pub stuck_shells: i64,
}

/// Counts `nodes`, `sessions`, `saves` and `builds` as of `now`.
pub fn count<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    sessions: impl IntoIterator<Item = &'a ShellSession>,
    saves: impl IntoIterator<Item = &'a NodeSave>,
    builds: impl IntoIterator<Item = &'a ImageBuild>,
    now: Timestamp,
) -> Census {
    let mut census = Census::default();
    for node in nodes {
        census.add("Node", node.status.as_ref().map(|status| status.phase));
    }
    for save in saves {
        census.add("NodeSave", save.status.as_ref().map(|status| status.phase));
    }
    for build in builds {
        census.add("ImageBuild", build.status.as_ref().map(|status| status.phase));
    }
    for session in sessions {
        let phase = session
            .status
            .as_ref()
            .map_or_else(Default::default, |status| status.phase);
        census.add("ShellSession", Some(phase));
        if is_active(phase) {
            census.active_shells += 1;
        }
        if is_stuck(session, phase, now) {
            census.stuck_shells += 1;
        }
    }
    census
}

impl Census {
    fn add(&mut self, kind: &'static str, phase: Option<impl Serialize>) {
        let phase = phase.map_or_else(|| "Pending".to_owned(), |phase| phase_label(&phase));
        *self.objects.entry((kind, phase)).or_default() += 1;
    }
}

/// The phase as the API spells it (`AwaitingDecision`, not a Rust debug form).
fn phase_label(phase: &impl Serialize) -> String {
    match serde_json::to_value(phase) {
        Ok(serde_json::Value::String(text)) => text,
        _ => "Unknown".to_owned(),
    }
}

fn is_active(phase: ShellSessionPhase) -> bool {
    matches!(
        phase,
        ShellSessionPhase::Starting
            | ShellSessionPhase::Running
            | ShellSessionPhase::Committing
            | ShellSessionPhase::AwaitingDecision
    )
}

fn is_stuck(session: &ShellSession, phase: ShellSessionPhase, now: Timestamp) -> bool {
    let waiting = matches!(phase, ShellSessionPhase::Pending | ShellSessionPhase::Starting);
    let age = session
        .creation_timestamp()
        .and_then(|created| now.duration_since(created.0).try_into().ok())
        .unwrap_or(Duration::ZERO);
    waiting && age > STUCK_AFTER
}

/// The controllers' caches the census reads.
pub struct Caches {
    /// The Node controller's cache.
    pub nodes: Store<Cached<Node>>,
    /// The ShellSession controller's cache.
    pub sessions: Store<Cached<ShellSession>>,
    /// The NodeSave controller's cache.
    pub saves: Store<Cached<NodeSave>>,
    /// The ImageBuild controller's cache.
    pub builds: Store<Cached<ImageBuild>>,
}

/// Takes a census every [`CENSUS_INTERVAL`] until `shutdown`, and sets the gauges.
pub async fn run(caches: Caches, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(CENSUS_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let (nodes, sessions, saves, builds) = (
            caches.nodes.state(),
            caches.sessions.state(),
            caches.saves.state(),
            caches.builds.state(),
        );
        // Objects the cache could not decode are counted by nothing: their reconcile reports them.
        let census = count(
            nodes.iter().filter_map(|node| node.0.as_ref().ok()),
            sessions.iter().filter_map(|session| session.0.as_ref().ok()),
            saves.iter().filter_map(|save| save.0.as_ref().ok()),
            builds.iter().filter_map(|build| build.0.as_ref().ok()),
            Timestamp::now(),
        );
        metrics.record_census(&census);
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use walt_crds::{
        ImageBuildPhase, ImageBuildSpec, NodePhase, NodeSavePhase, NodeSaveSpec, NodeSpec, NodeStatus,
        ShellSessionSpec,
    };

    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("a valid time")
    }

    fn node(phase: Option<NodePhase>) -> Node {
        let mut node = Node::new("n", NodeSpec::default());
        node.status = phase.map(|phase| NodeStatus {
            phase,
            ..NodeStatus::default()
        });
        node
    }

    fn session(phase: ShellSessionPhase, created: i64) -> ShellSession {
        let mut session = ShellSession::new("s", ShellSessionSpec::default());
        session.metadata.creation_timestamp = Some(Time(at(created)));
        session.status = Some(walt_crds::ShellSessionStatus {
            phase,
            ..Default::default()
        });
        session
    }

    #[test]
    fn counts_each_kind_by_phase_and_objects_without_status_as_pending() {
        let nodes = [
            node(Some(NodePhase::Ready)),
            node(Some(NodePhase::Unreachable)),
            node(None),
        ];
        let mut save = NodeSave::new("save", NodeSaveSpec::default());
        save.status = Some(walt_crds::NodeSaveStatus {
            phase: NodeSavePhase::Failed,
            ..Default::default()
        });
        let mut build = ImageBuild::new("build", ImageBuildSpec::default());
        build.status = Some(walt_crds::ImageBuildStatus {
            phase: ImageBuildPhase::Building,
            ..Default::default()
        });
        let fresh = ImageBuild::new("fresh", ImageBuildSpec::default());
        let census = count(&nodes, [], [&save], [&build, &fresh], at(0));
        let expected: BTreeMap<_, _> = [
            (("ImageBuild", "Building".to_owned()), 1),
            (("ImageBuild", "Pending".to_owned()), 1),
            (("Node", "Pending".to_owned()), 1),
            (("Node", "Ready".to_owned()), 1),
            (("Node", "Unreachable".to_owned()), 1),
            (("NodeSave", "Failed".to_owned()), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(census.objects, expected);
    }

    #[test]
    fn a_session_waiting_longer_than_stuck_after_is_stuck_and_running_ones_are_active() {
        let limit = i64::try_from(STUCK_AFTER.as_secs()).expect("small");
        let now = 10_000;
        let sessions = [
            session(ShellSessionPhase::Starting, now - limit - 1),
            session(ShellSessionPhase::Pending, now - limit - 1),
            session(ShellSessionPhase::Starting, now - limit + 1),
            session(ShellSessionPhase::Running, now - 10 * limit),
            session(ShellSessionPhase::AwaitingDecision, now),
            session(ShellSessionPhase::Saved, now - 10 * limit),
        ];
        let census = count([], &sessions, [], [], at(now));
        assert_eq!(census.stuck_shells, 2);
        assert_eq!(census.active_shells, 4, "Starting (2), Running, AwaitingDecision");
        assert_eq!(
            census
                .objects
                .get(&("ShellSession", "AwaitingDecision".to_owned())),
            Some(&1)
        );
    }
}
