//! Change set (overlay upper dir, or a tar stream of one) → OCI layer tar.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Error, OPAQUE_MARKER, WHITEOUT_PREFIX, is_overlay_xattr, sanitize_entry_path};

/// What goes into a layer: exclusions, the "changed after ready" filter, and the lower dirs used to tell
/// added from modified paths.
#[derive(Debug, Clone, Default)]
pub struct LayerOptions {
    /// Regular expressions matched (unanchored) against each path written `/`-rooted, directories with a
    /// trailing `/`; a match leaves the path (and a directory's whole content) out. Empty: keep everything
    /// (image shell commits). [`LayerOptions::node_save`] uses WalT's [`super::DEFAULT_EXCLUSIONS`].
    pub exclusions: Vec<String>,
    /// Keep only entries changed after this instant (e.g. the mtime of the node's `/run/uptime-ready`);
    /// directories are kept when they hold a kept entry. On disk, the later of mtime and ctime counts; in a
    /// tar stream, the mtime.
    pub changed_after: Option<SystemTime>,
    /// The image's layers in overlay form (any order): a path found in one is counted "modified", else
    /// "added". Empty: every path counts as added.
    pub lower_dirs: Vec<PathBuf>,
}

impl LayerOptions {
    /// Options of a WalT node save: the default exclusions, nothing else.
    pub fn node_save() -> Self {
        LayerOptions {
            exclusions: super::DEFAULT_EXCLUSIONS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            ..LayerOptions::default()
        }
    }
}

/// The compiled form of [`LayerOptions`] filters.
#[derive(Debug, Clone)]
pub struct ChangeFilter {
    exclusions: regex::bytes::RegexSet,
    changed_after: Option<SystemTime>,
}

impl ChangeFilter {
    /// Compiles the exclusion patterns; a bad pattern is an error naming it.
    pub fn new(options: &LayerOptions) -> Result<Self, Error> {
        for pattern in &options.exclusions {
            regex::bytes::Regex::new(pattern).map_err(|source| Error::BadPattern {
                pattern: pattern.clone(),
                source,
            })?;
        }
        let exclusions =
            regex::bytes::RegexSet::new(&options.exclusions).map_err(|source| Error::BadPattern {
                pattern: options.exclusions.join(" "),
                source,
            })?;
        Ok(ChangeFilter {
            exclusions,
            changed_after: options.changed_after,
        })
    }

    /// Whether a relative path (a directory if `is_dir`) is excluded.
    pub fn is_excluded(&self, relative: &[u8], is_dir: bool) -> bool {
        if self.exclusions.is_empty() {
            return false;
        }
        let mut rooted = Vec::with_capacity(relative.len() + 2);
        rooted.push(b'/');
        rooted.extend_from_slice(relative);
        if is_dir {
            rooted.push(b'/');
        }
        self.exclusions.is_match(&rooted)
    }

    fn is_recent(&self, changed_at: u64) -> bool {
        match self.changed_after {
            None => true,
            Some(after) => {
                let after = after.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                changed_at >= after
            }
        }
    }
}

/// What a change set holds, as a user sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeSummary {
    /// Paths that were not in the lower layers (non-directories, and new directories).
    pub added: u64,
    /// Paths that were in the lower layers and changed (or opaque directories).
    pub modified: u64,
    /// Deleted paths (whiteouts).
    pub deleted: u64,
    /// Bytes of regular-file content in the layer.
    pub bytes: u64,
    /// Tar entries written (directories, files, links, devices, whiteouts, opaque markers).
    pub entries: u64,
    /// What the layer says about the image-shell helpers (read by the Image controller to tell an
    /// image's shell mode): known here as the entries are written.
    #[serde(skip)]
    pub shell_helpers: crate::oci::ShellHelpersSaid,
}

#[derive(Debug, Clone, Default)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Xattrs,
}

