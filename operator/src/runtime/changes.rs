//! What a session changed: a summary computed from the overlay upper dir.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Counts of what changed in an image, as shown to the user and reported in
/// the result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeSummary {
    /// Paths that did not exist in the image.
    pub added: u64,
    /// Paths that existed and were changed (content, metadata, or replaced).
    pub modified: u64,
    /// Paths deleted (a deleted directory counts once).
    pub deleted: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
}

impl ChangeSummary {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added == 0 && self.modified == 0 && self.deleted == 0
    }
}

impl std::fmt::Display for ChangeSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} added, {} modified, {} deleted, {} written",
            self.added,
            self.modified,
            self.deleted,
            human_bytes(self.bytes)
        )
    }
}

/// `1234567` → `1.2 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Summarizes the changes recorded in `upper` over `lowers` (top first).
/// `user_xattr` tells which opaque-directory attribute the overlay used.
pub fn summarize(upper: &Path, lowers: &[PathBuf], user_xattr: bool) -> std::io::Result<ChangeSummary> {
    let mut summary = ChangeSummary::default();
    let opaque_attr = if user_xattr {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    };
    walk(upper, Path::new(""), lowers, opaque_attr, &mut summary)?;
    Ok(summary)
}

fn in_lowers(lowers: &[PathBuf], relative: &Path) -> bool {
    lowers
        .iter()
        .any(|lower| fs::symlink_metadata(lower.join(relative)).is_ok())
}

fn walk(
    upper: &Path,
    relative: &Path,
    lowers: &[PathBuf],
    opaque_attr: &str,
    summary: &mut ChangeSummary,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(upper.join(relative))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let path = relative.join(entry.file_name());
        let meta = entry.metadata()?;
        let kind = meta.file_type();
        let existed = in_lowers(lowers, &path);
        if kind.is_char_device() && meta.rdev() == 0 {
            // A whiteout: the lower path is deleted.
            summary.deleted += 1;
        } else if kind.is_dir() {
            let opaque = xattr_is_set(&entry.path(), opaque_attr);
            if !existed {
                summary.added += 1;
            } else if opaque {
                // Deleted, then made again: its lower content is gone.
                summary.modified += 1;
            }
            if opaque && existed {
                walk(upper, &path, &[], opaque_attr, summary)?;
            } else {
                walk(upper, &path, lowers, opaque_attr, summary)?;
            }
        } else {
            if existed {
                summary.modified += 1;
            } else {
                summary.added += 1;
            }
            if kind.is_file() {
                summary.bytes += meta.len();
            }
        }
    }
    Ok(())
}

fn xattr_is_set(path: &Path, name: &str) -> bool {
    read_xattr(path, name).is_some_and(|value| value == b"y")
}

fn read_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buffer = [0u8; 16];
    let size = rustix_getxattr(path, name, &mut buffer)?;
    Some(buffer[..size].to_vec())
}

fn rustix_getxattr(path: &Path, name: &str, buffer: &mut [u8]) -> Option<usize> {
    super::sys::lgetxattr(path, name, buffer)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_added_modified_deleted() {
        let lower = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        fs::create_dir(lower.path().join("etc")).unwrap();
        fs::write(lower.path().join("etc/a"), "a").unwrap();
        fs::create_dir(upper.path().join("etc")).unwrap();
        fs::write(upper.path().join("etc/a"), "changed").unwrap();
        fs::write(upper.path().join("new"), "12345").unwrap();
        let summary = summarize(upper.path(), &[lower.path().to_path_buf()], false).unwrap();
        assert_eq!(
            summary,
            ChangeSummary {
                added: 1,
                modified: 1,
                deleted: 0,
                bytes: 12
            }
        );
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
