//! walt operator library.
//!
//! Modules with clear walls: only [`controller`] knows Kubernetes; [`oci`],
//! [`overlay`], [`runtime`] and [`ssh`] work, and are tested, without it.

pub mod binfmt;
pub mod boot;
pub mod build;
pub mod controller;
pub mod fuzzing;
pub mod oci;
pub mod overlay;
pub mod runtime;
pub mod ssh;
