//! The controllers (one module per kind): the only part of walt that knows
//! Kubernetes.
//!
//! Each controller reconciles as **dereference → validate → build → apply →
//! update status**: `build` functions are pure (no API calls) and unit-tested;
//! apply is server-side apply with the field manager [`context::FIELD_MANAGER`];
//! failures are retried with per-object backoff and counted in metrics by
//! [`shared::error::Error::metric_label`]; an object that cannot even be decoded
//! is watched through [`Cached`] (which also drops its `managedFields`), gets a Warning Event saying why and
//! is skipped: it never stops the watch of the others.
//!
//! Layout: one folder per kind ([`node`], [`image`], [`node_save`],
//! [`shell_session`], [`device`], [`image_build`]), each with the same shape: `mod.rs` holds the thin
//! `reconcile` (dereference → decide → apply → one status write), a pure
//! `decide` (or `build`'s pure status/object builders) with unit tests, and
//! the I/O helpers beside it. What kinds share lives in [`shared`]; kind
//! folders import `shared`, never each other.
//!
//! Operations: [`config`] (flags/env and the Secrets they name), [`bootstrap`] (the Secrets it
//! creates when missing), [`leader`]
//! (Lease-based election), [`http`] (`/metrics`, `/healthz`, `/readyz`),
//! [`metrics`].

pub mod boot_claims;
pub mod boot_defaults;
pub mod boot_source;
pub mod bootstrap;
pub mod census;
pub mod cli;
pub mod config;
pub mod device;
pub mod gateway;
pub mod http;
pub mod image;
pub mod image_build;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod node_save;
pub mod runtime_namespace;
pub mod shared;
pub mod shell_session;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use walt_crds::{Device, Image, ImageBuild, Node, NodeSave, ShellSession};

use self::shared::cached::Cached;
use self::shared::context::{Context, MANAGED_BY, MANAGED_BY_LABEL, key_of};
use self::shared::error::{Error, Result};

/// A reconcile this long is logged (with its object) as slow.
const SLOW_RECONCILE: std::time::Duration = std::time::Duration::from_secs(10);

/// Wraps a reconcile with metrics, structured logs (kind, namespace, name),
/// a time bound (`--reconcile-timeout`: one stuck reconcile never holds a
/// worker for ever) and per-object backoff.
async fn instrumented<K, F, Fut>(
    kind: &'static str,
    guarded: Arc<Cached<K>>,
    context: Arc<Context>,
    reconcile: F,
) -> Result<Action>
where
    K: Resource<DynamicType = ()> + Clone,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action>>,
{
    let object = match &guarded.0 {
        Ok(object) => Arc::new(object.clone()),
        Err(invalid) => {
            skip_invalid(kind, &*guarded, &invalid.error, &context).await;
            return Ok(Action::await_change());
        }
    };
    let key = key_of(&*object);
    let span = tracing::info_span!("reconcile", kind, namespace = %object.namespace().unwrap_or_default(), name = %object.name_any());
    let _timer = context.metrics.reconcile_started(kind);
    let limit = context.config.args.reconcile_timeout;
    let started = std::time::Instant::now();
    let bounded = tokio::time::timeout(limit, reconcile(object, context.clone()));
    let outcome = tracing::Instrument::instrument(bounded, span.clone())
        .await
        .unwrap_or_else(|_| {
            Err(Error::TimedOut {
                kind,
                seconds: limit.as_secs(),
            })
        });
    let took = started.elapsed();
    if took >= SLOW_RECONCILE {
        // The histogram says that some reconciles are slow; this line says which object's, and
        // the step it logged before (at debug) says what it was doing.
        let _entered = span.enter();
        tracing::info!(seconds = took.as_secs_f64(), "slow reconcile");
    }
    match &outcome {
        Ok(_) => context.succeeded(&key),
        Err(error) => {
            let _entered = span.enter();
            tracing::warn!(%error, "reconcile failed");
        }
    }
    outcome
}

