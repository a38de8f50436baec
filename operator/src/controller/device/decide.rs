//! Whether a Device's binding still holds (pure): the PersistentVolume / PersistentVolumeClaim rule.
//! The lab admin's loan (`spec.lentTo`) is the admin's and stays; the claim by a Node
//! (`status.boundTo`) lasts as long as that very Node (same uid) exists, names the device and lives
//! in the namespace the device is lent to. Once one of these stops being true the binding is
//! stale and released, so the device never keeps pointing at a gone Node and another Node of the
//! namespace may take it.

use kube::ResourceExt;
use walt_crds::{Device, DeviceBinding, Node};

use super::reasons;

/// Why a binding is released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The Event's reason ([`reasons`]).
    pub reason: &'static str,
    /// The Event's note: what happened to the binding and what the device is now.
    pub message: String,
}

/// What the Device controller does with a Device's binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No binding, or one that still holds: nothing to write.
    Keep,
    /// The binding is stale: clear `status.boundTo`.
    Release(Release),
}

/// The binding this operator looks after, if any (pure): `scope` is the namespace it watches
/// (`None`: all of them); a binding in another namespace is left to that namespace's operator, which
/// alone reads its Nodes.
pub fn binding_in_scope<'a>(device: &'a Device, scope: Option<&str>) -> Option<&'a DeviceBinding> {
    device
        .bound_to()
        .filter(|binding| scope.is_none_or(|scope| scope == binding.namespace))
}

/// Decides what happens to a Device's binding (pure). `holder` is the Node the binding names, read
/// by name in its namespace (`None`: it, or its namespace, is gone).
pub fn decide(device: &Device, holder: Option<&Node>) -> Step {
    let Some(binding) = device.bound_to() else {
        return Step::Keep;
    };
    let name = device.name_any();
    let bound = format!("{}/{}", binding.namespace, binding.node);
    if device.lent_to() != Some(binding.namespace.as_str()) {
        let now = device.lent_to().map_or_else(
            || "it is not lent to any namespace now".to_owned(),
            |namespace| format!("it is lent to the namespace {namespace} now, free for one of its Nodes"),
        );
        return Step::Release(Release {
            reason: reasons::TAKEN_BACK,
            message: format!(
                "the Device {name} was taken back from the namespace {}: the Node {bound} no longer holds it; {now}",
                binding.namespace
            ),
        });
    }
    match holder.map(|node| holds(node, binding, &name)) {
        Some(Holds::Yes) => Step::Keep,
        Some(Holds::Deleting) => Step::Release(released(&name, &bound, "is being deleted", binding)),
        Some(Holds::OtherDevice) => Step::Release(released(&name, &bound, "names another device", binding)),
        Some(Holds::Recreated) => Step::Release(released(
            &name,
            &bound,
            "was deleted and created again (another uid: another claim)",
            binding,
        )),
        None => Step::Release(released(
            &name,
            &bound,
            "is gone (deleted, or its namespace)",
            binding,
        )),
    }
}

/// Whether the watch cache's copy of the Node a binding names (`cached`, `None` when the cache does not
/// have it) is enough to keep the binding (pure): only a [`Step::Keep`] is taken from the cache. A cache
/// may lag behind the API server (a Node just created, bound and not seen yet), so a release is decided
/// on the API server's answer alone.
pub fn kept_by_cache(device: &Device, cached: Option<&Node>) -> bool {
    cached.is_some() && decide(device, cached) == Step::Keep
}

/// How the Node a binding names relates to it.
enum Holds {
    /// It is the bound Node, alive, naming the device.
    Yes,
    /// It is being deleted.
    Deleting,
    /// Same name, another uid.
    Recreated,
    /// It names another device.
    OtherDevice,
}

fn holds(node: &Node, binding: &DeviceBinding, device: &str) -> Holds {
    if node.uid().as_deref() != Some(binding.uid.as_str()) {
        Holds::Recreated
    } else if node.metadata.deletion_timestamp.is_some() {
        Holds::Deleting
    } else if node.spec.device.as_deref() != Some(device) {
        Holds::OtherDevice
    } else {
        Holds::Yes
    }
}

