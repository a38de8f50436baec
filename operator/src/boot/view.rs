//! The read-only view of an image root that the boot service serves: the image's unpacked OCI layers
//! (overlay form, top first, as the layer cache keeps them) merged in userspace the way overlayfs would
//! stack them (whiteouts hide, opaque directories stop the lower layers), indexed once.
//!
//! Inode numbers (`fileid`s) are assigned in a deterministic walk (breadth first, names sorted), so the
//! same layers give the same numbers in every run: file handles stay valid across restarts of the boot
//! service. Hard links within a layer share one inode.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::overlay::OpaqueXattr;

/// The root directory's inode number.
pub const ROOT_ID: u64 = 1;

/// Most inodes one view may hold (bounds the memory an untrusted image can take).
pub const MAX_INODES: usize = 4_000_000;

/// Symbolic links followed at most while resolving one path (like Linux's `ELOOP` limit).
pub const MAX_SYMLINKS: usize = 40;

/// Errors of building or reading a view.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// A layer directory could not be read.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The image has more entries than a view may hold.
    #[error("the image has more than {MAX_INODES} files: refused (squash or trim it)")]
    TooBig,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ViewError + 'a {
    move |source| ViewError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory: its entries, sorted by name.
    Dir(Vec<(Vec<u8>, u64)>),
    /// A regular file, read from this path of a layer.
    File(PathBuf),
    /// A regular file held in memory (the per-node top layer: keys, `walt-env`, walt's scripts).
    Data(Arc<[u8]>),
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

/// The attributes of an inode (from the layer entry that wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Device number (major, minor) of a device node.
    pub rdev: (u32, u32),
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, u32),
    /// Modification time.
    pub mtime: (i64, u32),
    /// Change time.
    pub ctime: (i64, u32),
}

/// One inode of a view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// What it is.
    pub kind: Kind,
    /// Its attributes.
    pub attr: Attr,
    /// The parent directory (the root is its own parent).
    pub parent: u64,
}

/// An entry of one layer directory, as the merge sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerEntry {
    /// A whiteout (character device 0:0): the name is deleted in this layer.
    Whiteout,
    /// A directory; `opaque` hides the lower layers' content of it.
    Dir {
        /// `overlay.opaque` is set.
        opaque: bool,
    },
    /// Anything else (file, link, device…).
    Other,
}

/// The outcome of merging one name across layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The layer (index in the top-first list) whose entry wins.
    pub layer: usize,
    /// For a directory: the layers whose directories of that name are merged (top first).
    pub dir_layers: Vec<usize>,
}

/// Merges the listings of one directory across layers (top first; `None`: the layer has no such
/// directory). Pure: overlayfs's rules. The first layer naming an entry wins; a whiteout hides it; a
/// directory collects the same-named directories of lower layers until an opaque one, a non-directory
/// or a whiteout.
pub fn merge_names<S: std::hash::BuildHasher>(
    listings: &[HashMap<Vec<u8>, LayerEntry, S>],
) -> Vec<(Vec<u8>, Merged)> {
    let mut names: Vec<&Vec<u8>> = listings.iter().flat_map(HashMap::keys).collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let Some(top) = listings.iter().position(|l| l.contains_key(name)) else {
            continue;
        };
        let mut merged = Merged {
            layer: top,
            dir_layers: Vec::new(),
        };
        match listings[top][name] {
            LayerEntry::Whiteout => continue,
            LayerEntry::Other => {}
            LayerEntry::Dir { .. } => {
                for (index, listing) in listings.iter().enumerate().skip(top) {
                    match listing.get(name) {
                        None => {}
                        Some(LayerEntry::Dir { opaque }) => {
                            merged.dir_layers.push(index);
                            if *opaque {
                                break;
                            }
                        }
                        Some(_) => break,
                    }
                }
            }
        }
        out.push((name.clone(), merged));
    }
    out
}

impl Kind {
    /// Whether this is a regular file (of a layer or in memory).
    pub fn is_file(&self) -> bool {
        matches!(self, Kind::File(_) | Kind::Data(_))
    }
}

