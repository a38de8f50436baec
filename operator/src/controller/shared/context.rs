//! What every reconcile shares: the client, the configuration, metrics,
//! the event recorder, per-object retry backoff, and the apply helpers
//! (server-side apply with the operator's own field manager).

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{Error, Result};
use crate::controller::config::Config;
use crate::controller::metrics::Metrics;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "walt-operator";
/// Label put on every object the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "walt-operator";

/// Shared state of all controllers.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Resolved configuration.
    pub config: Arc<Config>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Node saves running in this process (bounded by `--max-concurrent-saves`).
    pub saves: super::save_tasks::SaveTasks,
    /// The one lab registry client (connection pool, TLS roots and tokens
    /// shared by every reconcile), made on first use.
    pub lab_registry: std::sync::OnceLock<crate::oci::RegistryClient>,
    /// Image-shell mode per manifest digest (a digest's layers never change, and many Images share
    /// one digest: their layers are read once).
    pub shell_modes: Mutex<HashMap<String, walt_crds::ImageShellMode>>,
    /// What each layer says about the image-shell helpers, by layer digest (images of one base
    /// read it once).
    pub shell_helper_layers: crate::oci::ShellHelperLayers,
    /// The API server's clock, which session lifetimes follow ([`super::clock`]).
    pub clock: Arc<super::clock::ApiClock>,
    /// The controllers' watch caches, once they run (until then, and in a context without
    /// controllers, reads go to the API server).
    pub caches: std::sync::OnceLock<super::caches::Caches>,
    recorder: super::events::EventPublisher,
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// When a reconcile whose decision was stale ([`Error::Stale`]) runs again, unless the watch brings the
/// object's new state sooner.
const STALE_RETRY: Duration = Duration::from_secs(1);

/// Retry delay after `failures` consecutive failures: 5 s doubling to 5 min
/// (permanent errors start at 1 min, since only the user can fix them).
pub fn backoff(failures: u32, permanent: bool) -> Duration {
    let base: u64 = if permanent { 60 } else { 5 };
    let exponent = failures.saturating_sub(1).min(10);
    Duration::from_secs((base << exponent).min(300))
}

impl Context {
    /// A context for `client` and `config`.
    pub fn new(
        client: Client,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        clock: Arc<super::clock::ApiClock>,
    ) -> Self {
        let recorder = super::events::EventPublisher::new(client.clone(), MANAGED_BY, &config.identity);
        Self {
            saves: super::save_tasks::SaveTasks::new(config.args.max_concurrent_saves),
            lab_registry: std::sync::OnceLock::new(),
            shell_modes: Mutex::new(HashMap::new()),
            shell_helper_layers: crate::oci::ShellHelperLayers::default(),
            caches: std::sync::OnceLock::new(),
            clock,
            client,
            config,
            metrics,
            recorder,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an Event about `object` (shown by `kubectl describe`).
    /// Failing to publish is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, reason, "could not publish an Event");
        }
    }

    /// Records a successful reconcile of `key` (resets its backoff).
    pub fn succeeded(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }

    /// Records a failed reconcile of `key` and returns when to retry.
    pub fn failed(&self, kind: &'static str, key: &str, error: &Error) -> Action {
        self.metrics.reconcile_failed(kind, error);
        if matches!(error, Error::Stale(_)) {
            // Not a failure of the object: its newer state is already on its way (the watch).
            return Action::requeue(STALE_RETRY);
        }
        let count = self.failures.lock().map_or(1, |mut failures| {
            let count = failures.entry(key.to_owned()).or_insert(0);
            *count += 1;
            *count
        });
        Action::requeue(backoff(count, error.is_permanent()))
    }

