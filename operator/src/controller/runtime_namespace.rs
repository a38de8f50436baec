//! Runtime namespace reconcile (leader only): for each tenant's runtime namespace (`walt-run-<ns>`,
//! made by the ShellSession, ImageBuild and Node controllers through
//! [`crate::controller::shared::runtime::ensure_runtime_namespace`]):
//!
//! - the RoleBinding that lets the tenant's users attach to their sessions, kept equal to the
//!   subjects of the tenant namespace's RoleBindings to walt's tenant roles (woken by any RoleBinding
//!   change there);
//! - the end: once the tenant's namespace is gone (deleted, or being deleted), the runtime namespace is
//!   deleted too, with what the operator made there (woken by the tenant namespace's change);
//! - the sweep: pods, Services and claims whose ShellSession, ImageBuild or Node is gone are deleted (at start,
//!   every `--runtime-sweep-interval`); the pure decision is
//!   [`crate::controller::shared::runtime::orphans`].

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use walt_crds::runtime::TENANT_LABEL;
use walt_crds::{ImageBuild, Node, ShellSession};

use crate::controller::shared::context::{Context, MANAGED_BY, MANAGED_BY_LABEL};
use crate::controller::shared::error::{KubeResultExt, Result};
use crate::controller::shared::runtime::{
    Made, attach_binding, attach_subjects, delete, is_runtime_namespace_of, orphans,
};

/// Reconciles one runtime namespace.
pub async fn reconcile(namespace: Arc<Namespace>, context: Arc<Context>) -> Result<Action> {
    let Some(tenant) = namespace.labels().get(TENANT_LABEL).cloned() else {
        return Ok(Action::await_change());
    };
    if !is_runtime_namespace_of(&namespace, &tenant) || namespace.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let runtime = namespace.name_any();
    let tenant_namespace = Api::<Namespace>::all(context.client.clone())
        .get_opt(&tenant)
        .await
        .context(|| format!("reading the tenant namespace {tenant}"))?;
    if tenant_gone(tenant_namespace.as_ref()) {
        tracing::info!(namespace = %runtime, %tenant, "the tenant's namespace is gone: deleting its runtime namespace");
        Api::<Namespace>::all(context.client.clone())
            .delete(&runtime, &kube::api::DeleteParams::default())
            .await
            .map(|_| ())
            .or_else(|error| match error {
                kube::Error::Api(response) if response.code == 404 => Ok(()),
                other => Err(other),
            })
            .context(|| format!("deleting the runtime namespace {runtime} of the gone tenant {tenant}"))?;
        return Ok(Action::await_change());
    }
    sync_attach_binding(&context, &runtime, &tenant).await?;
    sweep(&context, &runtime, &tenant).await?;
    Ok(Action::requeue(context.config.args.runtime_sweep_interval))
}

/// Whether a tenant's namespace is gone (pure): not found, or being deleted.
fn tenant_gone(tenant: Option<&Namespace>) -> bool {
    tenant.is_none_or(|namespace| namespace.metadata.deletion_timestamp.is_some())
}

/// Applies the RoleBinding that lets the tenant's users attach to their sessions.
async fn sync_attach_binding(context: &Context, runtime: &str, tenant: &str) -> Result<()> {
    let bindings = Api::<RoleBinding>::namespaced(context.client.clone(), tenant)
        .list(&ListParams::default())
        .await
        .context(|| format!("listing the RoleBindings of {tenant}"))?;
    let subjects = attach_subjects(&bindings.items, tenant, &context.config.args.tenant_roles);
    let binding = attach_binding(
        runtime,
        tenant,
        &context.config.args.session_attach_role,
        subjects,
    );
    context
        .apply(
            &Api::<RoleBinding>::namespaced(context.client.clone(), runtime),
            &binding,
        )
        .await?;
    Ok(())
}

/// What the operator made in `runtime` of kind `K` (labelled as its).
async fn made_of<K>(context: &Context, runtime: &str, kind: &'static str) -> Result<Vec<Made>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let list = Api::<K>::namespaced(context.client.clone(), runtime)
        .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")))
        .await
        .context(|| format!("listing the {kind}s of {runtime}"))?;
    Ok(list
        .items
        .iter()
        .filter(|object| object.meta().deletion_timestamp.is_none())
        .map(|object| Made::of(kind, object.meta()))
        .collect())
}

/// Kind and uid of the tenant's objects of kind `K` (`kind`).
async fn uids_of<K>(context: &Context, tenant: &str, kind: &'static str) -> Result<Vec<(String, String)>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let list = Api::<K>::namespaced(context.client.clone(), tenant)
        .list_metadata(&ListParams::default())
        .await
        .context(|| format!("listing the {kind}s of {tenant}"))?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|object| object.metadata.uid)
        .map(|uid| (kind.to_owned(), uid))
        .collect())
}

/// Kind and uid of the tenant's ShellSessions, ImageBuilds and Nodes.
async fn live_owners(context: &Context, tenant: &str) -> Result<BTreeSet<(String, String)>> {
    let mut live = BTreeSet::new();
    live.extend(uids_of::<ShellSession>(context, tenant, "ShellSession").await?);
    live.extend(uids_of::<ImageBuild>(context, tenant, "ImageBuild").await?);
    live.extend(uids_of::<Node>(context, tenant, "Node").await?);
    Ok(live)
}

/// Deletes what no live ShellSession, ImageBuild or Node of the tenant owns. The objects are listed
/// before their owners: an owner exists before what is made for it, so nothing new is taken for an
/// orphan.
async fn sweep(context: &Context, runtime: &str, tenant: &str) -> Result<()> {
    let mut made = made_of::<Pod>(context, runtime, "Pod").await?;
    made.extend(made_of::<Service>(context, runtime, "Service").await?);
    made.extend(made_of::<PersistentVolumeClaim>(context, runtime, "PersistentVolumeClaim").await?);
    let live = live_owners(context, tenant).await?;
    for orphan in orphans(&made, tenant, &live) {
        tracing::info!(namespace = runtime, kind = orphan.kind, name = %orphan.name, owner = ?orphan.owner, "deleting what no live ShellSession, ImageBuild or Node owns");
        let deleted = match orphan.kind {
            "Pod" => delete::<Pod>(context, runtime, &orphan.name).await,
            "Service" => delete::<Service>(context, runtime, &orphan.name).await,
            _ => delete::<PersistentVolumeClaim>(context, runtime, &orphan.name).await,
        };
        deleted?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_is_gone_when_its_namespace_is_missing_or_being_deleted() {
        assert!(tenant_gone(None));
        let mut namespace = Namespace::default();
        assert!(!tenant_gone(Some(&namespace)));
        namespace.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(tenant_gone(Some(&namespace)));
    }
}
