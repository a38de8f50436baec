//! The tenant's **runtime namespace** (`walt-run-<tenant>`, [`walt_crds::runtime_namespace`]): where
//! the operator runs the pods that need mount rights (image shells, image builds, virtual nodes), their Services,
//! claims and the Secrets they mount, so the tenant's own namespace can stay at Pod Security
//! `baseline`. The operator creates it (labelled Pod Security `privileged`), owns everything in it,
//! and keeps one RoleBinding there that lets the tenant's users attach to their sessions and create
//! nothing.
//!
//! Owner references cannot cross namespaces: what the operator makes there carries owner labels
//! ([`owner_labels`]): kind, namespace, name and uid of the ShellSession, ImageBuild or Node it belongs to. Every
//! check that an object is someone's ([`owned_by`]) reads the uid label, and the runtime namespace
//! controller removes what no live owner has.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Resource, ResourceExt};
use walt_crds::runtime::{
    OWNER_KIND_LABEL, OWNER_NAME_LABEL, OWNER_NAMESPACE_LABEL, OWNER_UID_LABEL, TENANT_LABEL,
};
use walt_crds::{is_runtime_namespace_name, runtime_namespace};

use super::context::{Context, MANAGED_BY, MANAGED_BY_LABEL};
use super::error::{Error, Result};

/// The Pod Security label the runtime namespace gets (its pods mount and make namespaces).
pub const POD_SECURITY_ENFORCE: &str = "pod-security.kubernetes.io/enforce";
/// Name of the RoleBinding in a runtime namespace that lets the tenant's users attach.
pub const ATTACH_BINDING: &str = "walt-session-attach";

/// The labels of an object the operator makes in a runtime namespace for `owner` of kind `kind`
/// (pure): managed by the operator, the tenant, and the owner's kind, namespace, name and uid.
pub fn owner_labels<K: Resource>(kind: &str, owner: &K) -> BTreeMap<String, String> {
    let namespace = owner.meta().namespace.clone().unwrap_or_default();
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (TENANT_LABEL.to_owned(), namespace.clone()),
        (OWNER_KIND_LABEL.to_owned(), kind.to_owned()),
        (OWNER_NAMESPACE_LABEL.to_owned(), namespace),
        (
            OWNER_NAME_LABEL.to_owned(),
            label_value(owner.meta().name.as_deref().unwrap_or_default()),
        ),
        (
            OWNER_UID_LABEL.to_owned(),
            owner.meta().uid.clone().unwrap_or_default(),
        ),
    ])
}

/// A name as a label value (at most 63 characters; object names of 64–253 characters are cut: the
/// uid label is what identifies the owner, the name is for people).
fn label_value(name: &str) -> String {
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches(['-', '.', '_'])
        .to_owned()
}

/// Whether an object in a runtime namespace belongs to `owner` of kind `kind` (pure): its owner
/// labels name that kind, the owner's namespace and its uid. Anything else (made by someone else,
/// left by a former object of the same name) is never used, reached nor replaced.
pub fn owned_by<K: Resource>(meta: &ObjectMeta, kind: &str, owner: &K) -> bool {
    let Some(uid) = owner.meta().uid.as_deref().filter(|uid| !uid.is_empty()) else {
        return false;
    };
    let labels = meta.labels.clone().unwrap_or_default();
    let label = |key: &str| labels.get(key).map(String::as_str);
    label(OWNER_KIND_LABEL) == Some(kind)
        && label(OWNER_NAMESPACE_LABEL) == owner.meta().namespace.as_deref()
        && label(OWNER_UID_LABEL) == Some(uid)
        && meta.namespace.as_deref().is_none_or(|namespace| {
            Some(namespace)
                == owner
                    .meta()
                    .namespace
                    .as_deref()
                    .map(runtime_namespace)
                    .as_deref()
        })
}

