//! Prometheus metrics of the operator, served as text on `/metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `walt_reconciles_total` | counter | `kind` |
//! | `walt_reconcile_errors_total` | counter | `kind`, `error` ([`Error::metric_label`]) |
//! | `walt_reconcile_duration_seconds` | histogram | `kind` |
//! | `walt_saved_bytes_total` | counter | — (compressed layer bytes pushed by node saves) |
//! | `walt_node_saves_total` | counter | `result`: succeeded, failed, cancelled (node saves run by this process) |
//! | `walt_objects` | gauge | `kind` (Node, ShellSession, NodeSave, ImageBuild), `phase` ([`census`](super::census)) |
//! | `walt_active_shells` | gauge | — (ShellSessions in Starting, Running, Committing or AwaitingDecision) |
//! | `walt_shells_stuck` | gauge | — (ShellSessions Pending or Starting for more than 5 minutes) |
//! | `walt_running_saves` | gauge | — (node saves running in this process) |
//! | `walt_leader` | gauge | — (1 while this replica holds the Lease) |
//!
//! The gauges of the census are set by every replica (each watches everything), so dashboards and
//! alerts take the `max` over replicas.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::shared::error::Error;

/// The kinds the operator reconciles (the `kind` label).
pub const KINDS: [&str; 5] = ["Node", "Image", "ShellSession", "NodeSave", "ImageBuild"];

/// How a node save ends (the `result` label of `walt_node_saves_total`).
pub const SAVE_RESULTS: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// Labels of per-kind metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The reconciled kind: Image, Node, ShellSession, NodeSave, ImageBuild.
    pub kind: &'static str,
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The reconciled kind.
    pub kind: &'static str,
    /// [`Error::metric_label`].
    pub error: &'static str,
}

/// Labels of the node save counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// How the save ended: succeeded, failed or cancelled.
    pub result: &'static str,
}

/// Labels of the object census gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The kind counted: Node, ShellSession, NodeSave, ImageBuild.
    pub kind: &'static str,
    /// The phase, as in the objects' `status.phase`.
    pub phase: String,
}

/// All metrics of the operator, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    /// Reconciles started, per kind.
    pub reconciles: Family<KindLabels, Counter>,
    /// Reconciles failed, per kind and error.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile durations, per kind.
    pub durations: Family<KindLabels, Histogram>,
    /// Compressed bytes pushed by node saves.
    pub saved_bytes: Counter<u64, AtomicU64>,
    /// Node saves that ended in this process, per result.
    pub node_saves: Family<ResultLabels, Counter>,
    /// Objects per kind and phase (the census).
    pub objects: Family<PhaseLabels, Gauge>,
    /// Shell sessions currently active (the census).
    pub active_shells: Gauge,
    /// Shell sessions stuck before Running (the census).
    pub stuck_shells: Gauge,
    /// Node saves running in this process.
    pub running_saves: Gauge,
    /// 1 while this replica leads.
    pub leader: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("walt");
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let durations = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let saved_bytes = Counter::<u64, AtomicU64>::default();
        let node_saves = Family::<ResultLabels, Counter>::default();
        let objects = Family::<PhaseLabels, Gauge>::default();
        let active_shells = Gauge::default();
        let stuck_shells = Gauge::default();
        let running_saves = Gauge::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles started, per kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, per kind and error",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles, per kind",
            durations.clone(),
        );
        registry.register(
            "saved_bytes",
            "Compressed layer bytes pushed by node saves",
            saved_bytes.clone(),
        );
        registry.register(
            "node_saves",
            "Node saves that ended in this process, per result",
            node_saves.clone(),
        );
        registry.register("objects", "Objects per kind and phase", objects.clone());
        registry.register(
            "active_shells",
            "ShellSessions in Starting, Running, Committing or AwaitingDecision",
            active_shells.clone(),
        );
        registry.register(
            "shells_stuck",
            "ShellSessions Pending or Starting for more than 5 minutes",
            stuck_shells.clone(),
        );
        registry.register(
            "running_saves",
            "Node saves running in this operator process",
            running_saves.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        // Every known series starts at 0: a counter that appears only at its first increment is
        // invisible to `rate()` and `increase()` until its second.
        for kind in KINDS {
            let _ = reconciles.get_or_create(&KindLabels { kind });
            for error in Error::METRIC_LABELS {
                let _ = errors.get_or_create(&ErrorLabels { kind, error });
            }
        }
        for result in SAVE_RESULTS {
            let _ = node_saves.get_or_create(&ResultLabels { result });
        }
        Self {
            registry,
            reconciles,
            errors,
            durations,
            saved_bytes,
            node_saves,
            objects,
            active_shells,
            stuck_shells,
            running_saves,
            leader,
        }
    }

    /// Counts a reconcile of `kind` and returns a guard that records its
    /// duration when dropped.
    pub fn reconcile_started(&self, kind: &'static str) -> DurationGuard<'_> {
        self.reconciles.get_or_create(&KindLabels { kind }).inc();
        DurationGuard {
            metrics: self,
            kind,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, kind: &'static str, error: &Error) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind,
                error: error.metric_label(),
            })
            .inc();
    }

    /// Counts a node save that ended with `result` (succeeded, failed, cancelled).
    pub fn node_save_ended(&self, result: &'static str) {
        self.node_saves.get_or_create(&ResultLabels { result }).inc();
    }

    /// Sets the census gauges (phases no longer seen drop out instead of staying at their last count).
    pub fn record_census(&self, census: &super::census::Census) {
        self.objects.clear();
        for ((kind, phase), count) in &census.objects {
            self.objects
                .get_or_create(&PhaseLabels {
                    kind,
                    phase: phase.clone(),
                })
                .set(*count);
        }
        self.active_shells.set(census.active_shells);
        self.stuck_shells.set(census.stuck_shells);
    }

    /// Renders all metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Records the duration of one reconcile when dropped.
