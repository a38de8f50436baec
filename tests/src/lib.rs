//! Test support for walt: the real-Kubernetes harness (`cargo xtask cluster …`),
//! real registries and real SSH nodes, shared by the end-to-end tests.
//!
//! - [`k8s`]: a real control plane (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler) or a single-node cluster (plus containerd, runc, CNI, kubelet in a network
//!   namespace), started by a test and stopped when it ends. Read its module docs first.
//! - [`process`]: helper processes stopped by PID on drop, even when a test panics.
//! - [`sshnode`]: real OpenSSH `sshd` nodes in network namespaces, with a WalT overlay root.

pub mod k8s;
pub mod process;

pub mod deploy;
pub mod image_build;
pub mod lab;
pub mod ship;
pub mod sshnode;