/// A merged, indexed, read-only image root; or a node's view of one: the image's view (shared by
/// every node that boots it) under a small top layer of the node's own files, kept as inodes that
/// replace or extend the image's ([`ImageView::with_top_layer`]).
#[derive(Debug)]
pub struct ImageView {
    key: [u8; 8],
    digest: String,
    /// The image's inodes (no base), or the top layer's new inodes, numbered after the base's.
    inodes: Vec<Inode>,
    /// The image's view under a node's top layer.
    base: Option<Arc<ImageView>>,
    /// Inodes of the base replaced by the top layer (its directories that gained entries).
    replaced: HashMap<u64, Inode>,
}

fn attr_of(meta: &std::fs::Metadata) -> Attr {
    let rdev = meta.rdev();
    Attr {
        mode: meta.mode() & 0o7777,
        nlink: meta.nlink().min(u64::from(u32::MAX)) as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        size: meta.size(),
        rdev: (libc::major(rdev), libc::minor(rdev)),
        atime: (meta.atime(), meta.atime_nsec() as u32),
        mtime: (meta.mtime(), meta.mtime_nsec() as u32),
        ctime: (meta.ctime(), meta.ctime_nsec() as u32),
    }
}

fn classify(path: &Path, meta: &std::fs::Metadata, opaque: OpaqueXattr) -> LayerEntry {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if ft.is_char_device() && meta.rdev() == 0 {
        LayerEntry::Whiteout
    } else if ft.is_dir() {
        let opaque = matches!(xattr::get(path, opaque.name()), Ok(Some(v)) if v == b"y");
        LayerEntry::Dir { opaque }
    } else {
        LayerEntry::Other
    }
}

/// One directory to index: its inode, and the layer directories merged into it (top first).
struct Pending {
    id: u64,
    sources: Vec<(usize, PathBuf)>,
}

impl ImageView {
    /// Indexes the image whose unpacked layers are `lower_dirs` (top first, overlay form). `digest`
    /// names the image (it is recorded with what is served).
    pub fn build(lower_dirs: &[PathBuf], digest: &str, opaque: OpaqueXattr) -> Result<Self, ViewError> {
        let mut hasher = Sha256::new();
        for dir in lower_dirs {
            hasher.update(dir.as_os_str().as_bytes());
            hasher.update([0]);
        }
        let hash = hasher.finalize();
        let mut key = [0; 8];
        key.copy_from_slice(&hash[..8]);
        let root_meta = lower_dirs
            .first()
            .map(|d| std::fs::metadata(d).map_err(io("reading", d)))
            .transpose()?;
        let mut view = ImageView {
            key,
            digest: digest.to_string(),
            inodes: vec![Inode {
                kind: Kind::Dir(Vec::new()),
                attr: root_meta.as_ref().map_or(
                    Attr {
                        mode: 0o755,
                        nlink: 2,
                        ..Attr::default()
                    },
                    attr_of,
                ),
                parent: ROOT_ID,
            }],
            base: None,
            replaced: HashMap::new(),
        };
        let mut queue = VecDeque::from([Pending {
            id: ROOT_ID,
            sources: lower_dirs.iter().cloned().enumerate().collect(),
        }]);
        let mut links: HashMap<(usize, u64, u64), u64> = HashMap::new();
        while let Some(dir) = queue.pop_front() {
            view.index_dir(&dir, opaque, &mut queue, &mut links)?;
        }
        Ok(view)
    }

