//! Publishing Events (`events.k8s.io/v1`): [`EventPublisher`], in place of kube's `Recorder`.
//!
//! The same occurrence repeated (the same object, type, reason, action **and note**) within
//! [`SERIES_TTL`] becomes a series on the first Event (`series.count`, `lastObservedTime`) instead of
//! a new Event, as with kube's recorder. Two things differ, both seen at scale:
//! - kube's recorder keys a series without the note: a second `Rebooting` or `HostKeyMismatch` with
//!   another message (another image, another key) was counted on the first Event, whose note then
//!   showed the former message to users. Here a new note is a new Event.
//! - kube's recorder keeps a whole copy of every Event it sent for the TTL and scans them all on each
//!   publish: at 10,000 Nodes + 10,000 Images, 30,000 Events of about a kilobyte each. Here a series is
//!   a hash of its key, the Event's name and namespace, a count and a time (about 100 bytes), pruned at
//!   most every [`PRUNE_EVERY`].

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client};

/// How long a repeated occurrence extends the series of its first Event (kube's recorder's too).
pub const SERIES_TTL: Duration = Duration::from_mins(6);
/// How often ended series are forgotten (not on every publish: that scanned them all each time).
pub const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// One series being counted.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Series {
    /// The first Event's name and namespace (what a repeat patches).
    name: String,
    namespace: String,
    /// Occurrences so far.
    count: i32,
    /// The last occurrence.
    last: Timestamp,
}

/// What to publish for an occurrence (the pure decision of [`SeriesBook::next`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Publish {
    /// A new Event.
    Create,
    /// The occurrence `count` of the series of the Event `name` in `namespace`.
    Repeat {
        /// The first Event's name.
        name: String,
        /// Its namespace.
        namespace: String,
        /// The new count (2 at the first repeat).
        count: i32,
    },
}

/// The series being counted, by key ([`series_key`]).
#[derive(Debug, Default)]
pub struct SeriesBook {
    series: HashMap<u64, Series>,
    pruned: Option<Timestamp>,
}

/// Whether `last` is older than the series TTL at `now` (pure).
fn ended(last: Timestamp, now: Timestamp) -> bool {
    now.duration_since(last).unsigned_abs() >= SERIES_TTL
}

impl SeriesBook {
    /// What to send for an occurrence of `key` at `now` (pure but for forgetting ended series).
    pub fn next(&mut self, key: u64, now: Timestamp) -> Publish {
        self.prune(now);
        match self.series.get(&key) {
            Some(series) if !ended(series.last, now) => Publish::Repeat {
                name: series.name.clone(),
                namespace: series.namespace.clone(),
                count: series.count + 1,
            },
            _ => Publish::Create,
        }
    }

    /// Records what was sent for `key` (after the API server took it).
    pub fn sent(&mut self, key: u64, name: String, namespace: String, count: i32, now: Timestamp) {
        self.series.insert(
            key,
            Series {
                name,
                namespace,
                count,
                last: now,
            },
        );
    }

    /// Forgets a series whose Event is gone (a repeat refused with 404).
    pub fn forget(&mut self, key: u64) {
        self.series.remove(&key);
    }

    fn prune(&mut self, now: Timestamp) {
        let due = self
            .pruned
            .is_none_or(|at| now.duration_since(at).unsigned_abs() >= PRUNE_EVERY);
        if due {
            self.series.retain(|_, series| !ended(series.last, now));
            self.pruned = Some(now);
        }
    }

    /// How many series are counted.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// Whether no series is counted.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

/// The key of an occurrence (pure): the object (its kind, namespace, name and uid), the type, the
/// reason, the action and the note.
pub fn series_key(event: &Event, regarding: &ObjectReference) -> u64 {
    let mut hasher = DefaultHasher::new();
    (
        &regarding.api_version,
        &regarding.kind,
        &regarding.namespace,
        &regarding.name,
        &regarding.uid,
    )
        .hash(&mut hasher);
    matches!(event.type_, EventType::Warning).hash(&mut hasher);
    (&event.reason, &event.action, &event.note).hash(&mut hasher);
    hasher.finish()
}

/// The namespace an Event about `regarding` is written to: its own, `default` for a cluster-scoped
/// object (as kube's recorder does).
fn event_namespace(regarding: &ObjectReference) -> String {
    regarding
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned())
}

/// A new Event about `regarding` (pure), named after the object and the time as kube's recorder names
/// them.
pub fn new_event(
    event: &Event,
    regarding: &ObjectReference,
    controller: &str,
    instance: &str,
    now: Timestamp,
) -> K8sEvent {
    K8sEvent {
        action: Some(event.action.clone()),
        reason: Some(event.reason.clone()),
        note: event.note.clone(),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        related: event.secondary.clone(),
        reporting_controller: Some(controller.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        type_: Some(
            match event.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .to_owned(),
        ),
        metadata: ObjectMeta {
            namespace: Some(event_namespace(regarding)),
            name: Some(format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or(controller),
                now.as_nanosecond()
            )),
            ..ObjectMeta::default()
        },
        ..K8sEvent::default()
    }
}