enum Body<'a> {
    Dir,
    File { size: u64, content: &'a mut dyn Read },
    Symlink(Vec<u8>),
    HardLink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

struct PendingDir {
    path: Vec<u8>,
    meta: Meta,
    opaque: bool,
}

struct Emitter<'f, W: Write> {
    builder: tar::Builder<W>,
    summary: ChangeSummary,
    pending: Vec<PendingDir>,
    lowers: Vec<PathBuf>,
    filter: &'f ChangeFilter,
}

fn is_ancestor(dir: &[u8], path: &[u8]) -> bool {
    dir.is_empty() || (path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/')
}

impl<W: Write> Emitter<'_, W> {
    fn in_lower(&self, path: &[u8]) -> Option<bool> {
        if self.lowers.is_empty() {
            return None;
        }
        let relative = Path::new(OsStr::from_bytes(path));
        Some(
            self.lowers
                .iter()
                .any(|lower| lower.join(relative).symlink_metadata().is_ok()),
        )
    }

    /// Drops pending directories that are not ancestors of `path` (nothing kept below them).
    fn settle(&mut self, path: &[u8]) {
        while let Some(top) = self.pending.last() {
            if is_ancestor(&top.path, path) {
                break;
            }
            self.pending.pop();
        }
    }

    /// Writes the pending ancestors of the entry about to be written.
    fn flush_pending(&mut self) -> Result<(), Error> {
        let pending = std::mem::take(&mut self.pending);
        for dir in pending {
            self.write_dir(&dir.path, &dir.meta, dir.opaque)?;
        }
        Ok(())
    }

    /// A directory: written now if it qualifies, else kept pending until something below it is written.
    fn dir(&mut self, path: &[u8], meta: Meta, opaque: bool, changed_at: u64) -> Result<(), Error> {
        self.settle(path);
        if opaque || self.filter.is_recent(changed_at) {
            self.flush_pending()?;
            self.write_dir(path, &meta, opaque)?;
        } else {
            self.pending.push(PendingDir {
                path: path.to_vec(),
                meta,
                opaque,
            });
        }
        Ok(())
    }

    fn write_dir(&mut self, path: &[u8], meta: &Meta, opaque: bool) -> Result<(), Error> {
        self.append(path, meta, Body::Dir)?;
        if opaque {
            let marker = join(path, OPAQUE_MARKER.as_bytes());
            let marker_meta = Meta {
                mode: 0o644,
                mtime: meta.mtime,
                ..Meta::default()
            };
            self.append(
                &marker,
                &marker_meta,
                Body::File {
                    size: 0,
                    content: &mut std::io::empty(),
                },
            )?;
            self.summary.modified += 1;
        } else if self.in_lower(path) == Some(false) {
            self.summary.added += 1;
        }
        Ok(())
    }

    /// A non-directory entry (returns false if the filter left it out).
    fn entry(&mut self, path: &[u8], meta: &Meta, body: Body<'_>, changed_at: u64) -> Result<bool, Error> {
        self.settle(path);
        if !self.filter.is_recent(changed_at) {
            return Ok(false);
        }
        self.flush_pending()?;
        let size = if let Body::File { size, .. } = &body {
            *size
        } else {
            0
        };
        self.append(path, meta, body)?;
        self.summary.bytes += size;
        if self.in_lower(path) == Some(true) {
            self.summary.modified += 1;
        } else {
            self.summary.added += 1;
        }
        Ok(true)
    }

    fn whiteout(&mut self, path: &[u8], meta: &Meta, changed_at: u64) -> Result<bool, Error> {
        self.settle(path);
        if !self.filter.is_recent(changed_at) {
            return Ok(false);
        }
        self.flush_pending()?;
        let (parent, name) = split_parent(path);
        let mut wh_name = WHITEOUT_PREFIX.as_bytes().to_vec();
        wh_name.extend_from_slice(name);
        let whiteout = join(parent, &wh_name);
        let wh_meta = Meta {
            mode: 0o644,
            mtime: meta.mtime,
            ..Meta::default()
        };
        self.append(
            &whiteout,
            &wh_meta,
            Body::File {
                size: 0,
                content: &mut std::io::empty(),
            },
        )?;
        self.summary.deleted += 1;
        Ok(true)
    }

    fn append(&mut self, path: &[u8], meta: &Meta, body: Body<'_>) -> Result<(), Error> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let tar_err = |source| Error::Tar {
            context: format!("writing {shown}"),
            source,
        };
        let mut header = tar::Header::new_ustar();
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        let mut name = path.to_vec();
        if matches!(body, Body::Dir) {
            name.push(b'/');
        }
        if set_ustar_path(&mut header, &name).is_err() {
            pax.push(("path".to_owned(), name.clone()));
            let short = &name[..name.len().min(100)];
            if let Some(ustar) = header.as_ustar_mut() {
                ustar.name = [0; 100];
                ustar.name[..short.len()].copy_from_slice(short);
                ustar.prefix = [0; 155];
            }
        }
        header.set_mode(meta.mode & 0o7777);
        set_id(&mut header, &mut pax, meta.uid, "uid");
        set_id(&mut header, &mut pax, meta.gid, "gid");
        header.set_mtime(meta.mtime);
        for (key, value) in &meta.xattrs {
            if is_overlay_xattr(key) {
                continue;
            }
            pax.push((
                format!("SCHILY.xattr.{}", String::from_utf8_lossy(key)),
                value.clone(),
            ));
        }
        let mut size = 0;
        match &body {
            Body::Dir => header.set_entry_type(tar::EntryType::Directory),
            Body::File { size: file_size, .. } => {
                header.set_entry_type(tar::EntryType::Regular);
                size = *file_size;
            }
            Body::Symlink(target) | Body::HardLink(target) => {
                header.set_entry_type(if matches!(body, Body::Symlink(_)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                if target.len() > 100 || header.set_link_name_literal(target).is_err() {
                    pax.push(("linkpath".to_owned(), target.clone()));
                    let short = &target[..target.len().min(100)];
                    if let Some(ustar) = header.as_ustar_mut() {
                        ustar.linkname = [0; 100];
                        ustar.linkname[..short.len()].copy_from_slice(short);
                    }
                }
            }
            Body::Char(major, minor) | Body::Block(major, minor) => {
                header.set_entry_type(if matches!(body, Body::Char(..)) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                header.set_device_major(*major).map_err(tar_err)?;
                header.set_device_minor(*minor).map_err(tar_err)?;
            }
            Body::Fifo => header.set_entry_type(tar::EntryType::Fifo),
        }
        header.set_size(size);
        header.set_cksum();
        self.summary.shell_helpers.entry(
            &String::from_utf8_lossy(&name),
            header.entry_type(),
            meta.mode & 0o7777,
        );
        if !pax.is_empty() {
            self.builder
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(tar_err)?;
        }
        match body {
            Body::File { size, content } => {
                let mut exact = ExactReader {
                    inner: content,
                    remaining: size,
                    path: &shown,
                };
                self.builder.append(&header, &mut exact).map_err(tar_err)?;
            }
            _ => self.builder.append(&header, std::io::empty()).map_err(tar_err)?,
        }
        self.summary.entries += 1;
        Ok(())
    }

    fn finish(self) -> Result<(W, ChangeSummary), Error> {
        let inner = self.builder.into_inner().map_err(|source| Error::Tar {
            context: "finishing the layer".into(),
            source,
        })?;
        Ok((inner, self.summary))
    }
}

/// Reads exactly `remaining` bytes or fails: a file that shrinks while being read would corrupt the tar.
struct ExactReader<'a> {
    inner: &'a mut dyn Read,
    remaining: u64,
    path: &'a str,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} shrank while being read ({} bytes missing)",
                    self.path, self.remaining
                ),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn set_ustar_path(header: &mut tar::Header, name: &[u8]) -> std::io::Result<()> {
    if name.len() > 255 {
        return Err(std::io::Error::other("too long"));
    }
    header.set_path(Path::new(OsStr::from_bytes(name)))
}

fn set_id(header: &mut tar::Header, pax: &mut Vec<(String, Vec<u8>)>, id: u64, key: &str) {
    // ustar octal fields hold 7 digits; larger ids go into PAX records.
    let fits = id < 0o7_777_777;
    let value = if fits { id } else { 0 };
    if key == "uid" {
        header.set_uid(value);
    } else {
        header.set_gid(value);
    }
    if !fits {
        pax.push((key.to_owned(), id.to_string().into_bytes()));
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut out = parent.to_vec();
    out.push(b'/');
    out.extend_from_slice(name);
    out
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// Extended attributes as (name, value) pairs, sorted by name.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

fn read_xattrs(path: &Path) -> Result<Xattrs, Error> {
    let mut out = Vec::new();
    let names = xattr::list(path).map_err(|e| Error::io("listing xattrs of", path, e))?;
    for name in names {
        let bytes = name.as_bytes().to_vec();
        if let Some(value) = xattr::get(path, &name).map_err(|e| Error::io("reading xattrs of", path, e))? {
            out.push((bytes, value));
        }
    }
    out.sort();
    Ok(out)
}

fn meta_of(metadata: &std::fs::Metadata, xattrs: Xattrs) -> Meta {
    Meta {
        mode: metadata.mode() & 0o7777,
        uid: u64::from(metadata.uid()),
        gid: u64::from(metadata.gid()),
        mtime: u64::try_from(metadata.mtime()).unwrap_or(0),
        xattrs,
    }
}

fn changed_at(metadata: &std::fs::Metadata) -> u64 {
    u64::try_from(metadata.mtime().max(metadata.ctime())).unwrap_or(0)
}

fn dev_major(rdev: u64) -> u32 {
    (((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0fff)) as u32
}

fn dev_minor(rdev: u64) -> u32 {
    (((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)) as u32
}

/// Writes the OCI layer tar of an overlay upper dir to `out`, in a deterministic order (depth first, names
/// sorted bytewise), and returns `out` and what the layer holds. Sockets are skipped (tar cannot hold them).
pub fn write_layer_from_dir<W: Write>(
    upper: &Path,
    options: &LayerOptions,
    out: W,
) -> Result<(W, ChangeSummary), Error> {
    let filter = ChangeFilter::new(options)?;
    let meta = upper
        .symlink_metadata()
        .map_err(|e| Error::io("reading", upper, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            "reading upper dir",
            upper,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let mut emitter = Emitter {
        builder: tar::Builder::new(out),
        summary: ChangeSummary::default(),
        pending: Vec::new(),
        lowers: options.lower_dirs.clone(),
        filter: &filter,
    };
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    walk_dir(upper, b"", &mut emitter, &filter, &mut links)?;
    emitter.finish()
}

fn walk_dir<W: Write>(
    root: &Path,
    dir: &[u8],
    emitter: &mut Emitter<'_, W>,
    filter: &ChangeFilter,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
) -> Result<(), Error> {
    let full_dir = root.join(OsStr::from_bytes(dir));
    let mut names: Vec<Vec<u8>> = std::fs::read_dir(&full_dir)
        .map_err(|e| Error::io("listing", &full_dir, e))?
        .map(|entry| entry.map(|e| e.file_name().as_bytes().to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| Error::io("listing", &full_dir, e))?;
    names.sort();
    for name in names {
        let relative = join(dir, &name);
        let full = root.join(OsStr::from_bytes(&relative));
        let metadata = full
            .symlink_metadata()
            .map_err(|e| Error::io("reading", &full, e))?;
        let file_type = metadata.file_type();
        if filter.is_excluded(&relative, file_type.is_dir()) {
            continue;
        }
        let changed = changed_at(&metadata);
        if file_type.is_char_device() && metadata.rdev() == 0 {
            emitter.whiteout(&relative, &meta_of(&metadata, Vec::new()), changed)?;
            continue;
        }
        let xattrs = if file_type.is_symlink() {
            Vec::new()
        } else {
            read_xattrs(&full)?
        };
        if file_type.is_dir() {
            let opaque = xattrs
                .iter()
                .any(|(k, v)| (k == b"trusted.overlay.opaque" || k == b"user.overlay.opaque") && v == b"y");
            emitter.dir(&relative, meta_of(&metadata, xattrs), opaque, changed)?;
            walk_dir(root, &relative, emitter, filter, links)?;
            continue;
        }
        let meta = meta_of(&metadata, xattrs);
        if file_type.is_file() {
            let key = (metadata.dev(), metadata.ino());
            if metadata.nlink() > 1
                && let Some(first) = links.get(&key)
            {
                let first = first.clone();
                emitter.entry(&relative, &meta, Body::HardLink(first), changed)?;
                continue;
            }
            let mut file = std::fs::File::open(&full).map_err(|e| Error::io("opening", &full, e))?;
            let written = emitter.entry(
                &relative,
                &meta,
                Body::File {
                    size: metadata.len(),
                    content: &mut file,
                },
                changed,
            )?;
            if written && metadata.nlink() > 1 {
                links.insert(key, relative);
            }
        } else if file_type.is_symlink() {
            let target = std::fs::read_link(&full).map_err(|e| Error::io("reading link", &full, e))?;
            emitter.entry(
                &relative,
                &meta,
                Body::Symlink(target.as_os_str().as_bytes().to_vec()),
                changed,
            )?;
        } else if file_type.is_char_device() {
            let rdev = metadata.rdev();
            emitter.entry(
                &relative,
                &meta,
                Body::Char(dev_major(rdev), dev_minor(rdev)),
                changed,
            )?;
        } else if file_type.is_block_device() {
            let rdev = metadata.rdev();
            emitter.entry(
                &relative,
                &meta,
                Body::Block(dev_major(rdev), dev_minor(rdev)),
                changed,
            )?;
        } else if file_type.is_fifo() {
            emitter.entry(&relative, &meta, Body::Fifo, changed)?;
        } else {
            tracing::warn!(path = %full.display(), "skipping a socket: a layer cannot hold it");
        }
    }
    Ok(())
}

/// Converts a tar stream of an overlay upper dir (busybox tar, or GNU tar with `--xattrs`: whiteouts are
/// char 0:0 entries, possibly hard links to one another; opaque directories carry
/// `trusted.overlay.opaque=y` or `user.overlay.opaque=y`) into an OCI layer tar written to `out`.
/// Entries keep the stream's order (send it sorted, e.g. GNU tar `--sort=name`, for reproducible digests).
/// Entries with `..` or absolute paths are refused.
pub fn write_layer_from_tar<R: Read, W: Write>(
    input: R,
    options: &LayerOptions,
    out: W,
) -> Result<(W, ChangeSummary), Error> {
    let filter = ChangeFilter::new(options)?;
    let mut emitter = Emitter {
        builder: tar::Builder::new(out),
        summary: ChangeSummary::default(),
        pending: Vec::new(),
        lowers: options.lower_dirs.clone(),
        filter: &filter,
    };
    let limited = super::HeaderLimit::new(input);
    let entry_pax = limited.entry_pax();
    let mut archive = tar::Archive::new(limited);
    let entries = archive.entries().map_err(|source| Error::Tar {
        context: "reading the change stream".into(),
        source,
    })?;
    let mut whiteouts: HashSet<Vec<u8>> = HashSet::new();
    let mut written_files: HashSet<Vec<u8>> = HashSet::new();
    let mut excluded_dirs: Vec<Vec<u8>> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|source| Error::Tar {
            context: "reading the change stream".into(),
            source,
        })?;
        let raw_path = entry.path_bytes().into_owned();
        let path = sanitize_entry_path(&raw_path)?;
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let tar_err = |source| Error::Tar {
            context: format!("reading entry {shown}"),
            source,
        };
        if path.is_empty() {
            continue; // the root itself: a layer does not change it
        }
        let header = entry.header().clone();
        let entry_type = header.entry_type();
        let is_dir = entry_type.is_dir();
        if excluded_dirs.iter().any(|d| is_ancestor(d, &path)) || filter.is_excluded(&path, is_dir) {
            if is_dir {
                excluded_dirs.push(path);
            }
            continue;
        }
        let mut xattrs = Vec::new();
        if let Some(data) = entry_pax.take() {
            for (key, value) in super::pax_records(&data).map_err(tar_err)? {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), value.to_vec()));
                }
            }
        }
        xattrs.sort();
        let mtime = header.mtime().map_err(tar_err)?;
        let meta = Meta {
            mode: header.mode().map_err(tar_err)? & 0o7777,
            uid: header.uid().map_err(tar_err)?,
            gid: header.gid().map_err(tar_err)?,
            mtime,
            xattrs,
        };
        match entry_type {
            tar::EntryType::Directory => {
                let opaque = meta.xattrs.iter().any(|(k, v)| {
                    (k == b"trusted.overlay.opaque" || k == b"user.overlay.opaque") && v == b"y"
                });
                emitter.dir(&path, meta, opaque, mtime)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                if emitter.entry(
                    &path,
                    &meta,
                    Body::File {
                        size,
                        content: &mut entry,
                    },
                    mtime,
                )? {
                    written_files.insert(path);
                }
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| sanitize_entry_path(&t))
                    .transpose()?
                    .ok_or_else(|| Error::UnsafeEntry {
                        path: shown.clone(),
                        reason: "hard link without a target".into(),
                    })?;
                if whiteouts.contains(&target) {
                    // Whiteouts share one inode in an upper dir: tar links them, a layer must not.
                    if emitter.whiteout(&path, &meta, mtime)? {
                        whiteouts.insert(path);
                    }
                } else if written_files.contains(&target) {
                    if emitter.entry(&path, &meta, Body::HardLink(target), mtime)? {
                        written_files.insert(path);
                    }
                } else {
                    tracing::warn!(path = %shown, target = %String::from_utf8_lossy(&target), "skipping a hard link whose target was left out");
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default();
                emitter.entry(&path, &meta, Body::Symlink(target), mtime)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = header.device_major().map_err(tar_err)?.unwrap_or(0);
                let minor = header.device_minor().map_err(tar_err)?.unwrap_or(0);
                if entry_type == tar::EntryType::Char && major == 0 && minor == 0 {
                    if emitter.whiteout(&path, &meta, mtime)? {
                        whiteouts.insert(path);
                    }
                } else if entry_type == tar::EntryType::Char {
                    emitter.entry(&path, &meta, Body::Char(major, minor), mtime)?;
                } else {
                    emitter.entry(&path, &meta, Body::Block(major, minor), mtime)?;
                }
            }
            tar::EntryType::Fifo => {
                emitter.entry(&path, &meta, Body::Fifo, mtime)?;
            }
            other => {
                tracing::warn!(path = %shown, kind = ?other, "skipping an entry of a kind a layer does not hold");
            }
        }
    }
    // Read what follows the end-of-archive marker (tar pads to its record size): a sender that cannot
    // finish writing would fail (EPIPE) although the stream was complete.
    let mut rest = archive.into_inner().into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(|source| Error::Tar {
        context: "reading the end of the change stream".into(),
        source,
    })?;
    emitter.finish()
}