/// The runtime namespace of `tenant` as the operator creates it (pure).
pub fn runtime_namespace_object(tenant: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(runtime_namespace(tenant)),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                (TENANT_LABEL.to_owned(), tenant.to_owned()),
                (POD_SECURITY_ENFORCE.to_owned(), "privileged".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// Whether an existing namespace is the operator's runtime namespace of `tenant` (pure): labelled as
/// [`runtime_namespace_object`] labels it. A namespace of that name made by anyone else (a tenant's
/// own, say) is never used: the operator would otherwise run privileged pods in it.
pub fn is_runtime_namespace_of(namespace: &Namespace, tenant: &str) -> bool {
    let labels = namespace.labels();
    labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
        && labels.get(TENANT_LABEL).map(String::as_str) == Some(tenant)
}

/// Why the operator runs nothing for `tenant` (pure), if it does not: a namespace named like a
/// runtime namespace is never a tenant's.
pub fn refuse_tenant(tenant: &str) -> Option<String> {
    is_runtime_namespace_name(tenant).then(|| {
        format!(
            "the namespace {tenant} is named like a walt runtime namespace (walt-run-…): walt runs no shell, \
             build or virtual node for objects there; use a namespace whose name does not start with walt-run-"
        )
    })
}

/// The runtime namespace of `tenant`, created when missing; its name. Fails (the user's object says
/// why) when `tenant` is itself named like a runtime namespace, or when a namespace of that name
/// exists that the operator did not make for this tenant.
pub async fn ensure_runtime_namespace(context: &Context, tenant: &str) -> Result<String> {
    if let Some(refusal) = refuse_tenant(tenant) {
        return Err(Error::Invalid(refusal));
    }
    let name = runtime_namespace(tenant);
    let api: Api<Namespace> = Api::all(context.client.clone());
    let existing = match api.get_opt(&name).await {
        Ok(Some(existing)) => existing,
        Ok(None) => match api
            .create(&PostParams::default(), &runtime_namespace_object(tenant))
            .await
        {
            Ok(created) => created,
            Err(kube::Error::Api(status)) if status.code == 409 => api
                .get(&name)
                .await
                .map_err(|source| Error::kube(format!("reading the namespace {name}"), source))?,
            Err(source) => {
                return Err(Error::kube(
                    format!("creating the runtime namespace {name}"),
                    source,
                ));
            }
        },
        Err(source) => return Err(Error::kube(format!("reading the namespace {name}"), source)),
    };
    if !is_runtime_namespace_of(&existing, tenant) {
        return Err(Error::Invalid(format!(
            "the namespace {name} exists but is not walt's runtime namespace of {tenant} (labels \
             {MANAGED_BY_LABEL}={MANAGED_BY}, {TENANT_LABEL}={tenant}): walt runs no pod there; a cluster \
             admin deletes or renames it, then walt creates its own"
        )));
    }
    if existing.metadata.deletion_timestamp.is_some() {
        return Err(Error::Missing {
            kind: "Namespace",
            namespace: String::new(),
            name,
            hint: " (it is being deleted: walt makes it again once it is gone)".into(),
        });
    }
    Ok(name)
}

/// The subjects of the tenant's RoleBindings that grant one of walt's tenant roles (`tenant_roles`,
/// ClusterRoles), as subjects of a RoleBinding in another namespace (pure): a ServiceAccount named
/// without a namespace is the tenant's. Sorted, without duplicates.
pub fn attach_subjects(bindings: &[RoleBinding], tenant: &str, tenant_roles: &[String]) -> Vec<Subject> {
    bindings
        .iter()
        .filter(|binding| {
            binding.role_ref.kind == "ClusterRole" && tenant_roles.contains(&binding.role_ref.name)
        })
        .flat_map(|binding| binding.subjects.clone().unwrap_or_default())
        .map(|mut subject| {
            if subject.kind == "ServiceAccount" && subject.namespace.as_deref().is_none_or(str::is_empty) {
                subject.namespace = Some(tenant.to_owned());
            }
            let key = (
                subject.kind.clone(),
                subject.name.clone(),
                subject.namespace.clone().unwrap_or_default(),
            );
            (key, subject)
        })
        .collect::<BTreeMap<_, _>>()
        .into_values()
        .collect()
}

/// The RoleBinding of a runtime namespace (pure): `attach_role` (a ClusterRole: read pods, attach,
/// read logs; never exec nor create) to `subjects`.
pub fn attach_binding(runtime: &str, tenant: &str, attach_role: &str, subjects: Vec<Subject>) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(ATTACH_BINDING.to_owned()),
            namespace: Some(runtime.to_owned()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                (TENANT_LABEL.to_owned(), tenant.to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: attach_role.to_owned(),
        },
        subjects: Some(subjects),
    }
}

/// One object the operator made in a runtime namespace, as the sweep sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Made {
    /// Its kind (`Pod`, `Service`, `PersistentVolumeClaim`).
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// Its owner labels: kind, namespace, uid (none when it has no owner uid label).
    pub owner: Option<(String, String, String)>,
}

