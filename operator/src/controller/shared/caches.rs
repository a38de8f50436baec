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
//!
//! A reconcile is woken by one watch (the Node controller's watch of Images, say) and reads the cache
//! another keeps (the Image controller's store): the cache may not have the version that woke it yet,
//! and the reconcile would decide on the old one and not be woken again. So each waking watch notes
//! the version it saw when the cache holds another one ([`Ahead::note`]); until the cache has it, that
//! object is read from the API server ([`Ahead::usable`]). A deletion comes with its own, newer
//! version: the deleted object is not read from the cache either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::Resource as _;
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
    /// The versions waking watches saw ahead of these caches.
    pub ahead: Arc<Ahead>,
}

/// The versions of objects a waking watch saw before the cache did, by [`cache_key`]: few at a time
/// (only while a cache lags), so a small map.
#[derive(Debug, Default)]
pub struct Ahead(Mutex<HashMap<String, String>>);

/// The key of an object in [`Ahead`] (pure): kind, namespace (empty for a cluster-scoped one), name.
pub fn cache_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// Whether a waking watch that saw version `seen` of an object is ahead of the cache, which holds
/// `cached` (pure): the cache has another version of it. A cache without the object is not read
/// (the API server is asked), so it needs no note.
pub fn ahead_of_cache(seen: Option<&str>, cached: Option<&str>) -> bool {
    cached.is_some() && cached != seen
}

impl Ahead {
    /// Notes what a waking watch saw of `key` (`seen`) next to the cache's version (`cached`).
    pub fn note(&self, key: String, seen: Option<&str>, cached: Option<&str>) {
        let Ok(mut versions) = self.0.lock() else { return };
        match seen {
            Some(seen) if ahead_of_cache(Some(seen), cached) => {
                versions.insert(key, seen.to_owned());
            }
            _ => {
                versions.remove(&key);
            }
        }
    }

    /// Whether the cache's version (`cached`) of `key` may be read: no waking watch saw another one,
    /// or the cache has caught up with it (then the note goes).
    pub fn usable(&self, key: &str, cached: Option<&str>) -> bool {
        let Ok(mut versions) = self.0.lock() else {
            return false;
        };
        match versions.get(key) {
            None => true,
            Some(seen) if cached == Some(seen.as_str()) => {
                versions.remove(key);
                true
            }
            Some(_) => false,
        }
    }
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

/// The decoded object `key` names in `store`: `None` when the store does not have it, cannot decode
/// it, or a waking watch saw a version of it the store does not have yet.
fn read<K>(store: &Store<Cached<K>>, ahead: &Ahead, key: &ObjectRef<Cached<K>>) -> Option<K>
where
    K: kube::Resource<DynamicType = ()> + Clone,
{
    let cached = store.get(key)?;
    let versioned = cache_key(&K::kind(&()), key.namespace.as_deref().unwrap_or(""), &key.name);
    if !ahead.usable(&versioned, cached.meta().resource_version.as_deref()) {
        return None;
    }
    decoded(Some(&*cached))
}

/// Notes what a waking watch saw of `object` next to `store`'s copy ([`Ahead::note`]); for the mappers of
/// the watches that wake reconciles reading `store`.
pub fn note_seen<K>(ahead: &Ahead, store: &Store<Cached<K>>, object: &Cached<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone,
{
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let name = object.meta().name.clone().unwrap_or_default();
    let reference = ObjectRef::<Cached<K>>::new(&name).within(&namespace);
    let cached = store.get(&reference);
    ahead.note(
        cache_key(&K::kind(&()), &namespace, &name),
        object.meta().resource_version.as_deref(),
        cached
            .as_ref()
            .and_then(|cached| cached.meta().resource_version.as_deref()),
    );
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
        read(&self.images, &self.ahead, &ObjectRef::new(name).within(namespace))
    }

    /// The Node `namespace/name` as the cache has it, if the cache holds that namespace and has it.
    pub fn node(&self, namespace: &str, name: &str) -> Option<Node> {
        if !covers(self.scope.as_deref(), namespace) {
            return None;
        }
        read(&self.nodes, &self.ahead, &ObjectRef::new(name).within(namespace))
    }

    /// The Device `name` as the cache has it, if it has it.
    pub fn device(&self, name: &str) -> Option<Device> {
        read(&self.devices, &self.ahead, &ObjectRef::new(name))
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
            ahead: Arc::default(),
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

    #[tokio::test]
    async fn an_object_a_waking_watch_saw_newer_is_read_from_the_api_server_until_the_cache_has_it() {
        let mut old = image("lab", "debian");
        old.meta_mut().resource_version = Some("7".into());
        let caches = filled(vec![old.clone()], None);
        let mut new = old.clone();
        new.meta_mut().resource_version = Some("9".into());
        note_seen(&caches.ahead, &caches.images, &new);
        assert!(
            caches.image("lab", "debian").is_none(),
            "the cache has 7, the watch saw 9"
        );
        let mut writer = Writer::<Cached<Image>>::default();
        writer.apply_watcher_event(&Event::InitApply(new.clone()));
        writer.apply_watcher_event(&Event::InitDone);
        let caught_up = Caches {
            images: writer.as_reader(),
            ..caches.clone()
        };
        assert!(caught_up.image("lab", "debian").is_some(), "the cache has 9 now");
        note_seen(&caches.ahead, &caches.images, &old);
        assert!(
            caches.image("lab", "debian").is_some(),
            "the watch saw what the cache has"
        );
    }

    #[test]
    fn a_watch_is_ahead_only_of_a_cache_holding_another_version() {
        assert!(ahead_of_cache(Some("9"), Some("7")));
        assert!(!ahead_of_cache(Some("7"), Some("7")));
        assert!(
            !ahead_of_cache(Some("9"), None),
            "not cached: read from the API server anyway"
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
