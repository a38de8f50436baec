//! OCI layer tar → directory in overlay form (a lower dir).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use super::{
    Error, HeaderLimit, OPAQUE_MARKER, OpaqueXattr, WHITEOUT_PREFIX, is_overlay_xattr, sanitize_entry_path,
};

/// How [`unpack_layer`] writes overlay form.
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Which xattr marks opaque directories (`trusted.` for real root, `user.` for `userxattr` mounts).
    pub opaque_xattr: OpaqueXattr,
    /// Set owners from the layer (needs root or CAP_CHOWN; without it, files keep the unpacker's owner).
    pub preserve_owners: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            opaque_xattr: OpaqueXattr::Trusted,
            preserve_owners: nix::unistd::geteuid().is_root(),
        }
    }
}

/// A directory entry whose mode and times are applied after every entry is written.
struct DirTimes {
    /// Its path relative to the root (sanitized: no `..`, no `.`, no empty component).
    relative: Vec<u8>,
    mode: u32,
    mtime: i64,
}

/// Unpacks an (uncompressed) OCI layer tar into `dest` (an existing, normally empty directory) in overlay
/// form: `.wh.<name>` becomes a char device 0:0 `<name>`, `.wh..wh..opq` sets the opaque xattr on its
/// directory. Refuses (with [`Error::UnsafeEntry`]) absolute paths, `..`, entries reached through a
/// symlink, hard links outside the layer or to a whiteout, and relative symlinks that climb above the root (absolute symlink
/// targets are fine: they resolve inside the root at run time), directory entries that a later entry
/// replaced by a symlink or non-directory, and long-name or PAX headers over [`super::MAX_EXTENSION_SIZE`].
/// Overlay's own xattrs in a layer are dropped.
/// Returns the input reader (so the caller can drain and hash it) and the number of entries.
pub fn unpack_layer<R: Read>(input: R, dest: &Path, options: UnpackOptions) -> Result<(R, u64), Error> {
    unpack(input, dest, options, None)
}

/// Applies an (uncompressed) OCI layer tar onto `dest`, which holds the layers below it (flattening an
/// image into one root filesystem): `.wh.<name>` removes `<name>`, `.wh..wh..opq` empties its directory of
/// what the lower layers put there. Same safety checks as [`unpack_layer`]. Owners are kept when root.
pub fn apply_layer<R: Read>(input: R, dest: &Path) -> Result<(R, u64), Error> {
    let mut created = HashSet::new();
    unpack(input, dest, UnpackOptions::default(), Some(&mut created))
}

/// `flatten`: `None` for overlay form; `Some(paths written by this layer)` when applying onto lower layers.
fn unpack<R: Read>(
    input: R,
    dest: &Path,
    options: UnpackOptions,
    mut flatten: Option<&mut HashSet<Vec<u8>>>,
) -> Result<(R, u64), Error> {
    let limited = HeaderLimit::new(input);
    let entry_pax = limited.entry_pax();
    let mut archive = tar::Archive::new(limited);
    let mut dirs: Vec<DirTimes> = Vec::new();
    let mut count = 0u64;
    {
        let entries = archive.entries().map_err(|source| Error::Tar {
            context: "reading the layer".into(),
            source,
        })?;
        for entry in entries {
            let mut entry = entry.map_err(|source| Error::Tar {
                context: "reading the layer".into(),
                source,
            })?;
            let pax = entry_pax.take();
            unpack_entry(
                &mut entry,
                pax.as_deref(),
                dest,
                options,
                &mut dirs,
                flatten.as_deref_mut(),
            )?;
            count += 1;
        }
    }
    apply_dir_metadata(dest, &dirs)?;
    Ok((archive.into_inner().into_inner(), count))
}

