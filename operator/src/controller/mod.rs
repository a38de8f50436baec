//! The controllers (one module per kind): the only part of walt that knows
//! Kubernetes.
//!
//! Each controller reconciles as **dereference → validate → build → apply →
//! update status**: `build` functions are pure (no API calls) and unit-tested;
//! apply is server-side apply with the field manager [`context::FIELD_MANAGER`];
//! failures are retried with per-object backoff and counted in metrics by
//! [`error::Error::metric_label`]; an object that cannot even be decoded is
//! logged and skipped, it never stops a watch.
//!
//! Operations: [`config`] (flags/env and the Secrets they name), [`leader`]
//! (Lease-based election), [`http`] (`/metrics`, `/healthz`, `/readyz`),
//! [`metrics`].

pub mod cli;
pub mod config;
pub mod context;
pub mod error;
pub mod gateway;
pub mod http;
pub mod image;
pub mod image_reconcile;
pub mod leader;
pub mod lock;
pub mod lookup;
pub mod metrics;
pub mod node;
pub mod node_probe;
pub mod node_reconcile;
pub mod nodesave;
pub mod nodesave_reconcile;
pub mod shell;
pub mod shell_reconcile;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use walt_crds::{Image, Node, NodeSave, ShellSession};

use self::context::{Context, MANAGED_BY, MANAGED_BY_LABEL, key_of};
use self::error::{Error, Result};

/// Wraps a reconcile with metrics, structured logs (kind, namespace, name)
/// and per-object backoff.
async fn instrumented<K, F, Fut>(
    kind: &'static str,
    object: Arc<K>,
    context: Arc<Context>,
    reconcile: F,
) -> Result<Action>
where
    K: Resource<DynamicType = ()>,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action>>,
{
    let key = key_of(&*object);
    let span = tracing::info_span!("reconcile", kind, namespace = %object.namespace().unwrap_or_default(), name = %object.name_any());
    let _timer = context.metrics.reconcile_started(kind);
    let outcome = tracing::Instrument::instrument(reconcile(object, context.clone()), span.clone()).await;
    match &outcome {
        Ok(_) => context.succeeded(&key),
        Err(error) => {
            let _entered = span.enter();
            tracing::warn!(%error, "reconcile failed");
        }
    }
    outcome
}

/// The error policy shared by every controller: count, log, back off.
fn error_policy<K: Resource<DynamicType = ()>>(
    kind: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
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

/// Runs every controller until `shutdown` is cancelled, then lets running
/// reconciles finish.
pub async fn run_controllers(context: Arc<Context>, shutdown: CancellationToken) {
    let nodes = Controller::new(all::<Node>(&context), watcher::Config::default())
        .owns(all::<Pod>(&context), owned_objects());
    let node_store = nodes.store();
    let nodes = nodes
        // An Image moved: wake the Nodes that boot it (any namespace: the catalog is shared).
        .watches(
            all::<Image>(&context),
            watcher::Config::default(),
            move |image: Image| {
                let image_name = walt_crds::ImageName::from_object_name(&image.name_any()).ok();
                let namespace = image.namespace();
                node_store
                    .state()
                    .into_iter()
                    .filter(move |node| {
                        let boots = node
                            .spec
                            .image
                            .as_deref()
                            .and_then(|name| walt_crds::ImageName::parse(name).ok());
                        boots.is_some()
                            && boots == image_name
                            && (node.namespace() == namespace || namespace.is_some())
                    })
                    .map(|node| ObjectRef::from_obj(&*node))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |node, context| instrumented("Node", node, context, node_reconcile::reconcile),
            error_policy::<Node>("Node"),
            context.clone(),
        );
    let images = Controller::new(all::<Image>(&context), watcher::Config::default())
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |image, context| instrumented("Image", image, context, image_reconcile::reconcile),
            error_policy::<Image>("Image"),
            context.clone(),
        );
    let saves = Controller::new(all::<NodeSave>(&context), watcher::Config::default())
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |save, context| instrumented("NodeSave", save, context, nodesave_reconcile::reconcile),
            error_policy::<NodeSave>("NodeSave"),
            context.clone(),
        );
    let shells = Controller::new(all::<ShellSession>(&context), watcher::Config::default())
        .owns(all::<Pod>(&context), owned_objects())
        .with_config(controller_config(&context))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |session, context| instrumented("ShellSession", session, context, shell_reconcile::reconcile),
            error_policy::<ShellSession>("ShellSession"),
            context.clone(),
        );
    futures::join!(
        drain("Node", nodes),
        drain("Image", images),
        drain("NodeSave", saves),
        drain("ShellSession", shells)
    );
}
