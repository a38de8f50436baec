//! Shell pod and virtual node runtime: overlay root, namespaces, emulation,
//! PTY, WalT's init/basic shell modes, change summary and commit.
//!
//! Layers:
//! - [`root`]: the reusable core (also used by the virtual node): prepare an
//!   image root from layer directories and run processes in its namespaces
//!   ([`root::Container::start`], [`root::Container::exec`]).
//! - [`emulation`]: image vs host architecture, binfmt_misc checks.
//! - [`session`]: an image shell session (checks, mode, PTY relay, shutdown).
//! - [`terminal`]: raw mode and the PTY relay.
//! - [`changes`]: the change summary of an upper dir.
//! - [`image`]: pull through the layer cache, commit through the OCI engine.
//! - [`kept`]: a session's changes kept on the cluster node across shell pods (eviction).
//! - [`session_dir`]: a runtime's own working directory in the cache, removed after a kill too.
//! - [`privileges`]: the bounded capability set, `no_new_privs` and the seccomp
//!   filter of the image's processes.
//! - [`seccomp`]: that filter's deny-list and its BPF program.
//! - [`node`]: run an image like a WalT node (the virtual node), with a
//!   supervisor that starts processes in it for the SSH server.
//! - [`vm`]: a VM node's machine (`qemu-system` on a tap of the lab bridge), what the VM node pod
//!   runs.

pub mod changes;
pub mod cli;
pub mod emulation;
pub mod image;
pub mod kept;
pub mod node;
pub mod privileges;
pub mod root;
pub mod seccomp;
pub mod session;
pub mod session_dir;
mod sys;
pub mod terminal;
pub mod vm;
