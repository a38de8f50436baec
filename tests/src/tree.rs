//! Snapshot a directory tree and compare two: content, type, mode, owner, xattrs, symlink targets,
//! device numbers and hard-link groups (mtimes are ignored).
//!
//! ```no_run
//! use walt_tests::tree::{Snapshot, SnapshotOptions};
//! let expected = Snapshot::take(std::path::Path::new("/tmp/a"), &SnapshotOptions::default()).unwrap();
//! let actual = Snapshot::take(std::path::Path::new("/tmp/b"), &SnapshotOptions::default()).unwrap();
//! expected.assert_same(&actual); // panics with a readable list of differences
//! ```

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::FixtureError;

/// What one path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file: its size and sha256.
    File {
        /// Size in bytes.
        size: u64,
        /// Hex sha256 of the content.
        sha256: String,
    },
    /// A directory.
    Dir,
    /// A symbolic link and its target.
    Symlink(PathBuf),
    /// A character device (major, minor); an overlay whiteout is `Char(0, 0)`.
    Char(u64, u64),
    /// A block device (major, minor).
    Block(u64, u64),
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

/// One path's recorded metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Type and content.
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`; not compared for symlinks).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Extended attributes (name → value), minus those filtered by [`SnapshotOptions::ignore_xattr_prefixes`].
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// What [`Snapshot::take`] ignores.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Xattr name prefixes left out (default: `security.` — SELinux/capabilities noise is not ours;
    /// set to empty to compare everything).
    pub ignore_xattr_prefixes: Vec<String>,
    /// Relative paths (and everything under them) left out.
    pub ignore_paths: Vec<PathBuf>,
    /// Whether the root directory's own metadata is compared (default false: unpackers differ on it).
    pub include_root: bool,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            ignore_xattr_prefixes: vec!["security.".to_owned()],
            ignore_paths: Vec::new(),
            include_root: false,
        }
    }
}

/// A recorded tree: relative path → [`Entry`], plus the hard-link groups (paths sharing one inode, for
/// regular files only: overlay whiteouts share an inode too but are not links).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every path, relative to the root (`""` is the root itself when included).
    pub entries: BTreeMap<PathBuf, Entry>,
    /// Sets of paths that are hard links of one another (each sorted; groups sorted).
    pub hard_link_groups: Vec<Vec<PathBuf>>,
}

impl Snapshot {
    /// Walks `root` (not following symlinks) and records everything.
    pub fn take(root: &Path, options: &SnapshotOptions) -> Result<Snapshot, FixtureError> {
        let mut entries = BTreeMap::new();
        let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
        walk(root, Path::new(""), options, &mut entries, &mut inodes)?;
        let mut hard_link_groups: Vec<Vec<PathBuf>> = inodes
            .into_values()
            .filter(|paths| paths.len() > 1)
            .map(|mut p| {
                p.sort();
                p
            })
            .collect();
        hard_link_groups.sort();
        Ok(Snapshot {
            entries,
            hard_link_groups,
        })
    }

    /// The differences from `self` (expected) to `other` (actual), one readable line each; empty if same.
    pub fn diff(&self, other: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        for (path, expected) in &self.entries {
            match other.entries.get(path) {
                None => out.push(format!("missing: /{} ({:?})", path.display(), expected.kind)),
                Some(actual) if actual != expected => {
                    out.push(format!(
                        "differs: /{}\n    expected {expected:?}\n    actual   {actual:?}",
                        path.display()
                    ));
                }
                Some(_) => {}
            }
        }
        for (path, actual) in &other.entries {
            if !self.entries.contains_key(path) {
                out.push(format!("unexpected: /{} ({:?})", path.display(), actual.kind));
            }
        }
        if self.hard_link_groups != other.hard_link_groups {
            out.push(format!(
                "hard links differ:\n    expected {:?}\n    actual   {:?}",
                self.hard_link_groups, other.hard_link_groups
            ));
        }
        out
    }

    /// Panics with every difference if `other` is not the same tree.
    pub fn assert_same(&self, other: &Snapshot) {
        let diff = self.diff(other);
        assert!(
            diff.is_empty(),
            "trees differ ({} differences):\n{}",
            diff.len(),
            diff.join("\n")
        );
    }

    /// The entry at a relative path, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(Path::new(path.trim_start_matches('/')))
    }
}

/// Takes snapshots of two trees with the same options and panics with the differences if they differ.
pub fn assert_same_tree(expected: &Path, actual: &Path, options: &SnapshotOptions) {
    let a = Snapshot::take(expected, options)
        .unwrap_or_else(|e| panic!("snapshot of {}: {e}", expected.display()));
    let b =
        Snapshot::take(actual, options).unwrap_or_else(|e| panic!("snapshot of {}: {e}", actual.display()));
    let diff = a.diff(&b);
    assert!(
        diff.is_empty(),
        "{} and {} differ ({} differences):\n{}",
        expected.display(),
        actual.display(),
        diff.len(),
        diff.join("\n")
    );
}

fn walk(
    root: &Path,
    relative: &Path,
    options: &SnapshotOptions,
    entries: &mut BTreeMap<PathBuf, Entry>,
    inodes: &mut BTreeMap<(u64, u64), Vec<PathBuf>>,
) -> Result<(), FixtureError> {
    if options
        .ignore_paths
        .iter()
        .any(|p| relative.starts_with(p) && !p.as_os_str().is_empty())
    {
        return Ok(());
    }
    let full = root.join(relative);
    let meta = std::fs::symlink_metadata(&full)
        .map_err(|e| FixtureError::io(&format!("lstat {}", full.display()), e))?;
    let file_type = meta.file_type();
    let kind = if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_symlink() {
        Kind::Symlink(
            std::fs::read_link(&full)
                .map_err(|e| FixtureError::io(&format!("readlink {}", full.display()), e))?,
        )
    } else if file_type.is_file() {
        let (size, sha256) = hash_file(&full)?;
        if meta.nlink() > 1 {
            inodes
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(relative.to_path_buf());
        }
        Kind::File { size, sha256 }
    } else if file_type.is_char_device() {
        Kind::Char(major(meta.rdev()), minor(meta.rdev()))
    } else if file_type.is_block_device() {
        Kind::Block(major(meta.rdev()), minor(meta.rdev()))
    } else if file_type.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    let mut xattrs = BTreeMap::new();
    if !file_type.is_symlink() {
        let names =
            xattr::list(&full).map_err(|e| FixtureError::io(&format!("listxattr {}", full.display()), e))?;
        for name in names {
            let name = name.to_string_lossy().into_owned();
            if options
                .ignore_xattr_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()))
            {
                continue;
            }
            let value = xattr::get(&full, &name)
                .map_err(|e| FixtureError::io(&format!("getxattr {name} {}", full.display()), e))?
                .unwrap_or_default();
            xattrs.insert(name, value);
        }
    }
    let is_root = relative.as_os_str().is_empty();
    if !is_root || options.include_root {
        let mode = if file_type.is_symlink() {
            0
        } else {
            meta.mode() & 0o7777
        };
        entries.insert(
            relative.to_path_buf(),
            Entry {
                kind: kind.clone(),
                mode,
                uid: meta.uid(),
                gid: meta.gid(),
                xattrs,
            },
        );
    }
    if kind == Kind::Dir {
        let mut children: Vec<_> = std::fs::read_dir(&full)
            .map_err(|e| FixtureError::io(&format!("listing {}", full.display()), e))?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        children.sort();
        for child in children {
            walk(root, &relative.join(child), options, entries, inodes)?;
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<(u64, String), FixtureError> {
    let mut file =
        std::fs::File::open(path).map_err(|e| FixtureError::io(&format!("opening {}", path.display()), e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| FixtureError::io(&format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

fn major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0fff)
}

fn minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)
}