    /// Server-side applies `object` (our field manager, forced: the operator
    /// owns what it builds).
    pub async fn apply<K>(&self, api: &Api<K>, object: &K) -> Result<K>
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
    {
        let name = object.name_any();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|source| Error::kube(format!("applying {} {name}", K::kind(&())), source))
    }

    /// Server-side applies a status decided on `object`, only if `object` is still the current version
    /// (its resourceVersion is the apply's precondition): a decision made on a copy that another write
    /// has overtaken (a watch lagging behind, after an API server restart, or a second replica taking
    /// over) never overwrites the newer state; [`Error::Stale`] instead, and the reconcile runs again on
    /// the new state. Returns the object as written: a chain of the operator's own writes goes on from
    /// its resourceVersion ([`follow_own_write`]), so it does not conflict with itself.
    pub async fn apply_status_of<K>(&self, api: &Api<K>, object: &K, status: &impl Serialize) -> Result<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
    {
        let name = object.name_any();
        let body = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "metadata": {"resourceVersion": object.resource_version()},
            "status": status,
        });
        match api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(written) => Ok(written),
            Err(kube::Error::Api(response)) if response.code == 409 => {
                Err(Error::Stale(format!("{} {name}", K::kind(&()))))
            }
            Err(source) => Err(Error::kube(
                format!("updating the status of {} {name}", K::kind(&())),
                source,
            )),
        }
    }
}

/// Moves `object`'s resourceVersion to that of `written`, the operator's own write of it: the next
/// [`Context::apply_status_of`] is conditional on that version, while `object` keeps the state its
/// decision was made on (an own write is no news that calls for deciding again; any other write in
/// between still makes the next write [`Error::Stale`]).
pub fn follow_own_write<K: Resource>(object: &mut K, written: &K) {
    object
        .meta_mut()
        .resource_version
        .clone_from(&written.meta().resource_version);
}

/// The `namespace/name` key of an object (for logs and backoff).
pub fn key_of<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

impl Context {
    /// Records that `request`'s value `value` was handled on `object` (a merge patch of one
    /// annotation: the user's own request annotation is left as it is). Returns the object as written
    /// (a status write after it goes on from its version: [`follow_own_write`]).
    pub async fn mark_handled<K>(
        &self,
        object: &K,
        request: walt_crds::RequestAnnotation,
        value: &str,
    ) -> Result<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let namespace = object.namespace().unwrap_or_default();
        let name = object.name_any();
        Api::<K>::namespaced(self.client.clone(), &namespace)
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&request.handled_patch(value)),
            )
            .await
            .map_err(|source| {
                Error::kube(
                    format!(
                        "recording {} as handled on {} {namespace}/{name}",
                        request.requested,
                        K::kind(&())
                    ),
                    source,
                )
            })
    }
}

/// Shared handle to the context.
pub type Ctx = Arc<Context>;

/// Sets one condition in `conditions`, stamped with `object`'s generation and now (the shared body of
/// each controller's condition setter).
pub fn set_condition_now<K: kube::Resource>(
    conditions: &mut Vec<walt_crds::Condition>,
    object: &K,
    type_: &str,
    state: walt_crds::ConditionStatus,
    reason: &str,
    message: impl Into<String>,
) {
    let now = k8s_openapi::jiff::Timestamp::now();
    set_condition_at(conditions, object, type_, state, reason, message, now);
}

/// Sets one condition in `conditions`, stamped with `object`'s generation and `now` (pure: what the
/// `decide` functions use, so their tests choose the time).
pub fn set_condition_at<K: kube::Resource>(
    conditions: &mut Vec<walt_crds::Condition>,
    object: &K,
    type_: &str,
    state: walt_crds::ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    now: k8s_openapi::jiff::Timestamp,
) {
    walt_crds::set_condition(
        conditions,
        walt_crds::new_condition(
            type_,
            state,
            reason,
            message,
            object.meta().generation,
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1, false), Duration::from_secs(5));
        assert_eq!(backoff(2, false), Duration::from_secs(10));
        assert_eq!(backoff(4, false), Duration::from_secs(40));
        assert_eq!(backoff(30, false), Duration::from_mins(5));
        assert_eq!(backoff(1, true), Duration::from_mins(1));
        assert_eq!(backoff(9, true), Duration::from_mins(5));
    }
}