/// Publishes Events for one reporting controller and instance (see the module docs).
pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    book: Mutex<SeriesBook>,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("controller", &self.controller)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl EventPublisher {
    /// A publisher reporting as `controller` (`instance`: this replica's identity).
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        EventPublisher {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
            book: Mutex::new(SeriesBook::default()),
        }
    }

    fn next(&self, key: u64, now: Timestamp) -> Publish {
        self.book
            .lock()
            .map_or(Publish::Create, |mut book| book.next(key, now))
    }

    fn record(&self, key: u64, name: String, namespace: String, count: i32, now: Timestamp) {
        if let Ok(mut book) = self.book.lock() {
            book.sent(key, name, namespace, count, now);
        }
    }

    /// Publishes `event` about `regarding`: a new Event, or the next occurrence of its series.
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let key = series_key(event, regarding);
        let now = Timestamp::now();
        if let Publish::Repeat {
            name,
            namespace,
            count,
        } = self.next(key, now)
        {
            let series = serde_json::json!({
                "series": EventSeries { count, last_observed_time: MicroTime(now) }
            });
            let events = Api::<K8sEvent>::namespaced(self.client.clone(), &namespace);
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                .await
            {
                Ok(_) => {
                    self.record(key, name, namespace, count, now);
                    return Ok(());
                }
                // The Event went (expired or deleted): a new one starts the series again.
                Err(kube::Error::Api(response)) if response.code == 404 => {
                    if let Ok(mut book) = self.book.lock() {
                        book.forget(key);
                    }
                }
                Err(error) => return Err(error),
            }
        }
        let created = new_event(event, regarding, &self.controller, &self.instance, now);
        let namespace = event_namespace(regarding);
        let name = created.metadata.name.clone().unwrap_or_default();
        Api::<K8sEvent>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &created)
            .await?;
        self.record(key, name, namespace, 1, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("walt.dev/v1alpha1".into()),
            kind: Some("Node".into()),
            namespace: Some("lab".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectReference::default()
        }
    }

    fn event(reason: &str, note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Probe".into(),
            secondary: None,
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("a time")
    }

    #[test]
    fn the_same_occurrence_repeated_is_a_series_and_another_note_a_new_event() {
        let node = reference("n1");
        let unreachable = series_key(&event("Unreachable", "no answer from 10.0.0.1"), &node);
        let mut book = SeriesBook::default();
        assert_eq!(book.next(unreachable, at(0)), Publish::Create);
        book.sent(unreachable, "n1.1".into(), "lab".into(), 1, at(0));
        assert_eq!(
            book.next(unreachable, at(60)),
            Publish::Repeat {
                name: "n1.1".into(),
                namespace: "lab".into(),
                count: 2
            }
        );
        // Another message (seen with kube's recorder: counted on the first Event, its note shown).
        let other = series_key(&event("Unreachable", "no answer from 10.0.0.2"), &node);
        assert_ne!(other, unreachable);
        assert_eq!(book.next(other, at(60)), Publish::Create);
        // Another object, another series.
        let elsewhere = series_key(&event("Unreachable", "no answer from 10.0.0.1"), &reference("n2"));
        assert_ne!(elsewhere, unreachable);
    }

    #[test]
    fn a_series_ends_after_its_ttl_and_ended_series_are_forgotten() {
        let key = series_key(&event("Rebooting", "rebooting to boot os2"), &reference("n1"));
        let mut book = SeriesBook::default();
        book.sent(key, "n1.1".into(), "lab".into(), 3, at(0));
        let after = i64::try_from(SERIES_TTL.as_secs()).expect("seconds");
        assert_eq!(book.next(key, at(after)), Publish::Create);
        assert!(book.is_empty(), "the ended series is forgotten: {book:?}");
    }

    #[test]
    fn pruning_runs_at_most_every_prune_period() {
        let mut book = SeriesBook::default();
        let first = series_key(&event("A", "a"), &reference("n1"));
        let second = series_key(&event("B", "b"), &reference("n1"));
        book.next(first, at(0));
        book.sent(first, "n1.1".into(), "lab".into(), 1, at(0));
        book.sent(second, "n1.2".into(), "lab".into(), 1, at(10));
        let ttl = i64::try_from(SERIES_TTL.as_secs()).expect("seconds");
        // Both ended, but the last prune was less than PRUNE_EVERY ago: nothing scanned yet…
        book.pruned = Some(at(ttl + 10));
        book.next(second, at(ttl + 20));
        assert_eq!(book.len(), 2);
        // …and once the period has passed, both go.
        book.next(second, at(ttl + 10 + 30));
        assert!(book.is_empty());
    }

    #[test]
    fn a_new_event_names_its_object_and_reporter() {
        let made = new_event(
            &event("Unreachable", "no answer"),
            &reference("n1"),
            "walt-operator",
            "replica-1",
            at(0),
        );
        assert_eq!(made.metadata.namespace.as_deref(), Some("lab"));
        assert!(
            made.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("n1."))
        );
        assert_eq!(made.type_.as_deref(), Some("Warning"));
        assert_eq!(made.reporting_instance.as_deref(), Some("replica-1"));
        assert_eq!(made.note.as_deref(), Some("no answer"));
        let mut cluster_scoped = reference("pc-01");
        cluster_scoped.namespace = None;
        let made = new_event(&event("Bound", "x"), &cluster_scoped, "walt-operator", "r", at(0));
        assert_eq!(made.metadata.namespace.as_deref(), Some("default"));
    }
}