/// Applies the deferred modes and times of the layer's directories, in reverse order of their entries
/// (writing children would change them, and a read-only dir would block). Each directory is opened component by
/// component from `dest` without following any symlink, and changed through that descriptor
/// (`fchmod`, `futimens`): a later entry of the layer that replaced a directory (or one of its parents) by
/// a symlink cannot redirect the change outside the root; such a layer is refused.
fn apply_dir_metadata(dest: &Path, dirs: &[DirTimes]) -> Result<(), Error> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    if dirs.is_empty() {
        return Ok(());
    }
    let root = nix::fcntl::open(
        dest,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("opening", dest, e.into()))?;
    for dir in dirs.iter().rev() {
        let shown = || dest.join(OsStr::from_bytes(&dir.relative));
        let fd = open_dir_beneath(dest, &root, &dir.relative)?;
        nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(dir.mode))
            .map_err(|e| Error::io("setting mode of", shown(), e.into()))?;
        let time = nix::sys::time::TimeSpec::new(dir.mtime, 0);
        nix::sys::stat::futimens(&fd, &time, &time)
            .map_err(|e| Error::io("setting times of", shown(), e.into()))?;
    }
    Ok(())
}

/// Opens the directory `relative` (sanitized) under `root` (the descriptor of `dest`) for
/// `fchmod`/`futimens`, one component at a time with `O_NOFOLLOW | O_DIRECTORY` relative to its parent's
/// descriptor: no symlink is ever followed, so the result is inside the root. A component that is not a
/// directory any more (a later entry replaced it) is an [`Error::UnsafeEntry`] naming the directory entry
/// and what replaced what.
fn open_dir_beneath(
    dest: &Path,
    root: &std::os::fd::OwnedFd,
    relative: &[u8],
) -> Result<std::os::fd::OwnedFd, Error> {
    use nix::errno::Errno;
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let mut current = root
        .try_clone()
        .map_err(|e| Error::io("duplicating the descriptor of", dest, e))?;
    let mut end = 0;
    let mut parts = relative.split(|b| *b == b'/').peekable();
    while let Some(part) = parts.next() {
        end += if end == 0 { part.len() } else { part.len() + 1 };
        let access = if parts.peek().is_none() {
            OFlag::O_RDONLY
        } else {
            OFlag::O_PATH
        };
        let name = OsStr::from_bytes(part);
        let opened = nix::fcntl::openat(
            &current,
            name,
            access | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        );
        current = opened.map_err(|errno| match errno {
            Errno::ELOOP | Errno::ENOTDIR | Errno::ENOENT => {
                replaced_dir_error(relative, &relative[..end], describe_at(&current, name), errno)
            }
            other => Error::io(
                "opening",
                dest.join(OsStr::from_bytes(&relative[..end])),
                other.into(),
            ),
        })?;
    }
    Ok(current)
}

/// What is at `name` in the directory `parent` (not following a symlink), for error messages.
fn describe_at(parent: &std::os::fd::OwnedFd, name: &OsStr) -> &'static str {
    use nix::sys::stat::SFlag;
    match nix::sys::stat::fstatat(parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(nix::errno::Errno::ENOENT) => "nothing (it was removed)",
        Err(_) => "something that cannot be examined",
        Ok(stat) => match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFLNK => "a symlink",
            SFlag::S_IFDIR => "a directory (that cannot be opened)",
            SFlag::S_IFREG => "a regular file",
            _ => "a device, fifo or socket",
        },
    }
}

/// The error for a directory entry whose path (`prefix`: the directory itself or a parent) no longer leads
/// to a directory when its mode and times are applied.
fn replaced_dir_error(relative: &[u8], prefix: &[u8], now: &str, errno: nix::errno::Errno) -> Error {
    let mut shown = relative.to_vec();
    shown.push(b'/');
    let prefix = String::from_utf8_lossy(prefix);
    unsafe_entry(
        &shown,
        format!(
            "a later entry of the layer replaced the directory {prefix:?} by {now} ({errno}); its mode and \
             times are not applied through it"
        ),
    )
}

fn unsafe_entry(path: &[u8], reason: impl Into<String>) -> Error {
    Error::UnsafeEntry {
        path: String::from_utf8_lossy(path).into_owned(),
        reason: reason.into(),
    }
}

/// Makes sure every ancestor of `relative` is a real directory inside `dest` (creating missing ones),
/// never following a symlink.
fn prepare_parents(dest: &Path, relative: &[u8], raw: &[u8]) -> Result<(), Error> {
    let mut current = dest.to_path_buf();
    let parts: Vec<&[u8]> = relative.split(|b| *b == b'/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        current.push(OsStr::from_bytes(part));
        match current.symlink_metadata() {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(unsafe_entry(
                    raw,
                    format!("it goes through the symlink {}", current.display()),
                ));
            }
            Ok(_) => {
                return Err(unsafe_entry(
                    raw,
                    format!("its parent {} is not a directory", current.display()),
                ));
            }
            Err(_) => {
                std::fs::create_dir(&current).map_err(|e| Error::io("creating", &current, e))?;
            }
        }
    }
    Ok(())
}