/// An object that does not decode (written before a CRD change, or by hand past the schema): said
/// once in a Warning Event on it and in the log, then left alone until it changes.
async fn skip_invalid<K: Resource<DynamicType = ()>>(
    kind: &'static str,
    object: &Cached<K>,
    error: &str,
    context: &Context,
) {
    let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
    tracing::warn!(kind, %namespace, %name, %error, "skipping an object that cannot be decoded");
    context
        .event(
            object,
            kube::runtime::events::EventType::Warning,
            "InvalidObject",
            "Decode",
            format!("the operator cannot read this {kind}: {error}; fix or recreate it"),
        )
        .await;
}

/// The error policy shared by every controller: count, log, back off.
fn error_policy<K: Resource<DynamicType = ()>>(
    kind: &'static str,
) -> impl Fn(Arc<Cached<K>>, &Error, Arc<Context>) -> Action {
    move |object, error, context| context.failed(kind, &key_of(&*object), error)
}

/// Watch configuration of objects the operator owns (only those it labelled,
/// so the operator's memory does not grow with unrelated pods).
fn owned_objects() -> watcher::Config {
    watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
}

/// Drains a controller's output: logs what failed to even start a reconcile
/// (an object that cannot be decoded is skipped, never fatal to the watch).
async fn drain<K, S>(kind: &'static str, stream: S)
where
    K: Resource + Debug,
    S: futures::Stream<
            Item = std::result::Result<
                (ObjectRef<K>, Action),
                kube::runtime::controller::Error<Error, watcher::Error>,
            >,
        >,
{
    stream
        .for_each(|outcome| async move {
            if let Err(error) = outcome {
                tracing::debug!(kind, %error, "controller event");
            }
        })
        .await;
}

/// Pods of the tenants' runtime namespaces (all of them, or the watched namespace's).
fn runtime_pods(context: &Context) -> Api<Pod> {
    match &context.config.args.watch_namespace {
        Some(namespace) => Api::namespaced(context.client.clone(), &walt_crds::runtime_namespace(namespace)),
        None => Api::all(context.client.clone()),
    }
}

/// The object of kind `kind` an object in a runtime namespace belongs to, from its owner labels
/// (pure; whether it really is that object's, by uid, each controller checks).
fn owner_of<K: Resource<DynamicType = ()>>(object: &impl Resource, kind: &str) -> Option<ObjectRef<K>> {
    use walt_crds::runtime::{OWNER_KIND_LABEL, OWNER_NAME_LABEL, OWNER_NAMESPACE_LABEL};
    let labels = object.meta().labels.as_ref()?;
    if labels.get(OWNER_KIND_LABEL).map(String::as_str) != Some(kind) {
        return None;
    }
    let namespace = labels.get(OWNER_NAMESPACE_LABEL)?;
    let name = labels.get(OWNER_NAME_LABEL)?;
    Some(ObjectRef::new(name).within(namespace))
}

/// Watch configuration of the runtime namespaces (the operator's, for every tenant or the watched one).
fn runtime_namespaces(context: &Context) -> watcher::Config {
    let tenant = walt_crds::runtime::TENANT_LABEL;
    let selector = match &context.config.args.watch_namespace {
        Some(namespace) => format!("{MANAGED_BY_LABEL}={MANAGED_BY},{tenant}={namespace}"),
        None => format!("{MANAGED_BY_LABEL}={MANAGED_BY},{tenant}"),
    };
    watcher::Config::default().labels(&selector)
}

fn all<K>(context: &Context) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    match &context.config.args.watch_namespace {
        Some(namespace) => Api::namespaced(context.client.clone(), namespace),
        None => Api::all(context.client.clone()),
    }
}

/// Controller settings: at most `--max-concurrent-reconciles` reconciles of
/// one kind at once.
fn controller_config(context: &Context) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default()
        .concurrency(context.config.args.max_concurrent_reconciles.max(1))
}

