//! Overlay upper dir ↔ OCI layer: whiteouts, opaque directories, exclusions.
//!
//! - [`write_layer_from_dir`]: an overlay upper dir on disk → an OCI layer tar (uncompressed) written to any
//!   `Write`, plus a [`ChangeSummary`].
//! - [`write_layer_from_tar`]: a tar stream of an upper dir (what a node sends over SSH: busybox tar or GNU
//!   tar with `--xattrs`; whiteouts appear as char 0:0 entries) → the same OCI layer tar.
//! - [`unpack_layer`]: an OCI layer tar → a directory in overlay form (whiteouts back to char 0:0, opaque
//!   directories as `trusted.overlay.opaque=y` or `user.overlay.opaque=y`), refusing unsafe entries.
//! - [`HeaderLimit`]: bounds the memory a tar stream's long-name and PAX headers may take (both readers
//!   above use it, and so do every other reader of layers and node change sets: squash, copy, export).
//!
//! Layer conventions (OCI image spec): a deletion is an empty file `.wh.<name>`; a directory whose lower
//! content is hidden holds `.wh..wh..opq`. Entries are PAX tar (long and non-ASCII names, xattrs as
//! `SCHILY.xattr.*`), hard links are real tar links (never for whiteouts, which share one inode in an
//! overlay upper dir), overlay's own xattrs (`trusted.overlay.*`, `user.overlay.*`) are never copied.

mod limit;
mod read;
mod write;

pub use limit::{EntryPax, HeaderLimit, MAX_EXTENSION_SIZE, pax_records};
pub use read::{UnpackOptions, apply_layer, unpack_layer};
pub use write::{ChangeFilter, ChangeSummary, LayerOptions, write_layer_from_dir, write_layer_from_tar};

use std::path::PathBuf;

/// WalT's default exclusions (regular expressions matched against `/`-rooted paths, directories with a
/// trailing `/`): boot-time noise that a node save does not keep.
pub const DEFAULT_EXCLUSIONS: &[&str] = &[
    "/log/",
    r"\.lock$",
    "machine-id",
    "walt-env",
    "_walt_internal_",
    "README.nonlocal",
];

/// Prefix of a whiteout entry in an OCI layer.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the opaque-directory marker entry in an OCI layer.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Which xattr marks an opaque directory in overlay form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpaqueXattr {
    /// `trusted.overlay.opaque` (a mount by real root; the default).
    #[default]
    Trusted,
    /// `user.overlay.opaque` (a mount with the `userxattr` option, inside a user namespace).
    User,
}

impl OpaqueXattr {
    /// The xattr name.
    pub fn name(self) -> &'static str {
        match self {
            OpaqueXattr::Trusted => "trusted.overlay.opaque",
            OpaqueXattr::User => "user.overlay.opaque",
        }
    }
}

/// Whether an xattr belongs to overlayfs itself (never copied into a layer, never set from one).
pub fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// Errors of the overlay ↔ layer conversions; every one names the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a path.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`reading`, `creating`, …).
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tar stream could not be read or written.
    #[error("tar stream: {context}: {source}")]
    Tar {
        /// Where in the stream (entry path, or what was being done).
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An entry that would write outside the target, or through a link: refused.
    #[error(
        "refusing unsafe layer entry {path:?}: {reason} (the layer or tar stream is malformed or malicious)"
    )]
    UnsafeEntry {
        /// The entry's path as found in the archive.
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// A bad exclusion pattern.
    #[error("invalid exclusion pattern {pattern:?}: {source}")]
    BadPattern {
        /// The pattern given.
        pattern: String,
        /// What is wrong with it.
        #[source]
        source: regex::Error,
    },
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Checks that a path from an archive is relative and has no `..`; returns it without `./` and trailing
/// `/` (`""` for the root itself).
pub fn sanitize_entry_path(raw: &[u8]) -> Result<Vec<u8>, Error> {
    let text = String::from_utf8_lossy(raw);
    if raw.starts_with(b"/") {
        return Err(Error::UnsafeEntry {
            path: text.into_owned(),
            reason: "absolute path".into(),
        });
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(Error::UnsafeEntry {
                    path: text.into_owned(),
                    reason: "path contains `..`".into(),
                });
            }
            _ => parts.push(part),
        }
    }
    Ok(parts.join(&b'/'))
}