fn released(device: &str, bound: &str, what: &str, binding: &DeviceBinding) -> Release {
    Release {
        reason: reasons::RELEASED,
        message: format!(
            "the Node {bound} bound to the Device {device} {what}: the device is released, still lent to the namespace {}, free for another of its Nodes",
            binding.namespace
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use walt_crds::{DeviceLoan, DeviceSpec, DeviceStatus, NodeSpec};

    fn node(namespace: &str, name: &str, uid: &str, device: &str) -> Node {
        let mut node = Node::new(
            name,
            NodeSpec {
                device: Some(device.into()),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some(namespace.into());
        node.metadata.uid = Some(uid.into());
        node
    }

    fn device(lent_to: Option<&str>, bound: Option<(&str, &str, &str)>) -> Device {
        let mut device = Device::new(
            "pi1",
            DeviceSpec {
                address: Some("192.0.2.11".into()),
                ssh_port: 22,
                model: "rpi-4-b".into(),
                lent_to: lent_to.map(|namespace| DeviceLoan {
                    namespace: namespace.into(),
                }),
                ..DeviceSpec::default()
            },
        );
        device.status = Some(DeviceStatus {
            bound_to: bound.map(|(namespace, node, uid)| DeviceBinding {
                namespace: namespace.into(),
                node: node.into(),
                uid: uid.into(),
            }),
            ..DeviceStatus::default()
        });
        device
    }

    fn reason(step: &Step) -> Option<&'static str> {
        match step {
            Step::Release(release) => Some(release.reason),
            Step::Keep => None,
        }
    }

    #[test]
    fn a_binding_holds_while_its_very_node_lives_in_the_lent_namespace() {
        let bound = device(Some("alice"), Some(("alice", "n1", "u1")));
        let n1 = node("alice", "n1", "u1", "pi1");
        assert_eq!(decide(&bound, Some(&n1)), Step::Keep);
        assert_eq!(decide(&device(Some("alice"), None), None), Step::Keep);
        assert_eq!(decide(&device(None, None), None), Step::Keep);
    }

    #[test]
    fn only_a_binding_the_cached_node_holds_is_decided_from_the_cache() {
        let bound = device(Some("alice"), Some(("alice", "n1", "u1")));
        assert!(kept_by_cache(&bound, Some(&node("alice", "n1", "u1", "pi1"))));
        assert!(
            !kept_by_cache(&bound, None),
            "not in the cache: the API server is asked"
        );
        assert!(
            !kept_by_cache(&bound, Some(&node("alice", "n1", "u2", "pi1"))),
            "a release is the API server's answer"
        );
    }

    #[test]
    fn a_gone_deleted_or_recreated_node_releases_the_device_and_the_loan_stays() {
        let bound = device(Some("alice"), Some(("alice", "n1", "u1")));
        let gone = decide(&bound, None);
        assert_eq!(reason(&gone), Some(reasons::RELEASED));
        let Step::Release(release) = gone else {
            unreachable!()
        };
        assert!(
            release.message.contains("Node alice/n1") && release.message.contains("is gone"),
            "{}",
            release.message
        );
        assert!(
            release.message.contains("still lent to the namespace alice"),
            "{}",
            release.message
        );
        let recreated = node("alice", "n1", "u2", "pi1");
        assert_eq!(reason(&decide(&bound, Some(&recreated))), Some(reasons::RELEASED));
        let mut deleting = node("alice", "n1", "u1", "pi1");
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(reason(&decide(&bound, Some(&deleting))), Some(reasons::RELEASED));
        let elsewhere = node("alice", "n1", "u1", "pi2");
        assert_eq!(reason(&decide(&bound, Some(&elsewhere))), Some(reasons::RELEASED));
    }

    #[test]
    fn a_device_taken_back_or_lent_elsewhere_releases_its_former_tenants_node() {
        let n1 = node("alice", "n1", "u1", "pi1");
        let to_bob = device(Some("bob"), Some(("alice", "n1", "u1")));
        let Step::Release(release) = decide(&to_bob, Some(&n1)) else {
            panic!("a binding in a namespace the device is not lent to must go")
        };
        assert_eq!(release.reason, reasons::TAKEN_BACK);
        assert!(
            release.message.contains("taken back from the namespace alice")
                && release.message.contains("lent to the namespace bob now"),
            "{}",
            release.message
        );
        let unlent = device(None, Some(("alice", "n1", "u1")));
        let Step::Release(release) = decide(&unlent, Some(&n1)) else {
            panic!("a binding of a device lent to nobody must go")
        };
        assert!(
            release.message.contains("not lent to any namespace"),
            "{}",
            release.message
        );
    }

    #[test]
    fn an_operator_watching_one_namespace_looks_after_its_bindings_only() {
        let bound = device(Some("alice"), Some(("alice", "n1", "u1")));
        assert!(binding_in_scope(&bound, Some("bob")).is_none());
        assert_eq!(
            binding_in_scope(&bound, Some("alice")).map(|binding| binding.node.as_str()),
            Some("n1")
        );
        assert!(binding_in_scope(&bound, None).is_some());
        assert!(binding_in_scope(&device(Some("alice"), None), None).is_none());
    }
}