    fn index_dir(
        &mut self,
        dir: &Pending,
        opaque: OpaqueXattr,
        queue: &mut VecDeque<Pending>,
        links: &mut HashMap<(usize, u64, u64), u64>,
    ) -> Result<(), ViewError> {
        let layers = dir
            .sources
            .iter()
            .map(|(layer, _)| *layer)
            .max()
            .map_or(0, |m| m + 1);
        let mut listings = vec![HashMap::new(); layers];
        let mut metas: HashMap<(usize, Vec<u8>), (PathBuf, std::fs::Metadata)> = HashMap::new();
        for (layer, path) in &dir.sources {
            for entry in std::fs::read_dir(path).map_err(io("listing", path))? {
                let entry = entry.map_err(io("listing", path))?;
                let child = entry.path();
                let meta = std::fs::symlink_metadata(&child).map_err(io("reading", &child))?;
                let name = entry.file_name().into_vec();
                listings[*layer].insert(name.clone(), classify(&child, &meta, opaque));
                metas.insert((*layer, name), (child, meta));
            }
        }
        let mut children = Vec::new();
        let mut subdirs = 0;
        for (name, merged) in merge_names(&listings) {
            let Some((path, meta)) = metas.remove(&(merged.layer, name.clone())) else {
                continue;
            };
            let link_key = (merged.layer, meta.dev(), meta.ino());
            let linked = (!meta.is_dir() && meta.nlink() > 1)
                .then(|| links.get(&link_key))
                .flatten();
            if let Some(&id) = linked {
                children.push((name, id));
                continue;
            }
            if self.inodes.len() >= MAX_INODES {
                return Err(ViewError::TooBig);
            }
            let id = self.inodes.len() as u64 + 1;
            let kind = Self::kind_of(&path, &meta)?;
            if meta.is_dir() {
                subdirs += 1;
                queue.push_back(Pending {
                    id,
                    sources: merged
                        .dir_layers
                        .iter()
                        .filter_map(|layer| {
                            dir.sources
                                .iter()
                                .find(|(l, _)| l == layer)
                                .map(|(_, p)| (*layer, p.join(OsString::from_vec(name.clone()))))
                        })
                        .collect(),
                });
            } else if meta.nlink() > 1 {
                links.insert(link_key, id);
            }
            self.inodes.push(Inode {
                kind,
                attr: attr_of(&meta),
                parent: dir.id,
            });
            children.push((name, id));
        }
        let inode = &mut self.inodes[(dir.id - 1) as usize];
        inode.attr.nlink = 2 + subdirs;
        inode.kind = Kind::Dir(children);
        Ok(())
    }

    fn kind_of(path: &Path, meta: &std::fs::Metadata) -> Result<Kind, ViewError> {
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        Ok(if ft.is_dir() {
            Kind::Dir(Vec::new())
        } else if ft.is_symlink() {
            Kind::Symlink(
                std::fs::read_link(path)
                    .map_err(io("reading link", path))?
                    .into_os_string()
                    .into_vec(),
            )
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            Kind::File(path.to_path_buf())
        })
    }

    /// The 8 bytes that name this view in file handles (a hash of its layer directories).
    pub fn key(&self) -> [u8; 8] {
        self.key
    }

    /// The image digest this view serves.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The number of inodes.
    pub fn len(&self) -> usize {
        self.base.as_ref().map_or(0, |b| b.len()) + self.inodes.len()
    }

    /// Whether the view is empty (never: the root is always there).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image view under the top layer, for a node's view.
    pub fn base(&self) -> Option<&Arc<ImageView>> {
        self.base.as_ref()
    }

    /// The inode with this number.
    pub fn inode(&self, id: u64) -> Option<&Inode> {
        if let Some(inode) = self.replaced.get(&id) {
            return Some(inode);
        }
        let own = self.base.as_ref().map_or(0, |b| b.len() as u64);
        if id <= own {
            return self.base.as_ref()?.inode(id);
        }
        let index = usize::try_from(id.checked_sub(own + 1)?).ok()?;
        self.inodes.get(index)
    }

    /// The entry `name` of directory `dir` (`.` and `..` included).
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let inode = self.inode(dir)?;
        let Kind::Dir(children) = &inode.kind else {
            return None;
        };
        match name {
            b"." => Some(dir),
            b".." => Some(inode.parent),
            _ => children
                .binary_search_by(|(n, _)| n.as_slice().cmp(name))
                .ok()
                .map(|i| children[i].1),
        }
    }

    /// Reads up to `count` bytes at `offset` of a regular file; `(data, eof)`.
    pub fn read(&self, id: u64, offset: u64, count: u32) -> Result<(Vec<u8>, bool), ReadError> {
        let inode = self.inode(id).ok_or(ReadError::Stale)?;
        let path = match &inode.kind {
            Kind::File(path) => path,
            Kind::Data(data) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
                let end = start.saturating_add(count as usize).min(data.len());
                return Ok((data[start..end].to_vec(), end == data.len()));
            }
            Kind::Dir(_) => return Err(ReadError::IsDir),
            _ => return Err(ReadError::Invalid),
        };
        let size = inode.attr.size;
        let len = u64::from(count).min(size.saturating_sub(offset)) as usize;
        let mut buf = vec![0; len];
        let file = std::fs::File::open(path).map_err(ReadError::Io)?;
        let mut done = 0;
        while done < len {
            let n = file
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(ReadError::Io)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok((buf, offset + done as u64 >= size))
    }

    /// Resolves an absolute or relative `path` from the root, following symbolic links (relative and
    /// absolute ones alike) inside the image: `..` at the root stays at the root and an absolute target
    /// starts again from the image root, so no chain ever leaves the image.
    pub fn resolve(&self, path: &[u8]) -> Result<u64, ResolveError> {
        let mut hops = 0;
        self.walk(ROOT_ID, path, &mut hops, true)
    }

    fn walk(
        &self,
        start: u64,
        path: &[u8],
        hops: &mut usize,
        follow_last: bool,
    ) -> Result<u64, ResolveError> {
        let mut current = if path.starts_with(b"/") { ROOT_ID } else { start };
        let parts: Vec<&[u8]> = path.split(|b| *b == b'/').filter(|p| !p.is_empty()).collect();
        for (index, part) in parts.iter().enumerate() {
            let last = index + 1 == parts.len();
            if !matches!(self.inode(current).map(|i| &i.kind), Some(Kind::Dir(_))) {
                return Err(ResolveError::NotDir);
            }
            let next = self.lookup(current, part).ok_or(ResolveError::NotFound)?;
            let Some(Inode {
                kind: Kind::Symlink(target),
                ..
            }) = self.inode(next)
            else {
                current = next;
                continue;
            };
            if last && !follow_last {
                current = next;
                continue;
            }
            *hops += 1;
            if *hops > MAX_SYMLINKS {
                return Err(ResolveError::Loop);
            }
            current = self.walk(current, target, hops, true)?;
        }
        Ok(current)
    }
}

