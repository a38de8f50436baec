//! Shell pod and virtual node runtime: layer cache, overlay mount, namespaces,
//! emulation, PTY.

pub mod cli;