pub struct DurationGuard<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for DurationGuard<'_> {
    fn drop(&mut self) {
        self.metrics
            .durations
            .get_or_create(&KindLabels { kind: self.kind })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_errors_and_durations() {
        let metrics = Metrics::new();
        {
            let _guard = metrics.reconcile_started("Image");
        }
        metrics.reconcile_failed("Image", &Error::Registry("503".into()));
        metrics.saved_bytes.inc_by(42);
        metrics.active_shells.set(3);
        let text = metrics.render();
        assert!(text.contains("walt_reconciles_total{kind=\"Image\"} 1"), "{text}");
        assert!(text.contains("walt_reconciles_total{kind=\"Node\"} 0"), "{text}");
        assert!(
            text.contains("walt_reconcile_errors_total{kind=\"NodeSave\",error=\"ssh\"} 0"),
            "every known error series starts at 0: {text}"
        );
        assert!(
            text.contains("walt_node_saves_total{result=\"cancelled\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("walt_reconcile_errors_total{kind=\"Image\",error=\"registry\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("walt_reconcile_duration_seconds_count{kind=\"Image\"} 1"),
            "{text}"
        );
        assert!(text.contains("walt_saved_bytes_total 42"), "{text}");
        assert!(text.contains("walt_active_shells 3"), "{text}");
        metrics.node_save_ended("failed");
        let census = super::super::census::Census {
            objects: [(("Node", "Unreachable".to_owned()), 2)].into_iter().collect(),
            active_shells: 1,
            stuck_shells: 1,
        };
        metrics.record_census(&census);
        let text = metrics.render();
        assert!(
            text.contains("walt_node_saves_total{result=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("walt_objects{kind=\"Node\",phase=\"Unreachable\"} 2"),
            "{text}"
        );
        assert!(text.contains("walt_active_shells 1"), "{text}");
        assert!(text.contains("walt_shells_stuck 1"), "{text}");
        metrics.record_census(&super::super::census::Census::default());
        assert!(
            !metrics.render().contains("phase=\"Unreachable\""),
            "a phase no longer seen drops out"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
