//! Where walt runs a tenant's pods: the tenant's **runtime namespace**.
//!
//! The pods that need mount rights (image shells, virtual nodes) run privileged or with
//! `CAP_SYS_ADMIN`; Pod Security `baseline` refuses both. So they never run in the tenant's
//! namespace (which stays at `baseline` or `restricted`), but in a namespace the operator owns, one
//! per tenant, where the tenant may attach to its own sessions and create nothing. The operator and
//! `kubectl walt` both find it here, with the labels that mark it.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

/// Prefix of every runtime namespace.
pub const RUNTIME_NAMESPACE_PREFIX: &str = "walt-run-";
/// Label of a runtime namespace (and of what walt puts in it): the tenant namespace it serves.
pub const TENANT_LABEL: &str = "walt.dev/tenant";
/// Label of an object walt made in a runtime namespace: the kind of the object it belongs to
/// (`ShellSession`, `Node`). Owner references cannot cross namespaces; these labels say the same.
pub const OWNER_KIND_LABEL: &str = "walt.dev/owner-kind";
/// Label: the namespace of the object it belongs to (the tenant namespace).
pub const OWNER_NAMESPACE_LABEL: &str = "walt.dev/owner-namespace";
/// Label: the name of the object it belongs to.
pub const OWNER_NAME_LABEL: &str = "walt.dev/owner-name";
/// Label: the uid of the object it belongs to; only a live object of that very uid owns it.
pub const OWNER_UID_LABEL: &str = "walt.dev/owner-uid";

/// Longest Kubernetes namespace name (an RFC 1123 label).
pub const MAX_NAMESPACE_LEN: usize = 63;
/// Hex digits of the hash that ends a shortened runtime namespace name.
const HASH_LEN: usize = 10;

/// The runtime namespace of tenant namespace `tenant` (pure): `walt-run-<tenant>`; when that is
/// longer than 63 characters, the prefix, the tenant's first characters, `-` and the first 10 hex
/// digits of the SHA-256 of the whole tenant name (two tenants then share a runtime namespace only
/// if they share those characters and 40 bits of hash).
pub fn runtime_namespace(tenant: &str) -> String {
    prefixed_within(RUNTIME_NAMESPACE_PREFIX, tenant, MAX_NAMESPACE_LEN)
}

/// `<prefix><name>` when it fits in `max` characters; else the prefix, the name's first
/// characters, `-` and the first 10 hex digits of the SHA-256 of the whole name, `max` long (pure:
/// two names then share the result only if they share those characters and 40 bits of hash).
pub(crate) fn prefixed_within(prefix: &str, name: &str, max: usize) -> String {
    let whole = format!("{prefix}{name}");
    if whole.len() <= max {
        return whole;
    }
    let hash = Sha256::digest(name.as_bytes());
    let hex = hash
        .iter()
        .take(HASH_LEN / 2)
        .fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        });
    let keep = max.saturating_sub(prefix.len() + 1 + HASH_LEN);
    // Object names are ASCII: byte and character counts agree. A cut ending on `.` would start a
    // DNS label with `-`: the dots are dropped (namespace names have none, so theirs never change).
    let head: String = name.chars().take(keep).collect();
    format!("{prefix}{}-{hex}", head.trim_end_matches('.'))
}

/// Whether `namespace` is named like a runtime namespace (pure). walt serves no tenant there: a
/// runtime namespace is never a tenant's.
pub fn is_runtime_namespace_name(namespace: &str) -> bool {
    namespace.starts_with(RUNTIME_NAMESPACE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_tenant_runs_in_walt_run_its_name() {
        assert_eq!(runtime_namespace("alice"), "walt-run-alice");
        assert!(is_runtime_namespace_name(&runtime_namespace("alice")));
        assert!(!is_runtime_namespace_name("alice"));
    }

    #[test]
    fn names_up_to_63_characters_are_kept_whole_and_longer_ones_shortened_stably() {
        let fits = "a".repeat(MAX_NAMESPACE_LEN - RUNTIME_NAMESPACE_PREFIX.len());
        assert_eq!(runtime_namespace(&fits), format!("walt-run-{fits}"));
        assert_eq!(runtime_namespace(&fits).len(), 63);
        let over = format!("{fits}b");
        let short = runtime_namespace(&over);
        assert_eq!(short.len(), 63, "{short}");
        assert_eq!(short, runtime_namespace(&over), "stable");
        assert!(short.starts_with("walt-run-aaaa"), "{short}");
        let longest = "x".repeat(63);
        assert_eq!(runtime_namespace(&longest).len(), 63);
        for name in [&over, &longest] {
            let namespace = runtime_namespace(name);
            assert!(
                namespace
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && namespace
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_ascii_alphanumeric()),
                "{namespace} is not an RFC 1123 label"
            );
        }
    }

    #[test]
    fn a_long_device_name_gives_a_secret_name_that_is_a_dns_subdomain() {
        assert_eq!(crate::host_key_secret_name("pc-01"), "walt-hostkey-pc-01");
        let long = format!("{}.{}", "a".repeat(228), "b".repeat(30));
        let name = crate::host_key_secret_name(&long);
        assert_eq!(name.len(), 253 - 1, "{name}: the cut's dot dropped");
        assert!(!name.contains(".-"), "{name}");
        assert_eq!(name, crate::host_key_secret_name(&long), "stable");
    }

    #[test]
    fn tenants_that_differ_only_past_the_cut_get_different_namespaces() {
        let stem = "team-".repeat(12);
        let names: BTreeSet<String> = (0..2000)
            .map(|i| runtime_namespace(&format!("{stem}{i}")))
            .collect();
        assert_eq!(names.len(), 2000, "two tenants share a runtime namespace");
        let short: BTreeSet<String> = ["a", "b", "alice", "alice-1", "alice1"]
            .map(runtime_namespace)
            .into_iter()
            .collect();
        assert_eq!(short.len(), 5);
    }
}
