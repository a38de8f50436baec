//! Reaching the cluster as kubectl does: kubeconfig (`--kubeconfig`, `$KUBECONFIG`,
//! `~/.kube/config`, in-cluster), `--context`, `-n/--namespace`.

use std::time::Duration;

use futures::stream::BoxStream;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use walt_crds::{Image, ImageBuild, Node, NodeSave, ShellSession};

use crate::cli::GlobalArgs;
use crate::error::{Error, Op, Result};

/// A connected client, the namespace to work in, and the global flags.
#[derive(Clone)]
pub struct Ctx {
    /// The API client.
    pub client: Client,
    /// The namespace (flag, else the context's, else `default`).
    pub namespace: String,
    /// The global flags, for what needs them later (the gateway address).
    pub global: GlobalArgs,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Loads the client configuration the way kubectl does.
pub async fn load_config(global: &GlobalArgs) -> Result<Config> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        cluster: None,
        user: None,
    };
    let config = if let Some(path) = &global.kubeconfig {
        let kubeconfig = Kubeconfig::read_from(path)
            .map_err(|e| Error::Kubeconfig(format!("cannot read {}: {e}", path.display())))?;
        Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?
    } else if global.context.is_some() {
        Config::from_kubeconfig(&options)
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?
    } else {
        Config::infer()
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?
    };
    Ok(config)
}

impl Ctx {
    /// Connects with the global flags.
    pub async fn connect(global: &GlobalArgs) -> Result<Ctx> {
        let mut config = load_config(global).await?;
        config.connect_timeout = Some(global.request_timeout);
        let namespace = global
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| Error::Kubeconfig(e.to_string()))?;
        Ok(Ctx {
            client,
            namespace,
            global: global.clone(),
        })
    }

    /// Nodes of the namespace.
    pub fn nodes(&self) -> Api<Node> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Images of the namespace.
    pub fn images(&self) -> Api<Image> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Shell sessions of the namespace.
    pub fn sessions(&self) -> Api<ShellSession> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Node saves of the namespace.
    pub fn saves(&self) -> Api<NodeSave> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Image builds of the namespace.
    pub fn builds(&self) -> Api<ImageBuild> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Pods of the namespace.
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Pods of `namespace`: walt's shell pods run in the tenant's runtime namespace
    /// (`walt-run-<namespace>`, the session's `status.podNamespace`), never in the tenant's own.
    pub fn pods_in(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Events of the namespace.
    pub fn events(&self) -> Api<Event> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Gets a node, with a useful message when it is missing or forbidden.
    pub async fn get_node(&self, name: &str) -> Result<Node> {
        self.nodes().get(name).await.map_err(|e| {
            Error::api(
                Op::named("get", "node", "nodes.walt.dev", name, &self.namespace),
                e,
            )
        })
    }

    /// Gets an Image object by object name.
    pub async fn get_image(&self, object_name: &str, display: &str) -> Result<Image> {
        self.images().get(object_name).await.map_err(|e| {
            Error::api(
                Op::named("get", "image", "images.walt.dev", display, &self.namespace),
                e,
            )
        })
    }

    /// Whether the current user may do `verb` on `resource` (`group`, optional `subresource`) here.
    /// Unknown (the review itself failed) counts as allowed: the real request will tell.
    pub async fn can_i(
        &self,
        verb: &str,
        group: &str,
        resource: &str,
        subresource: Option<&str>,
        namespace: &str,
    ) -> bool {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_string()),
                    verb: Some(verb.to_string()),
                    group: Some(group.to_string()),
                    resource: Some(resource.to_string()),
                    subresource: subresource.map(str::to_string),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let api: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        match api.create(&PostParams::default(), &review).await {
            Ok(answer) => answer.status.is_none_or(|s| s.allowed),
            Err(_) => true,
        }
    }

    /// Checks permissions up front, so a workflow fails before it creates anything, naming the
    /// first permission missing (in the order given). Each item: (verb, group, resource,
    /// subresource, namespace).
    pub async fn require(
        &self,
        needs: &[(
            &'static str,
            &'static str,
            &'static str,
            Option<&'static str>,
            &str,
        )],
    ) -> Result<()> {
        // Asked at once (one round trip's time for all), judged in order.
        let answers =
            futures::future::join_all(needs.iter().map(|(verb, group, resource, sub, namespace)| {
                self.can_i(verb, group, resource, *sub, namespace)
            }))
            .await;
        for ((verb, group, resource, sub, namespace), allowed) in needs.iter().zip(answers) {
            if !allowed {
                let mut full = if group.is_empty() {
                    (*resource).to_string()
                } else {
                    format!("{resource}.{group}")
                };
                if let Some(sub) = sub {
                    full = format!("{full}/{sub}");
                }
                return Err(Error::Forbidden {
                    verb: (*verb).to_string(),
                    resource: full,
                    namespace: (*namespace).to_string(),
                    message: "checked with a SelfSubjectAccessReview before starting".into(),
                });
            }
        }
        Ok(())
    }

    /// Recent events about an object (by uid), oldest first; empty when events cannot be read.
    pub async fn events_for(&self, uid: &str) -> Vec<Event> {
        self.events_in(&self.namespace, uid).await
    }

    /// Events about the object with `uid` in `namespace` (empty when they cannot be read).
    pub async fn events_in(&self, namespace: &str, uid: &str) -> Vec<Event> {
        let params = ListParams::default().fields(&format!("involvedObject.uid={uid}"));
        let mut events = Api::<Event>::namespaced(self.client.clone(), namespace)
            .list(&params)
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        events.sort_by_key(event_time);
        events
    }
}

/// The best time an event carries (series, last, event, first, creation).
pub fn event_time(event: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// Sleeps between polls of a status (watches are used where they matter; polls keep simple
/// loops simple and survive API server restarts without extra code).
pub async fn tick() {
    tokio::time::sleep(POLL).await;
}

/// The time between two polls ([`tick`]).
const POLL: Duration = Duration::from_millis(500);

/// A wake-up at each change of the object `name` of `api` (a watch), so a wait answers as soon as
/// the operator writes rather than at the next poll (half a poll sooner on average at each step,
/// measured on shell sessions by `cargo xtask bench`).
pub fn changes_of<K>(api: Api<K>, name: &str) -> BoxStream<'static, ()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config).default_backoff().map(|_| ()).boxed()
}

/// Waits for the next change [`changes_of`] brings, or one poll ([`tick`]) at most: a watch refused
/// (by RBAC) or ended leaves the wait polling.
pub async fn next_change(changes: &mut BoxStream<'static, ()>) {
    next_change_within(changes, POLL).await;
}

/// Waits for the next change [`changes_of`] brings, or `at_most`: a watch refused (by RBAC) or
/// ended leaves the wait looking every `at_most`.
pub async fn next_change_within(changes: &mut BoxStream<'static, ()>, at_most: Duration) {
    use futures::StreamExt as _;
    tokio::select! {
        woke = changes.next() => {
            if woke.is_none() {
                tokio::time::sleep(at_most).await;
            }
        }
        () = tokio::time::sleep(at_most) => {}
    }
}