// Long by design: the wiring of the five controllers side by side (what each watches), so one
// screen shows every watch the operator opens.
/// Runs every controller until `shutdown` is cancelled, then lets running
/// reconciles finish.
pub async fn run_controllers(context: Arc<Context>, shutdown: CancellationToken) {
    // The Image and Device controllers' stores are the caches Node reconciles read; the watches that wake
    // those reconciles note what they saw ahead of them (`shared::caches`).
    let ahead = Arc::new(shared::caches::Ahead::default());
    let images = Controller::new(all::<Cached<Image>>(&context), watcher::Config::default());
    let image_store = images.store();
    let image_cache = image_store.clone();
    let devices = Controller::new(
        Api::<Cached<Device>>::all(context.client.clone()),
        watcher::Config::default(),
    );
    let device_cache = devices.store();
    // The Node controller's watch, through a reflector of ours: its events also keep the index the
    // Device and Image mappers read (`shared::node_index`).
    let (node_reader, node_writer) = reflector::store();
    let node_index = Arc::new(shared::node_index::NodeIndex::default());
    let indexing = node_index.clone();
    let node_events = reflector::reflector(
        node_writer,
        watcher::watcher(all::<Cached<Node>>(&context), watcher::Config::default()),
    )
    .inspect_ok(move |event| indexing.apply(event))
    .applied_objects();
    let nodes = Controller::for_stream(node_events, node_reader)
        // Its pod changed (in the tenant's runtime namespace: owner labels, not owner references).
        .watches(runtime_pods(&context), owned_objects(), |pod: Pod| {
            owner_of::<Cached<Node>>(&pod, "Node")
        });
    let node_store = nodes.store();
    let census_nodes = node_store.clone();
    let node_cache = node_store.clone();
    let (device_index, image_index) = (node_index.clone(), node_index);
    let (device_ahead, image_ahead, node_ahead) = (ahead.clone(), ahead.clone(), ahead.clone());
    let devices_seen = device_cache.clone();
    let nodes = nodes
        // A Device changed (lent, taken back, bound, unbound): wake the Nodes that name it.
        .watches(
            Api::<Cached<Device>>::all(context.client.clone()),
            watcher::Config::default(),
            move |device: Cached<Device>| {
                shared::caches::note_seen(&device_ahead, &devices_seen, &device);
                device_index.naming_device(&device.name_any())
            },
        )
        // An Image moved: wake the Nodes that boot it (any namespace: the catalog is shared).
        .watches(
            all::<Cached<Image>>(&context),
            watcher::Config::default(),
            move |image: Cached<Image>| {
                shared::caches::note_seen(&image_ahead, &image_cache, &image);
                walt_crds::ImageName::from_object_name(&image.name_any())
                    .map(|image_name| image_index.booting(&image_name))
                    .unwrap_or_default()
            },
        )
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |node, context| instrumented("Node", node, context, node::reconcile),
            error_policy::<Node>("Node"),
            context.clone(),
        );
    let images = images
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |image, context| instrumented("Image", image, context, image::reconcile),
            error_policy::<Image>("Image"),
            context.clone(),
        );
    let saves = Controller::new(all::<Cached<NodeSave>>(&context), watcher::Config::default());
    let census_saves = saves.store();
    let saves = saves
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |save, context| instrumented("NodeSave", save, context, node_save::reconcile),
            error_policy::<NodeSave>("NodeSave"),
            context.clone(),
        );
    let shells = Controller::new(all::<Cached<ShellSession>>(&context), watcher::Config::default());
    let census_sessions = shells.store();
    let shells = shells
        .watches(runtime_pods(&context), owned_objects(), |pod: Pod| {
            owner_of::<Cached<ShellSession>>(&pod, "ShellSession")
        })
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |session, context| instrumented("ShellSession", session, context, shell_session::reconcile),
            error_policy::<ShellSession>("ShellSession"),
            context.clone(),
        );
    // The reconciles read these three kinds from the stores the controllers keep anyway, once each has
    // its first full list (until then from the API server). One Context per run of the controllers
    // (`cli.rs` makes a new one each time).
    let caches = shared::caches::Caches {
        nodes: census_nodes.clone(),
        images: image_store,
        devices: device_cache,
        scope: context.config.args.watch_namespace.clone(),
        ahead,
    };
    let share_caches = async {
        if caches.ready().await && context.caches.set(caches).is_err() {
            tracing::warn!("controllers started twice on one context: reads go on from the first caches");
        }
    };
    let devices = devices
        // A Node changed or went away: wake the Device it names (its binding may be stale now).
        .watches(
            all::<Cached<Node>>(&context),
            watcher::Config::default(),
            move |node: Cached<Node>| {
                shared::caches::note_seen(&node_ahead, &node_cache, &node);
                node.0
                    .ok()
                    .and_then(|node| node.spec.device)
                    .map(|device| ObjectRef::<Cached<Device>>::new(&device))
            },
        )
        // A Device's host key Secret changed or went away (deleted: a new key is made).
        .watches(
            Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
                context.client.clone(),
                &context.config.args.namespace,
            ),
            watcher::Config::default().labels(&format!("{}=true", walt_crds::HOST_KEY_LABEL)),
            |secret| {
                secret
                    .metadata
                    .owner_references
                    .unwrap_or_default()
                    .into_iter()
                    .find(|owner| owner.kind == "Device")
                    .map(|owner| ObjectRef::<Cached<Device>>::new(&owner.name))
            },
        )
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |device, context| instrumented("Device", device, context, device::reconcile),
            error_policy::<Device>("Device"),
            context.clone(),
        );
    let builds = Controller::new(all::<Cached<ImageBuild>>(&context), watcher::Config::default());
    let census_builds = builds.store();
    let builds = builds
        // Its pod changed (in the tenant's runtime namespace: owner labels, not owner references).
        .watches(runtime_pods(&context), owned_objects(), |pod: Pod| {
            owner_of::<Cached<ImageBuild>>(&pod, "ImageBuild")
        })
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |build, context| instrumented("ImageBuild", build, context, image_build::reconcile),
            error_policy::<ImageBuild>("ImageBuild"),
            context.clone(),
        );
    let runtimes = Controller::new(
        Api::<Cached<Namespace>>::all(context.client.clone()),
        runtime_namespaces(&context),
    )
    // A tenant's namespace changed (its deletion began, it went): its runtime namespace follows.
    .watches(
        Api::<Namespace>::all(context.client.clone()),
        watcher::Config::default(),
        |namespace: Namespace| {
            let name = namespace.name_any();
            (!walt_crds::is_runtime_namespace_name(&name))
                .then(|| ObjectRef::<Cached<Namespace>>::new(&walt_crds::runtime_namespace(&name)))
        },
    )
    // A RoleBinding of a tenant changed: its runtime namespace's attach binding follows.
    .watches(
        all::<RoleBinding>(&context),
        watcher::Config::default(),
        |binding: RoleBinding| {
            binding
                .namespace()
                .filter(|namespace| !walt_crds::is_runtime_namespace_name(namespace))
                .map(|namespace| {
                    ObjectRef::<Cached<Namespace>>::new(&walt_crds::runtime_namespace(&namespace))
                })
        },
    )
    .with_config(controller_config(&context))
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(
        |namespace, context| {
            instrumented(
                "RuntimeNamespace",
                namespace,
                context,
                runtime_namespace::reconcile,
            )
        },
        error_policy::<Namespace>("RuntimeNamespace"),
        context.clone(),
    );
    let census = census::run(
        census::Caches {
            nodes: census_nodes,
            sessions: census_sessions,
            saves: census_saves,
            builds: census_builds,
        },
        context.metrics.clone(),
        shutdown,
    );
    futures::join!(
        share_caches,
        census,
        drain("Node", nodes),
        drain("Image", images),
        drain("NodeSave", saves),
        drain("ShellSession", shells),
        drain("Device", devices),
        drain("ImageBuild", builds),
        drain("RuntimeNamespace", runtimes)
    );
}