/// One entry of a node's top layer: a file (its content) or a directory, at an absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopEntry {
    /// Absolute path in the image (`/root/.ssh/authorized_keys`).
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// The file's content; `None`: a directory.
    pub data: Option<Vec<u8>>,
}

/// A top layer entry that cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("placing {path} in the node's top layer: {why}")]
pub struct TopLayerError {
    /// The entry's path.
    pub path: String,
    /// Why.
    pub why: &'static str,
}

impl ImageView {
    /// A node's view of `base`: the image under `entries` (files replace the image's, directories
    /// are created or merged; a symbolic link on the way is followed inside the image, or replaced
    /// by a directory when it leads nowhere, as WalT does with `/etc/ssh`). `name` tells nodes'
    /// views of one image apart in file handles. Nothing of the image is copied: the base is shared.
    pub fn with_top_layer(
        base: Arc<ImageView>,
        entries: &[TopEntry],
        name: &str,
        mtime: (i64, u32),
    ) -> Result<ImageView, TopLayerError> {
        let mut hasher = Sha256::new();
        hasher.update(base.key());
        hasher.update(name.as_bytes());
        for entry in entries {
            hasher.update(entry.path.as_bytes());
            hasher.update(entry.mode.to_be_bytes());
            hasher.update(entry.data.as_deref().unwrap_or(&b"/"[..]));
        }
        let hash = hasher.finalize();
        let mut key = [0; 8];
        key.copy_from_slice(&hash[..8]);
        let mut view = ImageView {
            key,
            digest: base.digest.clone(),
            inodes: Vec::new(),
            base: Some(base),
            replaced: HashMap::new(),
        };
        for entry in entries {
            view.place(entry, mtime)?;
        }
        Ok(view)
    }

    fn place(&mut self, entry: &TopEntry, mtime: (i64, u32)) -> Result<(), TopLayerError> {
        let bad = |why| TopLayerError {
            path: entry.path.clone(),
            why,
        };
        let (dir, name) = entry
            .path
            .rsplit_once('/')
            .filter(|(dir, _)| dir.is_empty() || dir.starts_with('/'))
            .filter(|(_, name)| !name.is_empty() && *name != "." && *name != "..")
            .ok_or_else(|| bad("not an absolute path to a file or directory"))?;
        let parent = self.ensure_dir(dir.as_bytes(), mtime).map_err(bad)?;
        let attr = Attr {
            mode: entry.mode & 0o7777,
            nlink: if entry.data.is_some() { 1 } else { 2 },
            size: entry.data.as_ref().map_or(0, |d| d.len() as u64),
            atime: mtime,
            mtime,
            ctime: mtime,
            ..Attr::default()
        };
        let existing = self.lookup(parent, name.as_bytes());
        let existing_dir =
            existing.filter(|id| matches!(self.inode(*id).map(|i| &i.kind), Some(Kind::Dir(_))));
        match (&entry.data, existing_dir) {
            (None, Some(dir)) => {
                if let Some(inode) = self.inode_mut(dir) {
                    inode.attr.mode = attr.mode;
                }
            }
            (data, _) => {
                let kind = match data {
                    Some(data) => Kind::Data(data.clone().into()),
                    None => Kind::Dir(Vec::new()),
                };
                let id = self.add_inode(Inode { kind, attr, parent });
                self.set_entry(parent, name.as_bytes(), id);
            }
        }
        Ok(())
    }

