//! The per-node top layer: what a WalT image expects its server to add when a node boots it, served
//! over NFS above the image (never written into it; see [`super::view::ImageView::with_top_layer`]).
//!
//! WalT's contract (re-implemented here, our own scripts): `/bin/walt-env` (the server's address,
//! its service ports, the booted image), `/bin/walt-init` (the node's first process: RAM overlay,
//! clock, boot notification, then `/sbin/init`) and its helpers in `/bin/_walt_internal_/`, root's
//! `authorized_keys` with the lab's key, the device's SSH host key. Ours adds
//! `/etc/walt/image-digest`, the digest the node booted, which the boot notification reports.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::state::Mac;
use super::view::TopEntry;

/// WalT's node API port (`walt-rpc`: `sync_clock`).
pub const RPC_PORT: u16 = 12345;
/// WalT's stream port (boot notification: `REQ_NOTIFY_BOOTUP_STATUS`).
pub const NOTIFY_PORT: u16 = 12347;

/// Where a booted node finds its persistent directory (WalT's `/persist`).
pub const PERSIST_MOUNT_POINT: &str = "/persist";

/// Where a booted node finds the digest of the image it booted.
pub const IMAGE_DIGEST_FILE: &str = "/etc/walt/image-digest";

const WALT_INIT: &str = include_str!("scripts/walt-init");
const WALT_RPC: &str = include_str!("scripts/walt-rpc");
const WALT_CLOCK_SYNC: &str = include_str!("scripts/walt-clock-sync");
const WALT_NOTIFY_BOOTUP: &str = include_str!("scripts/walt-notify-bootup");

/// A device's SSH host key: the OpenSSH private key file and its public key line.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    /// The private key (OpenSSH format).
    pub private: String,
    /// The public key line (`ssh-ed25519 AAAA… comment`).
    pub public: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// A host key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host key: {0}")]
pub struct BadHostKey(pub String);

impl HostKey {
    /// The name sshd looks for it under (`/etc/ssh/ssh_host_<type>_key`), from its public key's type.
    pub fn file_name(&self) -> Result<&'static str, BadHostKey> {
        let kind = self.public.split_whitespace().next().unwrap_or_default();
        Ok(match kind {
            "ssh-ed25519" => "ssh_host_ed25519_key",
            "ssh-rsa" => "ssh_host_rsa_key",
            k if k.starts_with("ecdsa-sha2-") => "ssh_host_ecdsa_key",
            _ => {
                return Err(BadHostKey(format!(
                    "{kind:?} is not an ssh-ed25519, ecdsa-sha2-* or ssh-rsa public key"
                )));
            }
        })
    }
}

/// Who a node is and what it boots: the inputs of its top layer.
#[derive(Debug, Clone)]
pub struct NodeFacts<'a> {
    /// The boot service's address on the lab network.
    pub server: Ipv4Addr,
    /// The node's host name.
    pub hostname: &'a str,
    /// The node's boot interface.
    pub mac: Mac,
    /// The node's model.
    pub model: &'a str,
    /// The digest of the image it boots.
    pub digest: &'a str,
    /// Root's `authorized_keys` (the lab's node key); `None`: the image's own.
    pub authorized_keys: Option<&'a str>,
    /// The device's host key; `None`: the image's own.
    pub host_key: Option<&'a HostKey>,
}

/// `'…'`-quotes a value for `sh`.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// `/bin/walt-env`: sourced by walt's node scripts (and by users' scripts, as on WalT).
pub fn walt_env(facts: &NodeFacts<'_>) -> String {
    let mut env = String::from(
        "#!/bin/sh\n# What walt's boot service told this node (sourced by walt's node scripts).\n",
    );
    for (name, value) in [
        ("walt_server_ip", facts.server.to_string()),
        ("walt_server_rpc_port", RPC_PORT.to_string()),
        ("walt_server_logs_port", NOTIFY_PORT.to_string()),
        ("walt_server_notify_bootup_port", NOTIFY_PORT.to_string()),
        ("walt_image_id", facts.digest.to_string()),
        ("walt_node_name", facts.hostname.to_string()),
        ("walt_node_mac", facts.mac.to_string()),
        ("walt_node_model", facts.model.to_string()),
    ] {
        let _ = writeln!(env, "export {name}={}", quote(&value));
    }
    env
}

