//! OCI registry client, layer writer and reader, manifests and configs.

pub mod cli;