    /// The directory at `path`, created (and its parents) when missing.
    fn ensure_dir(&mut self, path: &[u8], mtime: (i64, u32)) -> Result<u64, &'static str> {
        let mut current = ROOT_ID;
        for part in path.split(|b| *b == b'/').filter(|p| !p.is_empty()) {
            if part == b".." || part == b"." {
                return Err("the path has . or .. in it");
            }
            let found = self.lookup(current, part);
            let kind = found.and_then(|id| self.inode(id)).map(|i| i.kind.clone());
            current = match (found, kind) {
                (Some(id), Some(Kind::Dir(_))) => id,
                (Some(_), Some(Kind::Symlink(target))) => {
                    let mut hops = 0;
                    let resolved = self
                        .walk(current, &target, &mut hops, true)
                        .ok()
                        .filter(|id| matches!(self.inode(*id).map(|i| &i.kind), Some(Kind::Dir(_))));
                    match resolved {
                        Some(dir) => dir,
                        None => self.new_dir(current, part, mtime),
                    }
                }
                (Some(_), _) => return Err("a file of the image is in the way"),
                (None, _) => self.new_dir(current, part, mtime),
            };
        }
        Ok(current)
    }

    fn new_dir(&mut self, parent: u64, name: &[u8], mtime: (i64, u32)) -> u64 {
        let id = self.add_inode(Inode {
            kind: Kind::Dir(Vec::new()),
            attr: Attr {
                mode: 0o755,
                nlink: 2,
                atime: mtime,
                mtime,
                ctime: mtime,
                ..Attr::default()
            },
            parent,
        });
        self.set_entry(parent, name, id);
        id
    }

    fn add_inode(&mut self, inode: Inode) -> u64 {
        self.inodes.push(inode);
        self.len() as u64
    }

    /// Points `dir`'s entry `name` at `id` (added, or replacing the image's entry).
    fn set_entry(&mut self, dir: u64, name: &[u8], id: u64) {
        let subdir = matches!(self.inode(id).map(|i| &i.kind), Some(Kind::Dir(_)));
        let Some(inode) = self.inode_mut(dir) else {
            return;
        };
        let Kind::Dir(children) = &mut inode.kind else {
            return;
        };
        match children.binary_search_by(|(n, _)| n.as_slice().cmp(name)) {
            Ok(index) => children[index].1 = id,
            Err(index) => {
                children.insert(index, (name.to_vec(), id));
                if subdir {
                    inode.attr.nlink += 1;
                }
            }
        }
    }

    /// The inode `id`, to change: a base inode is copied into this view first.
    fn inode_mut(&mut self, id: u64) -> Option<&mut Inode> {
        let own = self.base.as_ref().map_or(0, |b| b.len() as u64);
        if id > own {
            let index = usize::try_from(id - own - 1).ok()?;
            return self.inodes.get_mut(index);
        }
        if !self.replaced.contains_key(&id) {
            let copy = self.base.as_ref()?.inode(id)?.clone();
            self.replaced.insert(id, copy);
        }
        self.replaced.get_mut(&id)
    }
}

