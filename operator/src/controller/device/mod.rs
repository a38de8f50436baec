//! Device reconcile: the network-booted Device's SSH host key first ([`host_key::ensure`]: its
//! Secret made when missing, `status.hostKey` kept), then its binding. Binding: dereference (the Node `status.boundTo` names) → the pure [`decide::decide`]
//! (does the binding still hold?) → one status write clearing a stale binding, with an Event on the
//! Device. Binding is the Node controller's (it claims a lent, free device); releasing is this
//! one's, so a Device never keeps pointing at a Node that is gone or at a namespace it was taken
//! back from. Level-triggered: Node changes and deletions wake the Device they name, and every
//! Device is looked at when the operator starts, so a Node deleted while no operator ran is
//! released too (no finalizer on tenants' Nodes).

use std::sync::Arc;
use std::time::Duration;

use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{Device, Node};

pub mod decide;
pub mod host_key;
pub mod reasons;

use self::decide::{Release, Step, binding_in_scope, decide, kept_by_cache};
use crate::controller::shared::context::Context;
use crate::controller::shared::error::{Error, Result};

/// How often a Device whose binding holds is looked at again (Node events wake it sooner).
const RECHECK: Duration = Duration::from_mins(10);

/// Reconciles one Device. The Node its binding names is read from the watch cache
/// ([`crate::controller::shared::caches`]; a Node change reaches this reconcile on every Node write): a
/// binding the cached Node holds is kept without asking the API server; a release is decided only on
/// the API server's answer (a cache behind a new Node never releases its binding).
pub async fn reconcile(device: Arc<Device>, context: Arc<Context>) -> Result<Action> {
    let scope = context.config.args.watch_namespace.as_deref();
    // An operator watching one namespace keys only the devices lent there (the others are other
    // operators' to key, or the lab-wide one's).
    if scope.is_none_or(|scope| device.lent_to() == Some(scope)) {
        host_key::ensure(&context, &device).await?;
    }
    let Some(binding) = binding_in_scope(&device, scope) else {
        return Ok(Action::await_change());
    };
    if let Some(caches) = context.caches.get() {
        let cached = caches.node(&binding.namespace, &binding.node);
        if kept_by_cache(&device, cached.as_ref()) {
            return Ok(Action::requeue(RECHECK));
        }
    }
    let holder = Api::<Node>::namespaced(context.client.clone(), &binding.namespace)
        .get_opt(&binding.node)
        .await
        .map_err(|source| {
            Error::kube(
                format!(
                    "reading Node {}/{}, bound to the Device {}",
                    binding.namespace,
                    binding.node,
                    device.name_any()
                ),
                source,
            )
        })?;
    match decide(&device, holder.as_ref()) {
        Step::Keep => Ok(Action::requeue(RECHECK)),
        Step::Release(release) => release_binding(&context, &device, release).await,
    }
}

/// Clears a stale binding, written with the Device's resourceVersion (a Node that bound the device
/// meanwhile wins: the write conflicts and the Device is looked at again), then says so.
async fn release_binding(context: &Context, device: &Device, release: Release) -> Result<Action> {
    let name = device.name_any();
    let mut cleared = device.clone();
    cleared.status.get_or_insert_with(Default::default).bound_to = None;
    Api::<Device>::all(context.client.clone())
        .replace_status(&name, &PostParams::default(), &cleared)
        .await
        .map_err(|source| Error::kube(format!("releasing the Device {name}"), source))?;
    tracing::info!(device = %name, reason = release.reason, "{}", release.message);
    context
        .event(
            device,
            EventType::Normal,
            release.reason,
            "Release",
            release.message,
        )
        .await;
    Ok(Action::requeue(RECHECK))
}