impl Made {
    /// What the sweep needs of an object's metadata (pure).
    pub fn of(kind: &'static str, meta: &ObjectMeta) -> Made {
        let labels = meta.labels.clone().unwrap_or_default();
        let owner = labels.get(OWNER_UID_LABEL).map(|uid| {
            (
                labels.get(OWNER_KIND_LABEL).cloned().unwrap_or_default(),
                labels.get(OWNER_NAMESPACE_LABEL).cloned().unwrap_or_default(),
                uid.clone(),
            )
        });
        Made {
            kind,
            name: meta.name.clone().unwrap_or_default(),
            owner,
        }
    }
}

/// What the sweep removes from the runtime namespace of `tenant` (pure): every object with owner
/// labels whose owner is not among `live` (kind and uid of the tenant's ShellSessions, ImageBuilds and Nodes,
/// listed **after** the objects: an object's owner exists before it, so a fresh object is never
/// taken for an orphan), or whose owner is not the tenant's. Objects without owner labels are left.
pub fn orphans<'a>(made: &'a [Made], tenant: &str, live: &BTreeSet<(String, String)>) -> Vec<&'a Made> {
    made.iter()
        .filter(|object| {
            object.owner.as_ref().is_some_and(|(kind, namespace, uid)| {
                namespace != tenant || !live.contains(&(kind.clone(), uid.clone()))
            })
        })
        .collect()
}

/// Deletes one object (already gone is fine).
pub async fn delete<K>(context: &Context, namespace: &str, name: &str) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    delete_within::<K>(context, namespace, name, None).await
}

/// Deletes one object (already gone is fine), giving it `grace` seconds to stop (its own grace
/// period when `None`).
pub async fn delete_within<K>(
    context: &Context,
    namespace: &str,
    name: &str,
    grace: Option<u32>,
) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let params = DeleteParams {
        grace_period_seconds: grace,
        ..DeleteParams::default()
    };
    match Api::<K>::namespaced(context.client.clone(), namespace)
        .delete(name, &params)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::kube(
            format!("deleting {} {namespace}/{name}", K::kind(&())),
            source,
        )),
    }
}

