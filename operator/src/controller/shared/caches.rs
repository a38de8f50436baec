//! The controllers' watch caches, read by the reconciles that run most often instead of asking the
//! API server each time: [`Caches`].
//!
//! At 10,000 Nodes every Node reconcile read its Image and its Device, and every Device reconcile its
//! Node, with a GET each; the API server (CPU-bound on a small control plane) answered those before the
//! writes that matter. The controllers already keep every watched object of these kinds in their
//! stores, so a reconcile reads them there. What the cache answers may be a little behind the API
//! server, as anything a watch brings; a change reaches the reconcile through the watch soon after, and
//! writes stay conditional on the version they were decided on. What the cache does not have (an
//! object not created yet, or not watched by this operator) is asked from the API server as before,
//! so a missing object is always the API server's answer.

use kube::runtime::reflector::{ObjectRef, Store};
use walt_crds::{Device, Image, Node};

use super::cached::Cached;

/// The watch caches of the kinds reconciles read most (the stores of the Node, Image and Device
/// controllers).
#[derive(Clone)]
pub struct Caches {
    /// Every Node the operator watches.
    pub nodes: Store<Cached<Node>>,
    /// Every Image the operator watches.
    pub images: Store<Cached<Image>>,
    /// Every Device (cluster-scoped).
    pub devices: Store<Cached<Device>>,
    /// The one namespace the Node and Image caches hold (`--watch-namespace`), or `None`: all.
    pub scope: Option<String>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Whether a cache of namespaced objects watched in `scope` holds those of `namespace` (pure).
pub fn covers(scope: Option<&str>, namespace: &str) -> bool {
    scope.is_none_or(|scope| scope == namespace)
}

/// The decoded object `key` names in `store`: `None` when the store does not have it or cannot decode it.
fn read<K>(store: &Store<Cached<K>>, key: &ObjectRef<Cached<K>>) -> Option<K>
where
    K: kube::Resource<DynamicType = ()> + Clone,
{
    decoded(store.get(key).as_deref())
}

/// The decoded object of a cache entry (pure): none for an entry that cannot be decoded (its reader
/// asks the API server, which says why).
fn decoded<K: Clone>(entry: Option<&Cached<K>>) -> Option<K> {
    entry.and_then(|cached| cached.0.as_ref().ok().cloned())
}

impl Caches {
    /// Waits until every store has its first full list; `false` if one never will (its controller
    /// ended). The caches are shared with the reconciles only then (an empty store before its first
    /// list would say every object is missing). Awaited once, by one task: kube's readiness signal
    /// wakes a single waiter (seen: 32 Node reconciles awaiting it at once, 31 never woke).
    pub async fn ready(&self) -> bool {
        self.nodes.wait_until_ready().await.is_ok()
            && self.images.wait_until_ready().await.is_ok()
            && self.devices.wait_until_ready().await.is_ok()
    }

    /// The Image `namespace/name` as the cache has it, if the cache holds that namespace and has it.
    pub fn image(&self, namespace: &str, name: &str) -> Option<Image> {
        if !covers(self.scope.as_deref(), namespace) {
            return None;
        }
        read(&self.images, &ObjectRef::new(name).within(namespace))
    }

    /// The Node `namespace/name` as the cache has it, if the cache holds that namespace and has it.
    pub fn node(&self, namespace: &str, name: &str) -> Option<Node> {
        if !covers(self.scope.as_deref(), namespace) {
            return None;
        }
        read(&self.nodes, &ObjectRef::new(name).within(namespace))
    }

    /// The Device `name` as the cache has it, if it has it.
    pub fn device(&self, name: &str) -> Option<Device> {
        read(&self.devices, &ObjectRef::new(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt as _;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    fn image(namespace: &str, name: &str) -> Cached<Image> {
        let mut image = Image::new(name, walt_crds::ImageSpec::default());
        image.metadata.namespace = Some(namespace.into());
        Cached(Ok(image))
    }

    fn filled(images: Vec<Cached<Image>>, scope: Option<&str>) -> Caches {
        let mut writer = Writer::<Cached<Image>>::default();
        writer.apply_watcher_event(&Event::Init);
        for image in images {
            writer.apply_watcher_event(&Event::InitApply(image));
        }
        writer.apply_watcher_event(&Event::InitDone);
        let mut nodes = Writer::<Cached<Node>>::default();
        nodes.apply_watcher_event(&Event::InitDone);
        let mut devices = Writer::<Cached<Device>>::default();
        devices.apply_watcher_event(&Event::InitDone);
        Caches {
            nodes: nodes.as_reader(),
            images: writer.as_reader(),
            devices: devices.as_reader(),
            scope: scope.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn the_cache_answers_what_it_holds_and_nothing_outside_its_namespace() {
        let caches = filled(vec![image("lab", "debian")], Some("lab"));
        assert!(caches.ready().await);
        let found = caches.image("lab", "debian").expect("cached");
        assert_eq!(found.name_any(), "debian");
        assert!(caches.image("lab", "alpine").is_none(), "not created");
        assert!(
            caches.image("catalog", "debian").is_none(),
            "another namespace is not watched: the API server is asked"
        );
        assert!(caches.node("lab", "n1").is_none());
        assert!(caches.device("d1").is_none());
    }

    #[tokio::test]
    async fn caches_whose_store_never_gets_its_first_list_are_not_ready() {
        let caches = filled(Vec::new(), None);
        let never = Writer::<Cached<Image>>::default();
        let unfilled = Caches {
            images: never.as_reader(),
            ..caches
        };
        drop(never);
        assert!(
            !unfilled.ready().await,
            "its controller ended before the first list"
        );
    }

    #[test]
    fn an_entry_that_cannot_be_decoded_is_not_an_answer() {
        let invalid: Cached<Image> = Cached(Err(kube::core::error_boundary::InvalidObject {
            error: "invalid type".into(),
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta::default(),
        }));
        assert!(decoded(Some(&invalid)).is_none());
        assert!(decoded::<Image>(None).is_none());
        assert!(covers(None, "any"));
        assert!(!covers(Some("lab"), "other"));
    }
}
