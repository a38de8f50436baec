//! The walt API: custom resources of group `walt.dev`, version `v1alpha1`.
//!
//! This crate holds the API types only (serde + schemars + kube derive) and the
//! CRD generation; no runtime code lives here.

/// All walt CustomResourceDefinitions as one multi-document YAML stream.
pub fn crds_yaml() -> String {
    String::new()
}
