//! Which Nodes name each Device and each Image: [`NodeIndex`], kept from the Node controller's own
//! watch events, read by the mappers that wake Nodes when a Device or an Image changes.
//!
//! Before it, each Device or Image event filtered every Node in the store: at 10,000 Nodes and
//! 10,000 Images (each changing twice at start-up) that was 400 million name comparisons, a quarter
//! of the operator's CPU by `perf` (`memcmp`). With the index an event costs a hash lookup and the
//! few Nodes it names.
//!
//! The index follows the watch the way the store does: an event applied to one Node replaces what
//! the index had of it; a re-list (`Init` … `InitDone`) builds a new index beside the current one and
//! swaps it in when complete, so mappers never see a half-listed index.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;
use walt_crds::{ImageName, Node};

use super::cached::Cached;

/// A Node as the controller's store names it.
pub type NodeRef = ObjectRef<Cached<Node>>;

/// The reference of `node` by namespace and name alone (pure): what the controller queues, without the
/// version and uid `ObjectRef::from_obj` would copy into each of the index's three places.
fn node_ref(node: &Cached<Node>) -> NodeRef {
    let meta = kube::Resource::meta(node);
    let reference = ObjectRef::new(meta.name.as_deref().unwrap_or_default());
    match &meta.namespace {
        Some(namespace) => reference.within(namespace),
        None => reference,
    }
}

/// What the index keeps of one Node: the Device and the Image it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Names {
    /// `spec.device`.
    device: Option<String>,
    /// `spec.image` as written (its tag compared at lookup: [`crate::controller::node::boots_image`]).
    image: Option<String>,
    /// The image's name without its tag, the key of [`Entries::by_image`].
    image_key: Option<String>,
}

impl Names {
    /// What `node` names (pure); nothing for a Node that could not be decoded.
    fn of(node: &Cached<Node>) -> Self {
        let Ok(node) = &node.0 else {
            return Names::default();
        };
        let image = node.spec.image.clone();
        let image_key = image
            .as_deref()
            .and_then(|image| ImageName::parse(image).ok())
            .map(|parsed| parsed.name().to_owned());
        Names {
            device: node.spec.device.clone(),
            image,
            image_key,
        }
    }
}

/// One complete index.
#[derive(Debug, Default)]
struct Entries {
    names: HashMap<NodeRef, Names>,
    by_device: HashMap<String, HashSet<NodeRef>>,
    by_image: HashMap<String, HashSet<NodeRef>>,
}

/// Adds `node` under `key` of `map`.
fn link(map: &mut HashMap<String, HashSet<NodeRef>>, key: Option<&String>, node: &NodeRef) {
    if let Some(key) = key {
        map.entry(key.clone()).or_default().insert(node.clone());
    }
}

/// Removes `node` from `key` of `map` (and the key once no Node is left under it).
fn unlink(map: &mut HashMap<String, HashSet<NodeRef>>, key: Option<&String>, node: &NodeRef) {
    if let Some(key) = key
        && let Some(nodes) = map.get_mut(key)
    {
        nodes.remove(node);
        if nodes.is_empty() {
            map.remove(key);
        }
    }
}

impl Entries {
    fn remove(&mut self, node: &NodeRef) {
        if let Some(old) = self.names.remove(node) {
            unlink(&mut self.by_device, old.device.as_ref(), node);
            unlink(&mut self.by_image, old.image_key.as_ref(), node);
        }
    }

    fn insert(&mut self, node: NodeRef, names: Names) {
        self.remove(&node);
        link(&mut self.by_device, names.device.as_ref(), &node);
        link(&mut self.by_image, names.image_key.as_ref(), &node);
        self.names.insert(node, names);
    }
}

#[derive(Debug, Default)]
struct State {
    current: Entries,
    /// The index a re-list is building, swapped in at `InitDone`.
    listing: Option<Entries>,
}

/// Which Nodes name each Device and each Image (see the module docs).
#[derive(Debug, Default)]
pub struct NodeIndex(Mutex<State>);

impl NodeIndex {
    /// Follows one event of the Node watch.
    pub fn apply(&self, event: &Event<Cached<Node>>) {
        let Ok(mut state) = self.0.lock() else { return };
        match event {
            Event::Apply(node) => state.current.insert(node_ref(node), Names::of(node)),
            Event::Delete(node) => state.current.remove(&node_ref(node)),
            Event::Init => state.listing = Some(Entries::default()),
            Event::InitApply(node) => {
                let entries = state.listing.get_or_insert_with(Entries::default);
                entries.insert(node_ref(node), Names::of(node));
            }
            Event::InitDone => {
                if let Some(listed) = state.listing.take() {
                    state.current = listed;
                }
            }
        }
    }

