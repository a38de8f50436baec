//! Test support for walt: the real-Kubernetes harness (`cargo xtask cluster …`),
//! real registries and real SSH nodes, shared by the end-to-end tests.
