//! Registry paths are per tenant (issue 15): the Images of namespace `ns` live under
//! `<lab registry host>/<prefix>/<ns>/…`. A tenant writes only there; in the lab registry it reads
//! only there and in the shared catalog (`<prefix>/<catalog namespace>/…`, read-only to tenants).
//! References outside the lab registry may be read (cloned from, resolved) but never written.
//!
//! Pure decisions: every controller asks [`LabPaths::check`] before it hands a reference to the
//! registry client, and reports a [`Refusal`] as a condition and a Warning Event on the object. The
//! chart's admission policy `…-registry-paths` makes the same decision in CEL.

use std::fmt;

/// Reason of a refused registry path (conditions, Events, the plugin).
pub const REGISTRY_PATH_FORBIDDEN: &str = walt_crds::image::reasons::REGISTRY_PATH_FORBIDDEN;

/// What the operator is about to do with a reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Resolve, pull, shell from, clone from, boot.
    Read,
    /// Push, tag, squash, overwrite, clone into.
    Write,
}

/// Why a reference is refused: the condition's message, which says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The whole message (names the reference, the namespace, its own path and what to do).
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The lab registry's layout: its host, the prefix of lab images and the catalog namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabPaths {
    host: String,
    prefix: String,
    catalog_namespace: String,
}

/// Where a reference points, once parsed (pure).
#[derive(Debug, PartialEq, Eq)]
struct Located<'a> {
    /// Registry host (and port), as written.
    host: &'a str,
    /// Repository path under the host.
    path: &'a str,
}

/// Splits `host/path[:tag][@digest]` like container tools do: the first component is a host when
/// it has a `.` or a `:` or is `localhost`; otherwise the reference is Docker Hub's (pure).
fn locate(reference: &str) -> Located<'_> {
    let repository = super::registry::repository_of(reference.trim());
    match repository.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => Located {
            host: first,
            path: rest,
        },
        _ => Located {
            host: "docker.io",
            path: repository,
        },
    }
}

