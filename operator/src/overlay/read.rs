//! OCI layer tar → directory in overlay form (a lower dir).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::{Error, OPAQUE_MARKER, OpaqueXattr, WHITEOUT_PREFIX, is_overlay_xattr, sanitize_entry_path};

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

struct DirTimes {
    path: PathBuf,
    mode: u32,
    mtime: i64,
}

/// Unpacks an (uncompressed) OCI layer tar into `dest` (an existing, normally empty directory) in overlay
/// form: `.wh.<name>` becomes a char device 0:0 `<name>`, `.wh..wh..opq` sets the opaque xattr on its
/// directory. Refuses (with [`Error::UnsafeEntry`]) absolute paths, `..`, entries reached through a
/// symlink, hard links outside the layer, and relative symlinks that climb above the root (absolute symlink
/// targets are fine: they resolve inside the root at run time). Overlay's own xattrs in a layer are dropped.
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
    let mut archive = tar::Archive::new(input);
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
            unpack_entry(&mut entry, dest, options, &mut dirs, flatten.as_deref_mut())?;
            count += 1;
        }
    }
    // Directory modes and times last: writing children would change them, and a read-only dir would block.
    for dir in dirs.iter().rev() {
        set_mode(&dir.path, dir.mode)?;
        let time = filetime::FileTime::from_unix_time(dir.mtime, 0);
        filetime::set_file_times(&dir.path, time, time)
            .map_err(|e| Error::io("setting times of", &dir.path, e))?;
    }
    Ok((archive.into_inner(), count))
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

fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
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
            path: path.clone(),
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
                prepare_parents(dest, &target, &raw)?;
                let target_path = dest.join(OsStr::from_bytes(&target));
                match target_path.symlink_metadata() {
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
    if let Some(extensions) = entry.pax_extensions().map_err(tar_err)? {
        for extension in extensions {
            let extension = extension.map_err(tar_err)?;
            let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            if is_overlay_xattr(name) || is_symlink {
                continue;
            }
            xattr::set(&path, OsStr::from_bytes(name), extension.value_bytes())
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
    use super::symlink_escapes;

    #[test]
    fn symlinks_that_climb_above_the_root_are_detected() {
        assert!(symlink_escapes(b"", b"../etc/passwd"));
        assert!(symlink_escapes(b"a", b"../../x"));
        assert!(!symlink_escapes(b"a/b", b"../../x"));
        assert!(!symlink_escapes(b"bin", b"/bin/busybox"));
        assert!(!symlink_escapes(b"usr/lib", b"../../lib/x"));
    }
}