fn file(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> TopEntry {
    TopEntry {
        path: path.to_string(),
        mode,
        data: Some(data.into()),
    }
}

fn dir(path: &str, mode: u32) -> TopEntry {
    TopEntry {
        path: path.to_string(),
        mode,
        data: None,
    }
}

/// The entries of a node's top layer (pure; placed in this order).
pub fn entries(facts: &NodeFacts<'_>) -> Result<Vec<TopEntry>, BadHostKey> {
    let mut out = vec![
        dir("/mnt", 0o755),
        // The mount point of the node's persistent directory (walt-init mounts it): in the image's
        // view, so that nothing lands in the node's RAM overlay (a node save keeps no trace of it).
        dir(PERSIST_MOUNT_POINT, 0o755),
        file("/bin/walt-env", 0o755, walt_env(facts)),
        file("/bin/walt-init", 0o755, WALT_INIT),
        dir("/bin/_walt_internal_", 0o755),
        file("/bin/_walt_internal_/walt-rpc", 0o755, WALT_RPC),
        file("/bin/_walt_internal_/walt-clock-sync", 0o755, WALT_CLOCK_SYNC),
        file(
            "/bin/_walt_internal_/walt-notify-bootup",
            0o755,
            WALT_NOTIFY_BOOTUP,
        ),
        file(IMAGE_DIGEST_FILE, 0o644, format!("{}\n", facts.digest)),
    ];
    if let Some(keys) = facts.authorized_keys {
        out.push(dir("/root", 0o700));
        out.push(dir("/root/.ssh", 0o700));
        out.push(file("/root/.ssh/authorized_keys", 0o600, keys));
    }
    if let Some(key) = facts.host_key {
        let name = key.file_name()?;
        out.push(file(&format!("/etc/ssh/{name}"), 0o600, key.private.as_str()));
        out.push(file(
            &format!("/etc/ssh/{name}.pub"),
            0o644,
            format!("{}\n", key.public.trim()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(key: Option<&HostKey>) -> NodeFacts<'_> {
        NodeFacts {
            server: Ipv4Addr::new(10, 0, 0, 1),
            hostname: "vm1",
            mac: Mac([0x52, 0x54, 0, 0, 0, 1]),
            model: "pc-x86-64",
            digest: "sha256:abc",
            authorized_keys: Some("ssh-ed25519 AAAA lab\n"),
            host_key: key,
        }
    }

    #[test]
    fn walt_env_tells_the_server_ports_and_the_image() {
        let env = walt_env(&facts(None));
        for line in [
            "export walt_server_ip='10.0.0.1'",
            "export walt_server_rpc_port='12345'",
            "export walt_server_notify_bootup_port='12347'",
            "export walt_image_id='sha256:abc'",
            "export walt_node_mac='52:54:00:00:00:01'",
        ] {
            assert!(env.contains(line), "{line} in {env}");
        }
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn the_layer_has_walt_scripts_keys_and_the_digest() {
        let key = HostKey {
            private: "-----BEGIN OPENSSH PRIVATE KEY-----\n".into(),
            public: "ssh-ed25519 AAAAC3 vm1".into(),
        };
        let entries = entries(&facts(Some(&key))).expect("entries");
        let find = |path: &str| {
            entries
                .iter()
                .find(|e| e.path == path)
                .unwrap_or_else(|| panic!("{path} in the layer"))
        };
        assert_eq!(find("/root/.ssh").mode, 0o700);
        assert!(find("/persist").data.is_none(), "the mount point of /persist");
        assert_eq!(find("/root/.ssh/authorized_keys").mode, 0o600);
        assert_eq!(find("/etc/ssh/ssh_host_ed25519_key").mode, 0o600);
        assert_eq!(
            find("/etc/ssh/ssh_host_ed25519_key.pub").data.as_deref(),
            Some(&b"ssh-ed25519 AAAAC3 vm1\n"[..])
        );
        assert_eq!(
            find(IMAGE_DIGEST_FILE).data.as_deref(),
            Some(&b"sha256:abc\n"[..])
        );
        assert!(
            find("/bin/walt-init")
                .data
                .as_ref()
                .is_some_and(|d| d.starts_with(b"#!/bin/sh"))
        );
        let bad = HostKey {
            private: String::new(),
            public: "ssh-dss AAAA".into(),
        };
        let error = super::entries(&facts(Some(&bad))).expect_err("dsa is refused");
        assert!(error.to_string().contains("ssh-dss"), "{error}");
    }
}