fn remove_existing(path: &Path) -> Result<(), Error> {
    match path.symlink_metadata() {
        Ok(meta) if meta.is_dir() => {
            std::fs::remove_dir_all(path).map_err(|e| Error::io("removing", path, e))
        }
        Ok(_) => std::fs::remove_file(path).map_err(|e| Error::io("removing", path, e)),
        Err(_) => Ok(()),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("setting mode of", path, e))
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, mode: u32, major: u64, minor: u64) -> Result<(), Error> {
    let perm = nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777);
    nix::sys::stat::mknod(path, kind, perm, nix::sys::stat::makedev(major, minor))
        .map_err(|e| Error::io("creating device node", path, std::io::Error::from(e)))
}

/// `pax`: the entry's raw PAX records ([`super::EntryPax`]).
fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    pax: Option<&[u8]>,
    dest: &Path,
    options: UnpackOptions,
    dirs: &mut Vec<DirTimes>,
    flatten: Option<&mut HashSet<Vec<u8>>>,
) -> Result<(), Error> {
    let raw = entry.path_bytes().into_owned();
    let relative = sanitize_entry_path(&raw)?;
    let shown = String::from_utf8_lossy(&raw).into_owned();
    let tar_err = |source| Error::Tar {
        context: format!("reading entry {shown}"),
        source,
    };
    let header = entry.header().clone();
    let entry_type = header.entry_type();
    if relative.is_empty() {
        return Ok(()); // the root directory itself
    }
    prepare_parents(dest, &relative, &raw)?;
    let (parent, name) = match relative.iter().rposition(|b| *b == b'/') {
        Some(i) => (&relative[..i], &relative[i + 1..]),
        None => (&b""[..], &relative[..]),
    };
    let parent_path = dest.join(OsStr::from_bytes(parent));
    if let Some(created) = flatten {
        if name == OPAQUE_MARKER.as_bytes() {
            let children =
                std::fs::read_dir(&parent_path).map_err(|e| Error::io("listing", &parent_path, e))?;
            for child in children {
                let child = child.map_err(|e| Error::io("listing", &parent_path, e))?;
                let child_relative = join(parent, child.file_name().as_bytes());
                if !created.contains(&child_relative) {
                    remove_existing(&child.path())?;
                }
            }
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(unsafe_entry(&raw, "malformed whiteout name"));
            }
            if !created.contains(&join(parent, hidden)) {
                remove_existing(&parent_path.join(OsStr::from_bytes(hidden)))?;
            }
            return Ok(());
        }
        created.insert(relative.clone());
    }
    if name == OPAQUE_MARKER.as_bytes() {
        xattr::set(&parent_path, options.opaque_xattr.name(), b"y")
            .map_err(|e| Error::io("marking opaque", &parent_path, e))?;
        return Ok(());
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        if hidden.is_empty()
            || hidden == b"."
            || hidden == b".."
            || hidden.starts_with(WHITEOUT_PREFIX.as_bytes())
        {
            return Err(unsafe_entry(&raw, "malformed whiteout name"));
        }
        let target = parent_path.join(OsStr::from_bytes(hidden));
        remove_existing(&target)?;
        mknod(&target, nix::sys::stat::SFlag::S_IFCHR, 0, 0, 0)?;
        return Ok(());
    }
    let path = dest.join(OsStr::from_bytes(&relative));
    let mode = header.mode().map_err(tar_err)? & 0o7777;
    let mtime = i64::try_from(header.mtime().map_err(tar_err)?).unwrap_or(0);
    if entry_type.is_dir() {
        match path.symlink_metadata() {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                remove_existing(&path)?;
                std::fs::create_dir(&path).map_err(|e| Error::io("creating", &path, e))?;
            }
            Err(_) => std::fs::create_dir(&path).map_err(|e| Error::io("creating", &path, e))?,
        }
        dirs.push(DirTimes {
            relative: relative.clone(),
            mode,
            mtime,
        });
    } else {
        remove_existing(&path)?;
        match entry_type {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| Error::io("creating", &path, e))?;
                std::io::copy(entry, &mut file).map_err(|e| Error::io("writing", &path, e))?;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .map(std::borrow::Cow::into_owned)
                    .ok_or_else(|| unsafe_entry(&raw, "hard link without a target"))?;
                let target = sanitize_entry_path(&target_raw).map_err(|_| {
                    unsafe_entry(
                        &raw,
                        format!(
                            "hard link to {:?} leaves the layer",
                            String::from_utf8_lossy(&target_raw)
                        ),
                    )
                })?;
                if target.is_empty() {
                    return Err(unsafe_entry(&raw, "hard link to the root"));
                }
                let target_name = target.rsplit(|b| *b == b'/').next().unwrap_or_default();
                if target_name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                    return Err(hard_link_to_whiteout(&raw, &target));
                }
                prepare_parents(dest, &target, &raw)?;
                let target_path = dest.join(OsStr::from_bytes(&target));
                match target_path.symlink_metadata() {
                    Ok(meta) if is_whiteout(&meta) => return Err(hard_link_to_whiteout(&raw, &target)),
                    Ok(meta) if !meta.is_dir() => {}
                    _ => {
                        return Err(unsafe_entry(
                            &raw,
                            format!(
                                "hard link target {:?} is not a file of this layer",
                                String::from_utf8_lossy(&target)
                            ),
                        ));
                    }
                }
                std::fs::hard_link(&target_path, &path).map_err(|e| Error::io("linking", &path, e))?;
                return Ok(()); // a link shares its target's metadata
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default();
                if symlink_escapes(parent, &target) {
                    return Err(unsafe_entry(
                        &raw,
                        format!(
                            "symlink to {:?} climbs above the root",
                            String::from_utf8_lossy(&target)
                        ),
                    ));
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| Error::io("creating symlink", &path, e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = u64::from(header.device_major().map_err(tar_err)?.unwrap_or(0));
                let minor = u64::from(header.device_minor().map_err(tar_err)?.unwrap_or(0));
                let kind = if entry_type == tar::EntryType::Char {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                mknod(&path, kind, mode, major, minor)?;
            }
            tar::EntryType::Fifo => mknod(&path, nix::sys::stat::SFlag::S_IFIFO, mode, 0, 0)?,
            other => {
                tracing::warn!(path = %shown, kind = ?other, "skipping a layer entry of an unsupported kind");
                return Ok(());
            }
        }
    }
    let is_symlink = entry_type == tar::EntryType::Symlink;
    if options.preserve_owners {
        let uid = u32::try_from(entry.header().uid().map_err(tar_err)?).unwrap_or(0);
        let gid = u32::try_from(entry.header().gid().map_err(tar_err)?).unwrap_or(0);
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .map_err(|e| Error::io("setting owner of", &path, e))?;
    }
    if let Some(data) = pax {
        for (key, value) in super::pax_records(data).map_err(tar_err)? {
            let Some(name) = key.strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            if is_overlay_xattr(name) || is_symlink {
                continue;
            }
            xattr::set(&path, OsStr::from_bytes(name), value)
                .map_err(|e| Error::io("setting xattrs of", &path, e))?;
        }
    }
    if !is_symlink && !entry_type.is_dir() {
        // After chown: chown clears set-id bits.
        set_mode(&path, mode)?;
    }
    if !entry_type.is_dir() {
        let time = filetime::FileTime::from_unix_time(mtime, 0);
        filetime::set_symlink_file_times(&path, time, time)
            .map_err(|e| Error::io("setting times of", &path, e))?;
    }
    Ok(())
}

