//! How the controllers cache what they watch: [`Cached`].

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::error_boundary::InvalidObject;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A watched object as the controllers keep it in their stores:
/// - decoded when it can be, else its metadata and why (the watch of the others goes on, and the object gets
///   a Warning Event), as kube's `DeserializeGuard` does;
/// - without `metadata.managedFields`: two thirds of a walt object's JSON (measured: a Node 3,011 bytes with
///   them, 1,158 without), never read by the operator, and most of what its stores held at scale.
#[derive(Clone, Debug)]
pub struct Cached<K>(pub Result<K, InvalidObject>);

/// Removes what the operator never reads from an object's JSON before it is decoded and kept (pure).
pub fn trim(object: &mut serde_json::Value) {
    if let Some(metadata) = object
        .get_mut("metadata")
        .and_then(serde_json::Value::as_object_mut)
    {
        metadata.remove("managedFields");
    }
}

impl<'de, K> Deserialize<'de> for Cached<K>
where
    K: DeserializeOwned,
{
    fn deserialize<D>(deserializer: D) -> Result<Self, D::Error>
    where
        D: serde::Deserializer<'de>,
    {
        let mut object = serde_json::Value::deserialize(deserializer)?;
        trim(&mut object);
        Ok(Cached(match K::deserialize(&object) {
            Ok(decoded) => Ok(decoded),
            Err(error) => {
                let metadata = object
                    .get("metadata")
                    .map(ObjectMeta::deserialize)
                    .transpose()
                    .map_err(serde::de::Error::custom)?
                    .unwrap_or_default();
                Err(InvalidObject {
                    error: error.to_string(),
                    metadata,
                })
            }
        }))
    }
}

impl<K: Resource> Resource for Cached<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dynamic: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dynamic)
    }

    fn group(dynamic: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dynamic)
    }

    fn version(dynamic: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dynamic)
    }

    fn plural(dynamic: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dynamic)
    }

    fn meta(&self) -> &ObjectMeta {
        match &self.0 {
            Ok(object) => object.meta(),
            Err(invalid) => &invalid.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match &mut self.0 {
            Ok(object) => object.meta_mut(),
            Err(invalid) => &mut invalid.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt as _;

    #[test]
    fn a_cached_object_keeps_everything_but_its_managed_fields() {
        let node: Cached<walt_crds::Node> = serde_json::from_value(serde_json::json!({
            "apiVersion": "walt.dev/v1alpha1", "kind": "Node",
            "metadata": {"name": "n1", "namespace": "lab", "resourceVersion": "7",
                "managedFields": [{"manager": "walt-operator", "operation": "Apply",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}}}}]},
            "spec": {"model": "rpi-4-b", "image": "debian"}
        }))
        .expect("decodes");
        let node = node.0.expect("a valid Node");
        assert_eq!(node.name_any(), "n1");
        assert_eq!(node.resource_version().as_deref(), Some("7"));
        assert_eq!(node.spec.image.as_deref(), Some("debian"));
        assert!(node.metadata.managed_fields.is_none());
    }

    #[test]
    fn an_object_that_cannot_be_decoded_keeps_its_metadata_and_says_why() {
        let node: Cached<walt_crds::Node> = serde_json::from_value(serde_json::json!({
            "apiVersion": "walt.dev/v1alpha1", "kind": "Node",
            "metadata": {"name": "broken", "namespace": "lab"},
            "spec": {"model": 42}
        }))
        .expect("the guard itself decodes");
        assert_eq!(node.meta().name.as_deref(), Some("broken"));
        let invalid = node.0.expect_err("spec.model is not a string");
        assert!(invalid.error.contains("invalid type"), "{}", invalid.error);
    }
}
