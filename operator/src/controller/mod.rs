//! The controllers (one module per kind): the only part that knows Kubernetes.

pub mod cli;