/// Asserts what every object walt makes for a tenant shows (for the kinds' unit tests): it is in the
/// tenant's runtime namespace `runtime`, never the tenant's own, with no owner reference (they cannot cross
/// namespaces) and the owner labels of `owner` of kind `kind`.
#[cfg(test)]
pub fn assert_placed_for<K: Resource>(made: &ObjectMeta, runtime: &str, kind: &str, owner: &K) {
    assert_eq!(
        made.namespace.as_deref(),
        Some(runtime),
        "in the tenant's runtime namespace, never the tenant's own"
    );
    assert!(
        made.owner_references.as_ref().is_none_or(Vec::is_empty),
        "no cross-namespace owner reference"
    );
    assert!(
        owned_by(made, kind, owner),
        "owner labels of {kind}: {:?}",
        made.labels
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{ShellSession, ShellSessionSpec};

    fn session(namespace: &str, name: &str, uid: &str) -> ShellSession {
        let mut session = ShellSession::new(name, ShellSessionSpec::default());
        session.metadata.namespace = Some(namespace.into());
        session.metadata.uid = Some(uid.into());
        session
    }

    #[test]
    fn an_object_is_its_owners_only_by_kind_namespace_and_uid() {
        let alice = session("alice", "s1", "uid-a");
        let mut meta = ObjectMeta {
            namespace: Some("walt-run-alice".into()),
            labels: Some(owner_labels("ShellSession", &alice)),
            ..ObjectMeta::default()
        };
        assert!(owned_by(&meta, "ShellSession", &alice));
        assert!(!owned_by(&meta, "Node", &alice), "another kind");
        let recreated = session("alice", "s1", "uid-new");
        assert!(
            !owned_by(&meta, "ShellSession", &recreated),
            "same name, another uid"
        );
        let bob = session("bob", "s1", "uid-a");
        assert!(!owned_by(&meta, "ShellSession", &bob), "another tenant");
        meta.namespace = Some("walt-run-bob".into());
        assert!(
            !owned_by(&meta, "ShellSession", &alice),
            "outside alice's runtime namespace"
        );
        let unlabelled = ObjectMeta::default();
        assert!(!owned_by(&unlabelled, "ShellSession", &alice));
        let labels = owner_labels("ShellSession", &alice);
        assert_eq!(labels.get(TENANT_LABEL).map(String::as_str), Some("alice"));
        assert_eq!(labels.get(OWNER_NAME_LABEL).map(String::as_str), Some("s1"));
    }

    #[test]
    fn the_namespace_is_used_only_when_the_operator_made_it_for_this_tenant() {
        let made = runtime_namespace_object("alice");
        assert_eq!(made.name_any(), "walt-run-alice");
        assert_eq!(
            made.labels().get(POD_SECURITY_ENFORCE).map(String::as_str),
            Some("privileged")
        );
        assert!(is_runtime_namespace_of(&made, "alice"));
        assert!(!is_runtime_namespace_of(&made, "bob"));
        let mut squatted = made.clone();
        squatted.metadata.labels = None;
        assert!(!is_runtime_namespace_of(&squatted, "alice"));
        assert!(refuse_tenant("walt-run-alice").is_some_and(|why| why.contains("walt-run-")));
        assert_eq!(refuse_tenant("alice"), None);
    }

    fn binding(role: &str, subjects: &[(&str, &str, Option<&str>)]) -> RoleBinding {
        RoleBinding {
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: role.into(),
            },
            subjects: Some(
                subjects
                    .iter()
                    .map(|(kind, name, namespace)| Subject {
                        kind: (*kind).into(),
                        name: (*name).into(),
                        namespace: namespace.map(str::to_owned),
                        ..Subject::default()
                    })
                    .collect(),
            ),
            ..RoleBinding::default()
        }
    }

    #[test]
    fn only_subjects_of_walts_tenant_roles_may_attach() {
        let roles = ["edit", "walt-edit"].map(str::to_owned);
        let bindings = [
            binding(
                "walt-edit",
                &[("User", "alice", None), ("ServiceAccount", "ci", None)],
            ),
            binding("edit", &[("User", "alice", None), ("Group", "team", None)]),
            binding("view", &[("User", "viewer", None)]),
            binding("walt-edit", &[("ServiceAccount", "robot", Some("tools"))]),
        ];
        let subjects = attach_subjects(&bindings, "alice", &roles);
        let names: Vec<(String, String, Option<String>)> = subjects
            .iter()
            .map(|s| (s.kind.clone(), s.name.clone(), s.namespace.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("Group".into(), "team".into(), None),
                ("ServiceAccount".into(), "ci".into(), Some("alice".into())),
                ("ServiceAccount".into(), "robot".into(), Some("tools".into())),
                ("User".into(), "alice".into(), None),
            ]
        );
        let mut as_role = binding("walt-edit", &[("User", "mallory", None)]);
        as_role.role_ref.kind = "Role".into();
        assert!(
            attach_subjects(&[as_role], "alice", &roles).is_empty(),
            "a tenant's own Role named walt-edit"
        );
        let made = attach_binding("walt-run-alice", "alice", "walt-session-attach", subjects);
        assert_eq!(made.role_ref.name, "walt-session-attach");
        assert_eq!(made.metadata.namespace.as_deref(), Some("walt-run-alice"));
    }

    #[test]
    fn the_sweep_removes_what_no_live_owner_of_the_tenant_has() {
        let made = |name: &str, owner: Option<(&str, &str, &str)>| Made {
            kind: "Pod",
            name: name.into(),
            owner: owner.map(|(k, n, u)| (k.into(), n.into(), u.into())),
        };
        let objects = [
            made("walt-shell-live", Some(("ShellSession", "alice", "u1"))),
            made("walt-shell-gone", Some(("ShellSession", "alice", "u2"))),
            made("walt-node-v1", Some(("Node", "alice", "u3"))),
            made("walt-node-kind", Some(("Node", "alice", "u1"))),
            made("bobs", Some(("ShellSession", "bob", "u1"))),
            made("walt-build-live", Some(("ImageBuild", "alice", "u4"))),
            made("walt-build-gone", Some(("ImageBuild", "alice", "u5"))),
            made("unlabelled", None),
        ];
        let live = BTreeSet::from([
            ("ShellSession".to_owned(), "u1".to_owned()),
            ("Node".to_owned(), "u3".to_owned()),
            ("ImageBuild".to_owned(), "u4".to_owned()),
        ]);
        let gone: Vec<&str> = orphans(&objects, "alice", &live)
            .iter()
            .map(|object| object.name.as_str())
            .collect();
        assert_eq!(
            gone,
            vec!["walt-shell-gone", "walt-node-kind", "bobs", "walt-build-gone"]
        );
    }
}