    /// The Nodes whose `spec.device` is `device`.
    pub fn naming_device(&self, device: &str) -> Vec<NodeRef> {
        let Ok(state) = self.0.lock() else {
            return Vec::new();
        };
        state
            .current
            .by_device
            .get(device)
            .map(|nodes| nodes.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The Nodes that boot `image` (any namespace: the catalog is shared), its tag compared as
    /// [`crate::controller::node::boots_image`] does.
    pub fn booting(&self, image: &ImageName) -> Vec<NodeRef> {
        let Ok(state) = self.0.lock() else {
            return Vec::new();
        };
        let Some(candidates) = state.current.by_image.get(image.name()) else {
            return Vec::new();
        };
        candidates
            .iter()
            .filter(|node| {
                state.current.names.get(*node).is_some_and(|names| {
                    names
                        .image
                        .as_deref()
                        .is_some_and(|wanted| crate::controller::node::boots_image(wanted, image))
                })
            })
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::NodeSpec;

    fn node(namespace: &str, name: &str, device: Option<&str>, image: Option<&str>) -> Cached<Node> {
        let mut node = Node::new(
            name,
            NodeSpec {
                model: "pc-x86-64".into(),
                device: device.map(str::to_owned),
                image: image.map(str::to_owned),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some(namespace.into());
        Cached(Ok(node))
    }

    fn names(mut refs: Vec<NodeRef>) -> Vec<String> {
        refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        refs.into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
            .collect()
    }

    fn image(name: &str) -> ImageName {
        ImageName::parse(name).expect("an image name")
    }

    #[test]
    fn finds_the_nodes_naming_a_device_or_booting_an_image_across_namespaces() {
        let index = NodeIndex::default();
        index.apply(&Event::Apply(node("a", "n1", Some("pc-01"), Some("debian"))));
        index.apply(&Event::Apply(node(
            "b",
            "n2",
            Some("pc-02"),
            Some("debian:latest"),
        )));
        index.apply(&Event::Apply(node("b", "n3", None, Some("debian:v2"))));
        index.apply(&Event::Apply(node("b", "n4", None, Some("debian-tuned"))));
        assert_eq!(names(index.naming_device("pc-01")), ["a/n1"]);
        assert!(index.naming_device("pc-03").is_empty());
        assert_eq!(names(index.booting(&image("debian"))), ["a/n1", "b/n2"]);
        assert_eq!(names(index.booting(&image("debian:v2"))), ["b/n3"]);
        assert_eq!(names(index.booting(&image("debian-tuned"))), ["b/n4"]);
    }

    #[test]
    fn a_changed_or_deleted_node_leaves_its_former_names() {
        let index = NodeIndex::default();
        index.apply(&Event::Apply(node("a", "n1", Some("pc-01"), Some("debian"))));
        index.apply(&Event::Apply(node("a", "n1", Some("pc-02"), Some("alpine"))));
        assert!(index.naming_device("pc-01").is_empty());
        assert!(index.booting(&image("debian")).is_empty());
        assert_eq!(names(index.naming_device("pc-02")), ["a/n1"]);
        index.apply(&Event::Delete(node("a", "n1", Some("pc-02"), Some("alpine"))));
        assert!(index.naming_device("pc-02").is_empty());
        assert!(index.booting(&image("alpine")).is_empty());
    }

    #[test]
    fn a_relist_is_swapped_in_whole_when_done() {
        let index = NodeIndex::default();
        index.apply(&Event::Apply(node("a", "gone", Some("pc-01"), Some("debian"))));
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(node("a", "new", Some("pc-01"), Some("debian"))));
        // Until the list is complete, lookups answer from the index of before.
        assert_eq!(names(index.naming_device("pc-01")), ["a/gone"]);
        index.apply(&Event::InitDone);
        assert_eq!(names(index.naming_device("pc-01")), ["a/new"]);
        assert_eq!(names(index.booting(&image("debian"))), ["a/new"]);
    }

    #[test]
    fn an_undecodable_node_names_nothing() {
        let index = NodeIndex::default();
        index.apply(&Event::Apply(node("a", "n1", Some("pc-01"), Some("debian"))));
        let mut broken = node("a", "n1", None, None);
        broken.0 = Err(kube::core::error_boundary::InvalidObject {
            error: "bad".into(),
            metadata: broken.0.as_ref().map(|n| n.metadata.clone()).unwrap_or_default(),
        });
        index.apply(&Event::Apply(broken));
        assert!(index.naming_device("pc-01").is_empty());
        assert!(index.booting(&image("debian")).is_empty());
    }
}
