//! SSH: the node client, node save over SSH, the gateway, the virtual node server.
//!
//! - [`client`]: connect to a node (key from a file or Secret bytes, host key pinned or recorded on first
//!   contact, timeouts, keepalive, errors that say what happened).
//! - [`export`]: stream a node's overlay upper dir in one pass as an overlay change-set tar stream.
//! - [`gateway`]: the SSH gateway that relays users' sessions to nodes with the lab's node key.
//! - [`heap`]: glibc malloc tuning that keeps a save's resident memory close to its live heap.
//! - [`vnode`]: the virtual node (`walt-operator vnode`): an image booted like a node, serving SSH.

use std::path::PathBuf;

pub mod cli;
pub mod client;
pub mod export;
pub mod gateway;
pub mod heap;
pub mod save;
pub mod vnode;

pub use client::{
    ClientConfig, ExecBounds, HostKeyPolicy, NodeClient, NodeTarget, ProxyCommand, ProxyCommandError,
    Transport,
};

/// Everything that can go wrong talking SSH to nodes and users.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// A `USER@HOST[:PORT]` that does not parse.
    #[error("invalid node `{target}`: {reason} (expected USER@HOST[:PORT], e.g. root@192.168.1.20:22)")]
    InvalidTarget {
        /// What was given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A private key file that cannot be read or decoded.
    #[error("cannot use private key {path}: {reason} (expected an unencrypted OpenSSH or PEM private key)")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Private key bytes (e.g. from a Secret) that do not decode.
    #[error("cannot decode the private key: {reason} (expected an unencrypted OpenSSH or PEM private key)")]
    KeyBytes {
        /// What went wrong.
        reason: String,
    },
    /// A public key line that does not parse.
    #[error("invalid public key `{key}…`: {reason} (expected an OpenSSH line like `ssh-ed25519 AAAA…`)")]
    PublicKey {
        /// The start of the key text.
        key: String,
        /// What went wrong.
        reason: String,
    },
    /// The node cannot be reached (no route, timeout, DNS…).
    #[error("cannot reach node {target}: {reason}")]
    Unreachable {
        /// The node.
        target: NodeTarget,
        /// What happened.
        reason: String,
    },
    /// The node's address answered but nothing listens on the SSH port.
    #[error("node {target} refused the connection: nothing listens on port {} (is sshd running?)", target.port)]
    Refused {
        /// The node.
        target: NodeTarget,
    },
    /// The node's host key is not the expected one.
    #[error(
        "HOST KEY MISMATCH for node {target}: expected {expected}, the node presented {presented}; \
         someone may be impersonating the node, or it was reinstalled (then update the pinned key)"
    )]
    HostKeyMismatch {
        /// The node.
        target: NodeTarget,
        /// The fingerprint expected, and where it came from.
        expected: String,
        /// The fingerprint the node presented.
        presented: String,
    },
    /// The host key could not be checked (unreadable known hosts file…).
    #[error("cannot check the host key of node {target}: {reason}")]
    HostKeyCheck {
        /// The node.
        target: NodeTarget,
        /// What went wrong.
        reason: String,
    },
    /// The node refused our key.
    #[error("node {target} refused authentication with the {key_type} key {fingerprint}: add its public key to the node's authorized_keys for user `{}`", target.user)]
    AuthRefused {
        /// The node.
        target: NodeTarget,
        /// The key's algorithm (`ssh-ed25519`, `rsa-sha2-512`…).
        key_type: String,
        /// The key's fingerprint.
        fingerprint: String,
    },
    /// The SSH handshake failed.
    #[error("SSH handshake with node {target} failed: {reason}")]
    Handshake {
        /// The node.
        target: NodeTarget,
        /// What happened.
        reason: String,
    },
    /// The connection dropped while in use.
    #[error("lost the connection to node {target}: {reason}")]
    ConnectionLost {
        /// The node.
        target: NodeTarget,
        /// What happened.
        reason: String,
    },
    /// A command on the node failed.
    #[error("on node {target}: {reason}")]
    Remote {
        /// The node.
        target: NodeTarget,
        /// What happened.
        reason: String,
    },
    /// A command on the node did not finish within the command timeout (the node hangs).
    #[error(
        "node {target} did not finish `{command}` within {seconds} s: the command was abandoned (a hung \
         node: a stuck file system, device or process?; the bound is --node-command-timeout of the operator, \
         --command-timeout of `walt-operator save`)"
    )]
    CommandTimedOut {
        /// The node.
        target: NodeTarget,
        /// The command (its first line).
        command: String,
        /// The timeout, in seconds.
        seconds: f32,
    },
    /// A command on the node sent more output than allowed (the node floods).
    #[error(
        "node {target} sent more than {limit} bytes of output for `{command}`: the command was stopped and its \
         output dropped (a flooding node?; the bound is the operator's --node-output-limit)"
    )]
    OutputTooLarge {
        /// The node.
        target: NodeTarget,
        /// The command (its first line).
        command: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The node sent something unsafe or malformed in its change set.
    #[error("refused the change set from node {target}: {reason}")]
    UnsafeEntry {
        /// The node.
        target: NodeTarget,
        /// Which entry and why.
        reason: String,
    },
    /// A local I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The gateway could not start or run.
    #[error("SSH gateway: {0}")]
    Gateway(String),
}