/// Whether a file is a whiteout in overlay form (a char device 0:0).
fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// The error for a hard link whose target is a deletion (`.wh.<name>`, or what one turned into a char
/// device 0:0): linking it would make the link a deletion too.
fn hard_link_to_whiteout(raw: &[u8], target: &[u8]) -> Error {
    unsafe_entry(
        raw,
        format!(
            "hard link target {:?} is a whiteout (a deletion), not a file",
            String::from_utf8_lossy(target)
        ),
    )
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

/// Whether a relative symlink target, resolved from the directory `parent` (relative to the root), climbs
/// above the root.
fn symlink_escapes(parent: &[u8], target: &[u8]) -> bool {
    if target.starts_with(b"/") {
        return false;
    }
    let mut depth: i64 = parent.split(|b| *b == b'/').filter(|p| !p.is_empty()).count() as i64;
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    use std::path::Path;

    use super::{UnpackOptions, apply_layer, symlink_escapes, unpack_layer};
    use crate::overlay::Error;

    /// A tar entry of a hand-made layer: path, kind, mode, link target.
    fn entry(builder: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, mode: u32, link: &str) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(0);
        if !link.is_empty() {
            header.set_link_name(link).expect("link name");
        }
        builder
            .append_data(&mut header, path, std::io::empty())
            .expect("append");
    }

    /// A directory outside the unpack root, with a known mode and mtime; returns (its tempdir, the dir).
    fn host_dir() -> (tempfile::TempDir, std::path::PathBuf) {
        let host = tempfile::tempdir().expect("tempdir");
        let dir = host.path().join("victim");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let time = filetime::FileTime::from_unix_time(1_700_000_000, 0);
        filetime::set_file_times(&dir, time, time).expect("utimes");
        (host, dir)
    }

    fn assert_untouched(dir: &Path) {
        let meta = dir.metadata().expect("host dir");
        assert_eq!(meta.mode() & 0o7777, 0o700, "mode of {} changed", dir.display());
        assert_eq!(meta.mtime(), 1_700_000_000, "mtime of {} changed", dir.display());
    }

    fn unpack_both_ways(layer: &[u8]) -> Vec<Error> {
        let overlay = tempfile::tempdir().expect("tempdir");
        let flat = tempfile::tempdir().expect("tempdir");
        vec![
            unpack_layer(layer, overlay.path(), UnpackOptions::default()).expect_err("overlay form: refused"),
            apply_layer(layer, flat.path()).expect_err("flattening: refused"),
        ]
    }

    #[test]
    fn a_directory_replaced_by_a_symlink_is_refused_and_the_host_is_untouched() {
        let (_host, victim) = host_dir();
        let mut builder = tar::Builder::new(Vec::new());
        entry(&mut builder, "etc/", tar::EntryType::Directory, 0o755, "");
        entry(&mut builder, "etc/evil/", tar::EntryType::Directory, 0o777, "");
        let target = victim.to_str().expect("utf-8 path");
        entry(&mut builder, "etc/evil", tar::EntryType::Symlink, 0o777, target);
        let layer = builder.into_inner().expect("tar");
        for error in unpack_both_ways(&layer) {
            let message = error.to_string();
            assert!(matches!(error, Error::UnsafeEntry { .. }), "{message}");
            assert!(
                message.contains(r#""etc/evil/""#)
                    && message.contains(r#"directory "etc/evil" by a symlink"#),
                "{message}"
            );
            assert_untouched(&victim);
        }
    }

    #[test]
    fn a_parent_replaced_by_a_symlink_is_refused_and_the_host_is_untouched() {
        let (host, victim) = host_dir();
        let mut builder = tar::Builder::new(Vec::new());
        entry(&mut builder, "a/", tar::EntryType::Directory, 0o755, "");
        entry(&mut builder, "a/victim/", tar::EntryType::Directory, 0o777, "");
        let target = host.path().to_str().expect("utf-8 path");
        entry(&mut builder, "a", tar::EntryType::Symlink, 0o777, target);
        let layer = builder.into_inner().expect("tar");
        for error in unpack_both_ways(&layer) {
            let message = error.to_string();
            assert!(
                message.contains(r#""a/victim/""#) && message.contains(r#"directory "a" by a symlink"#),
                "{message}"
            );
            assert_untouched(&victim);
        }
    }

    #[test]
    fn a_directory_replaced_by_a_file_is_refused() {
        let mut builder = tar::Builder::new(Vec::new());
        entry(&mut builder, "d/", tar::EntryType::Directory, 0o4777, "");
        entry(&mut builder, "d", tar::EntryType::Regular, 0o644, "");
        let layer = builder.into_inner().expect("tar");
        for error in unpack_both_ways(&layer) {
            assert!(
                error.to_string().contains(r#"directory "d" by a regular file"#),
                "{error}"
            );
        }
    }

    #[test]
    fn a_hard_link_to_a_whiteout_is_refused() {
        for target in [".wh.gone", "gone"] {
            let mut builder = tar::Builder::new(Vec::new());
            entry(&mut builder, ".wh.gone", tar::EntryType::Regular, 0o644, "");
            entry(&mut builder, "link", tar::EntryType::Link, 0o644, target);
            let layer = builder.into_inner().expect("tar");
            let dest = tempfile::tempdir().expect("tempdir");
            let error = unpack_layer(&layer[..], dest.path(), UnpackOptions::default())
                .expect_err("a link to a deletion is refused");
            assert!(
                error
                    .to_string()
                    .contains(&format!("hard link target {target:?} is a whiteout")),
                "{error}"
            );
            assert!(
                dest.path().join("link").symlink_metadata().is_err(),
                "no link made"
            );
        }
    }

    #[test]
    fn nothing_is_written_through_an_absolute_symlink() {
        use tar::EntryType::{Directory, Link, Regular};
        let (host, victim) = host_dir();
        std::fs::write(victim.join("keep"), "host file").expect("write");
        let time = filetime::FileTime::from_unix_time(1_700_000_000, 0);
        filetime::set_file_times(&victim, time, time).expect("utimes");
        let target = host.path().to_str().expect("utf-8 path");
        // (entry through `escape/`, its kind, link target): each must be refused, in both forms.
        let cases: [(&str, tar::EntryType, &str); 6] = [
            ("escape/victim/new", Regular, ""),
            ("escape/victim/new-dir/", Directory, ""),
            ("escape/victim/.wh.keep", Regular, ""),
            ("escape/victim/.wh..wh..opq", Regular, ""),
            ("escape/victim/link", Link, "file"),
            ("stolen", Link, "escape/victim/keep"),
        ];
        for (path, kind, link) in cases {
            let mut builder = tar::Builder::new(Vec::new());
            entry(&mut builder, "file", Regular, 0o644, "");
            entry(&mut builder, "escape", tar::EntryType::Symlink, 0o777, target);
            entry(&mut builder, path, kind, 0o644, link);
            let layer = builder.into_inner().expect("tar");
            for error in unpack_both_ways(&layer) {
                assert!(
                    error.to_string().contains("goes through the symlink"),
                    "{path}: {error}"
                );
            }
            let names: Vec<_> = std::fs::read_dir(&victim)
                .expect("host dir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(names, ["keep"], "{path} changed the host directory");
            assert_eq!(
                std::fs::read_to_string(victim.join("keep")).expect("keep"),
                "host file"
            );
            assert_untouched(&victim);
        }
    }

    #[test]
    fn directory_modes_and_times_are_applied_after_their_content() {
        let mut builder = tar::Builder::new(Vec::new());
        entry(&mut builder, "d/", tar::EntryType::Directory, 0o555, "");
        entry(&mut builder, "d/e/", tar::EntryType::Directory, 0o705, "");
        entry(&mut builder, "d/e/f", tar::EntryType::Regular, 0o644, "");
        let layer = builder.into_inner().expect("tar");
        let dest = tempfile::tempdir().expect("tempdir");
        unpack_layer(&layer[..], dest.path(), UnpackOptions::default()).expect("unpack");
        for (path, mode) in [("d", 0o555), ("d/e", 0o705)] {
            let meta = dest.path().join(path).symlink_metadata().expect("dir");
            assert!(meta.is_dir());
            assert_eq!((meta.mode() & 0o7777, meta.mtime()), (mode, 0), "{path}");
        }
    }

    #[test]
    fn symlinks_that_climb_above_the_root_are_detected() {
        assert!(symlink_escapes(b"", b"../etc/passwd"));
        assert!(symlink_escapes(b"a", b"../../x"));
        assert!(!symlink_escapes(b"a/b", b"../../x"));
        assert!(!symlink_escapes(b"bin", b"/bin/busybox"));
        assert!(!symlink_escapes(b"usr/lib", b"../../lib/x"));
    }
}