/// Whether every component of a repository path is a valid Distribution path component
/// (`[a-z0-9]+` joined by `.`, `_`, `__` or dashes): no `..`, no empty component, no uppercase.
fn valid_path(path: &str) -> bool {
    static COMPONENT: std::sync::LazyLock<Option<regex::Regex>> =
        std::sync::LazyLock::new(|| regex::Regex::new(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$").ok());
    let Some(component) = COMPONENT.as_ref() else {
        return false;
    };
    !path.is_empty() && path.split('/').all(|part| component.is_match(part))
}

impl LabPaths {
    /// The layout of `lab_registry` (`HOST[:PORT]`) with `prefix` (may be empty) and the catalog
    /// namespace.
    pub fn new(host: &str, prefix: &str, catalog_namespace: &str) -> Self {
        Self {
            host: host.trim().to_ascii_lowercase(),
            prefix: prefix.trim_matches('/').to_owned(),
            catalog_namespace: catalog_namespace.to_owned(),
        }
    }

    /// The repository path prefix of `namespace` under the host: `<prefix>/<namespace>/`.
    fn path_of(&self, namespace: &str) -> String {
        if self.prefix.is_empty() {
            format!("{namespace}/")
        } else {
            format!("{}/{namespace}/", self.prefix)
        }
    }

    /// `<host>/<prefix>/<namespace>/`: where the Images of `namespace` live (for messages).
    pub fn tenant_root(&self, namespace: &str) -> String {
        format!("{}/{}", self.host, self.path_of(namespace))
    }

    /// The repository scope of `namespace` for registry tokens: `<prefix>/<namespace>/`.
    pub fn tenant_path(&self, namespace: &str) -> String {
        self.path_of(namespace)
    }

    /// The catalog's repository path prefix: `<prefix>/<catalog namespace>/`.
    pub fn catalog_path(&self) -> String {
        self.path_of(&self.catalog_namespace)
    }

    /// The lab registry's host (lowercase).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether `reference` may be used for `access` by (an object of) `namespace`; `what` names the
    /// field in the refusal (`spec.reference`, `spec.saveAs`…).
    pub fn check(&self, namespace: &str, reference: &str, access: Access, what: &str) -> Result<(), Refusal> {
        let located = locate(reference);
        let in_lab = located.host.eq_ignore_ascii_case(&self.host);
        let own = self.path_of(namespace);
        let own_root = self.tenant_root(namespace);
        let refuse = |why: String| {
            Err(Refusal {
                message: format!("{what} {}: {why}", reference.trim()),
            })
        };
        if !in_lab {
            return match access {
                Access::Read => Ok(()),
                Access::Write => refuse(format!(
                    "walt writes only into the lab registry, under {own_root} (the images of namespace {namespace}); leave spec.reference empty for the default {own_root}NAME:TAG, or clone it first (`kubectl walt image clone {} NAME`)",
                    reference.trim()
                )),
            };
        }
        if !valid_path(located.path) {
            return refuse(format!(
                "`{}` is not a valid repository path (lowercase letters, digits and . _ - between them, no empty or `..` component); images of namespace {namespace} live under {own_root}",
                located.path
            ));
        }
        if located.path.starts_with(&own) {
            return Ok(());
        }
        let catalog = self.catalog_path();
        if located.path.starts_with(&catalog) {
            return match access {
                Access::Read => Ok(()),
                Access::Write => refuse(format!(
                    "{}{catalog} is the lab's shared catalog, read-only to tenants: write under {own_root} instead (clone a catalog image with `kubectl walt image clone {} NAME`)",
                    self.host_slash(),
                    reference.trim()
                )),
            };
        }
        let verb = match access {
            Access::Read => "reads",
            Access::Write => "writes",
        };
        refuse(format!(
            "outside the registry path of namespace {namespace}: in the lab registry a namespace {verb} only its own images under {own_root}{} (another tenant's images are theirs); use a reference under {own_root}, or leave spec.reference empty for the default {own_root}NAME:TAG",
            match access {
                Access::Read => format!(" and the catalog {}{catalog}", self.host_slash()),
                Access::Write => String::new(),
            }
        ))
    }

    fn host_slash(&self) -> String {
        format!("{}/", self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> LabPaths {
        LabPaths::new("reg.lab:5000", "walt", "walt-catalog")
    }

    #[test]
    fn references_are_located_like_container_tools_do() {
        assert_eq!(
            locate("reg.lab:5000/walt/alice/x:1"),
            Located {
                host: "reg.lab:5000",
                path: "walt/alice/x"
            }
        );
        assert_eq!(
            locate("localhost/a@sha256:00"),
            Located {
                host: "localhost",
                path: "a"
            }
        );
        assert_eq!(
            locate("debian:12"),
            Located {
                host: "docker.io",
                path: "debian"
            }
        );
        assert_eq!(
            locate("library/debian"),
            Located {
                host: "docker.io",
                path: "library/debian"
            }
        );
    }

    #[test]
    fn a_tenant_reads_and_writes_its_own_path() {
        let lab = lab();
        for access in [Access::Read, Access::Write] {
            lab.check(
                "alice",
                "reg.lab:5000/walt/alice/debian:latest",
                access,
                "spec.reference",
            )
            .expect("own path");
            lab.check(
                "alice",
                "REG.LAB:5000/walt/alice/a/b@sha256:1",
                access,
                "spec.reference",
            )
            .expect("own path, host in capitals");
        }
    }

    #[test]
    fn another_tenants_path_is_refused_for_reading_and_writing() {
        let lab = lab();
        for access in [Access::Read, Access::Write] {
            let refusal = lab
                .check(
                    "alice",
                    "reg.lab:5000/walt/bob/debian:latest",
                    access,
                    "spec.reference",
                )
                .unwrap_err();
            assert!(
                refusal
                    .message
                    .contains("outside the registry path of namespace alice"),
                "{refusal}"
            );
            assert!(refusal.message.contains("reg.lab:5000/walt/alice/"), "{refusal}");
        }
        // Prefix tricks: a namespace whose name starts like alice's, outside the prefix, traversal.
        for reference in [
            "reg.lab:5000/walt/alice-2/x",
            "reg.lab:5000/walt/alicex",
            "reg.lab:5000/alice/x",
            "reg.lab:5000/walt/alice",
            "reg.lab:5000/other/walt/alice/x",
            "reg.lab:5000/walt/alice/../bob/x",
            "reg.lab:5000/walt//alice/x",
            "reg.lab:5000/walt/Alice/x",
        ] {
            for access in [Access::Read, Access::Write] {
                lab.check("alice", reference, access, "spec.reference")
                    .expect_err(reference);
            }
        }
    }

    #[test]
    fn the_catalog_is_read_only_to_tenants_and_writable_by_its_own_namespace() {
        let lab = lab();
        let reference = "reg.lab:5000/walt/walt-catalog/debian:12";
        lab.check("alice", reference, Access::Read, "spec.source")
            .expect("read the catalog");
        let refusal = lab
            .check("alice", reference, Access::Write, "spec.reference")
            .unwrap_err();
        assert!(refusal.message.contains("shared catalog, read-only"), "{refusal}");
        lab.check("walt-catalog", reference, Access::Write, "spec.reference")
            .expect("the catalog namespace writes its own path");
    }

    #[test]
    fn outside_the_lab_registry_is_readable_never_writable() {
        let lab = lab();
        for reference in ["docker.io/library/debian:12", "debian", "ghcr.io/x/y@sha256:1"] {
            lab.check("alice", reference, Access::Read, "spec.source")
                .expect(reference);
            let refusal = lab
                .check("alice", reference, Access::Write, "spec.saveAs")
                .unwrap_err();
            assert!(
                refusal.message.contains("walt writes only into the lab registry"),
                "{refusal}"
            );
        }
    }

    #[test]
    fn without_a_prefix_the_namespace_is_the_first_component() {
        let lab = LabPaths::new("127.0.0.1:5000", "", "cat");
        lab.check("alice", "127.0.0.1:5000/alice/x", Access::Write, "r")
            .expect("own");
        lab.check("alice", "127.0.0.1:5000/bob/x", Access::Read, "r")
            .expect_err("bob");
        lab.check("alice", "127.0.0.1:5000/cat/x", Access::Read, "r")
            .expect("catalog");
        assert_eq!(lab.tenant_path("alice"), "alice/");
    }
}