/// Why a path did not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// A component does not exist.
    #[error("no such file")]
    NotFound,
    /// A component that must be a directory is not one.
    #[error("not a directory")]
    NotDir,
    /// Too many symbolic links.
    #[error("too many levels of symbolic links")]
    Loop,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No such inode.
    #[error("stale file handle")]
    Stale,
    /// A directory cannot be read as a file.
    #[error("is a directory")]
    IsDir,
    /// Not a regular file.
    #[error("not a regular file")]
    Invalid,
    /// The layer file could not be read.
    #[error("reading the layer file: {0}")]
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(entries: &[(&str, LayerEntry)]) -> HashMap<Vec<u8>, LayerEntry> {
        entries.iter().map(|(n, e)| (n.as_bytes().to_vec(), *e)).collect()
    }

    const DIR: LayerEntry = LayerEntry::Dir { opaque: false };
    const OPAQUE: LayerEntry = LayerEntry::Dir { opaque: true };

    #[test]
    fn top_layer_wins_and_whiteouts_hide() {
        let merged = merge_names(&[
            listing(&[("a", LayerEntry::Other), ("gone", LayerEntry::Whiteout)]),
            listing(&[
                ("a", LayerEntry::Other),
                ("gone", LayerEntry::Other),
                ("b", LayerEntry::Other),
            ]),
        ]);
        let names: Vec<(String, usize)> = merged
            .iter()
            .map(|(n, m)| (String::from_utf8_lossy(n).into_owned(), m.layer))
            .collect();
        assert_eq!(names, vec![("a".into(), 0), ("b".into(), 1)]);
    }

    #[test]
    fn directories_merge_down_to_an_opaque_one_or_a_file() {
        let merged = merge_names(&[
            listing(&[("d", DIR), ("o", OPAQUE), ("f", DIR)]),
            listing(&[("d", DIR), ("o", DIR), ("f", LayerEntry::Other)]),
            listing(&[("d", DIR), ("f", DIR)]),
        ]);
        let by_name: HashMap<Vec<u8>, Vec<usize>> =
            merged.into_iter().map(|(n, m)| (n, m.dir_layers)).collect();
        assert_eq!(by_name[&b"d".to_vec()], vec![0, 1, 2]);
        assert_eq!(by_name[&b"o".to_vec()], vec![0]);
        assert_eq!(by_name[&b"f".to_vec()], vec![0]);
    }

    /// Two layers in overlay form, as the layer cache unpacks them (needs root: whiteouts are device
    /// nodes, opacity a `trusted.` xattr).
    fn layers() -> (tempfile::TempDir, Vec<PathBuf>) {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let (lower, upper) = (dir.path().join("lower"), dir.path().join("upper"));
        for d in ["etc", "opaque/old", "boot/rpi-3-b", "usr/lib"] {
            std::fs::create_dir_all(lower.join(d)).expect("mkdir");
        }
        std::fs::write(lower.join("etc/gone"), "deleted above").expect("write");
        std::fs::write(lower.join("etc/kept"), "kept").expect("write");
        std::fs::write(lower.join("opaque/old/file"), "hidden").expect("write");
        std::fs::write(lower.join("usr/lib/kernel.img"), "KERNEL").expect("write");
        std::fs::hard_link(lower.join("etc/kept"), lower.join("etc/kept-link")).expect("link");
        symlink("../../usr/lib/kernel.img", lower.join("boot/rpi-3-b/kernel.img")).expect("symlink");
        symlink("rpi-3-b", lower.join("boot/rpi-3-b-plus")).expect("symlink");
        symlink("/../../../etc/kept", lower.join("boot/escape")).expect("symlink");
        symlink("loop", lower.join("boot/loop")).expect("symlink");
        for d in ["etc", "opaque"] {
            std::fs::create_dir_all(upper.join(d)).expect("mkdir");
        }
        nix::sys::stat::mknod(
            &upper.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .expect("whiteout (run the tests as root)");
        xattr::set(upper.join("opaque"), "trusted.overlay.opaque", b"y").expect("opaque xattr (root)");
        std::fs::write(upper.join("opaque/new"), "new").expect("write");
        (dir, vec![upper, lower])
    }

    #[test]
    fn a_view_merges_layers_like_overlayfs() {
        let (_dir, dirs) = layers();
        let view = ImageView::build(&dirs, "sha256:abc", OpaqueXattr::Trusted).expect("view");
        assert_eq!(
            view.resolve(b"/etc/gone"),
            Err(ResolveError::NotFound),
            "whiteout hides"
        );
        assert_eq!(
            view.resolve(b"/opaque/old"),
            Err(ResolveError::NotFound),
            "opaque hides"
        );
        let new = view.resolve(b"/opaque/new").expect("upper file");
        assert_eq!(view.read(new, 0, 100).expect("read").0, b"new");
        let kept = view.resolve(b"/etc/kept").expect("kept");
        assert_eq!(
            view.resolve(b"/etc/kept-link"),
            Ok(kept),
            "hard links share an inode"
        );
        assert_eq!(view.inode(kept).map(|i| i.attr.nlink), Some(2));
        let etc = view.resolve(b"/etc").expect("etc");
        let Some(Inode {
            kind: Kind::Dir(children),
            ..
        }) = view.inode(etc)
        else {
            panic!("etc is a directory");
        };
        let names: Vec<&[u8]> = children.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(names, [&b"kept"[..], b"kept-link"]);
        let again = ImageView::build(&dirs, "sha256:abc", OpaqueXattr::Trusted).expect("view");
        assert_eq!(again.key(), view.key(), "same layers, same handle key");
        assert_eq!(
            again.resolve(b"/opaque/new"),
            Ok(new),
            "same layers, same inode numbers"
        );
    }

    #[test]
    fn symlink_chains_resolve_inside_the_image_root() {
        let (_dir, dirs) = layers();
        let view = ImageView::build(&dirs, "sha256:abc", OpaqueXattr::Trusted).expect("view");
        let kernel = view.resolve(b"/usr/lib/kernel.img").expect("kernel");
        assert_eq!(
            view.resolve(b"/boot/rpi-3-b-plus/kernel.img"),
            Ok(kernel),
            "a chain of two links"
        );
        assert_eq!(view.read(kernel, 2, 100).expect("read"), (b"RNEL".to_vec(), true));
        let kept = view.resolve(b"/etc/kept").expect("kept");
        assert_eq!(
            view.resolve(b"/boot/escape"),
            Ok(kept),
            "`..` stops at the image root"
        );
        assert_eq!(view.resolve(b"/../../etc/kept"), Ok(kept));
        assert_eq!(view.resolve(b"/boot/loop"), Err(ResolveError::Loop));
        assert_eq!(view.resolve(b"/etc/kept/x"), Err(ResolveError::NotDir));
    }

    #[test]
    fn a_top_layer_adds_and_replaces_files_without_touching_the_image() {
        let (_dir, dirs) = layers();
        let base = Arc::new(ImageView::build(&dirs, "sha256:abc", OpaqueXattr::Trusted).expect("view"));
        let entry = |path: &str, mode, data: Option<&str>| TopEntry {
            path: path.into(),
            mode,
            data: data.map(|d| d.as_bytes().to_vec()),
        };
        let top = ImageView::with_top_layer(
            base.clone(),
            &[
                entry("/etc/kept", 0o644, Some("replaced")),
                entry("/root/.ssh", 0o700, None),
                entry("/root/.ssh/authorized_keys", 0o600, Some("ssh-ed25519 AAAA")),
                entry("/boot/rpi-3-b-plus/extra", 0o644, Some("through a link")),
                entry("/boot/loop/x", 0o644, Some("the loop is replaced")),
            ],
            "node1",
            (1, 0),
        )
        .expect("top layer");
        assert_ne!(top.key(), base.key(), "a node's view has its own handles");
        assert_eq!(top.digest(), "sha256:abc");
        let kept = top.resolve(b"/etc/kept").expect("kept");
        assert_eq!(top.read(kept, 0, 100).expect("read").0, b"replaced");
        let base_kept = base.resolve(b"/etc/kept").expect("kept");
        assert_eq!(
            base.read(base_kept, 0, 100).expect("read").0,
            b"kept",
            "the image is untouched"
        );
        assert_eq!(
            top.resolve(b"/etc/kept-link"),
            Ok(base_kept),
            "the other link still names the image's file"
        );
        let keys = top.resolve(b"/root/.ssh/authorized_keys").expect("keys");
        assert_eq!(top.inode(keys).map(|i| i.attr.mode), Some(0o600));
        let ssh = top.resolve(b"/root/.ssh").expect(".ssh");
        assert_eq!(top.inode(ssh).map(|i| i.attr.mode), Some(0o700));
        let extra = top
            .resolve(b"/boot/rpi-3-b/extra")
            .expect("placed in the link's target");
        assert_eq!(top.read(extra, 5, 100).expect("read").0, b"gh a link");
        assert!(top.resolve(b"/boot/loop/x").is_ok());
        assert_eq!(base.resolve(b"/root"), Err(ResolveError::NotFound));
        let kernel = base.resolve(b"/usr/lib/kernel.img").expect("kernel");
        assert_eq!(
            top.resolve(b"/boot/rpi-3-b/kernel.img"),
            Ok(kernel),
            "the image's files are shared"
        );
        let error =
            ImageView::with_top_layer(base, &[entry("/etc/kept/x", 0o644, Some("no"))], "node1", (1, 0))
                .expect_err("a file is in the way");
        assert!(error.to_string().contains("/etc/kept/x"), "{error}");
    }
}
