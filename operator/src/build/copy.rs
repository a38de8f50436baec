//! `COPY`/`ADD` into a mounted image root (run in the short-lived child of
//! [`crate::runtime::root::with_mounted_root`]): every destination resolved inside the root (the image's
//! links followed without leaving it), modes and times kept, owners root or `--chown`, `--chmod`, local
//! tar archives extracted by `ADD`.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use super::context::{Context, Ignore, Selected, join_in_root};

/// One `COPY`/`ADD` to carry out.
#[derive(Debug, Clone)]
pub struct CopyJob {
    /// Where sources are read: the context directory, or (for `--from`) the layers of a stage or image
    /// (top first), mounted read-only in the child.
    pub source: CopySource,
    /// The expanded source words.
    pub sources: Vec<String>,
    /// Entries selected in the parent (context sources); empty for `--from` (selected in the child).
    pub groups: Vec<(String, Vec<Selected>)>,
    /// Absolute destination inside the image.
    pub dest: String,
    /// The destination names a directory (ends with `/`, or several sources).
    pub dest_is_dir: bool,
    /// `--chown` (uid, gid); root otherwise.
    pub owner: Option<(u32, u32)>,
    /// `--chmod`.
    pub chmod: Option<u32>,
    /// `ADD`: extract local tar archives (plain or gzip).
    pub extract_archives: bool,
}

/// Where a copy reads from.
#[derive(Debug, Clone)]
pub enum CopySource {
    /// A build context directory (with its `.dockerignore`).
    Context(Context),
    /// The layers of a stage or an image, top first; mounted at `mount_at` (with `state_dir` for the
    /// overlay's links) in the child.
    Layers {
        /// Layer directories, top first.
        lower_dirs: Vec<PathBuf>,
        /// An empty directory to mount them on.
        mount_at: PathBuf,
    },
}

/// Carries out `job` in the image root `root`. Returns how many entries were written.
pub fn copy_into(root: &Path, job: &CopyJob) -> Result<u64, String> {
    let (context, groups) = match &job.source {
        CopySource::Context(context) => (context.clone(), job.groups.clone()),
        CopySource::Layers { lower_dirs, mount_at } => {
            mount_layers(lower_dirs, mount_at)?;
            let context = Context {
                dir: mount_at.clone(),
                ignore: Ignore::default(),
            };
            let groups = context
                .select(&job.sources)
                .map_err(|e| format!("COPY --from: {e}"))?;
            (context, groups)
        }
    };
    let mut written = 0;
    let dest_is_dir = job.dest_is_dir || groups.len() > 1;
    for (matched, entries) in &groups {
        let source_path = context.dir.join(matched);
        let meta = fs::symlink_metadata(&source_path).map_err(|e| format!("{matched}: {e}"))?;
        if meta.is_dir() {
            ensure_dir(root, &job.dest, job.owner)?;
            for entry in entries {
                let target = format!("{}/{}", job.dest.trim_end_matches('/'), entry.relative);
                written += copy_entry(root, &context.dir.join(&entry.source), &target, job)?;
            }
            continue;
        }
        if job.extract_archives && meta.is_file() && is_tar_archive(&source_path) {
            ensure_dir(root, &job.dest, job.owner)?;
            written += extract(root, &source_path, &job.dest)?;
            continue;
        }
        let existing_dir = fs::metadata(join_in_root(root, Path::new(&job.dest))).is_ok_and(|m| m.is_dir());
        let target = if dest_is_dir || existing_dir {
            let name = Path::new(matched)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{}/{name}", job.dest.trim_end_matches('/'))
        } else {
            job.dest.clone()
        };
        written += copy_entry(root, &source_path, &target, job)?;
    }
    Ok(written)
}

/// Mounts layers read-only at `at`: an overlay of them, or a bind mount of a single one.
fn mount_layers(lower_dirs: &[PathBuf], at: &Path) -> Result<(), String> {
    fs::create_dir_all(at).map_err(|e| format!("create {}: {e}", at.display()))?;
    match lower_dirs {
        [] => Ok(()),
        [only] => {
            mount(Some(only), at, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(|e| format!("bind {} on {}: {e}", only.display(), at.display()))?;
            Ok(())
        }
        many => {
            let lower: Vec<String> = many.iter().map(|d| d.display().to_string()).collect();
            let mut options = format!("lowerdir={}", lower.join(":"));
            if crate::runtime::root::in_user_namespace() {
                options.push_str(",userxattr");
            }
            mount(
                Some("overlay"),
                at,
                Some("overlay"),
                MsFlags::MS_RDONLY,
                Some(options.as_str()),
            )
            .map_err(|e| {
                format!(
                    "mount the source stage ({} layers) on {}: {e}",
                    many.len(),
                    at.display()
                )
            })
        }
    }
}

/// Creates the directory `path` (inside the image) and its missing parents (mode 755, owned by `owner`
/// or root).
fn ensure_dir(root: &Path, path: &str, owner: Option<(u32, u32)>) -> Result<(), String> {
    let mut current = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        current.push('/');
        current.push_str(part);
        let host = join_in_root(root, Path::new(&current));
        match fs::metadata(&host) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("{current} exists in the image and is not a directory")),
            Err(_) => {
                fs::create_dir(&host).map_err(|e| format!("create {current}: {e}"))?;
                fs::set_permissions(&host, fs::Permissions::from_mode(0o755))
                    .map_err(|e| format!("chmod {current}: {e}"))?;
                let (uid, gid) = owner.unwrap_or((0, 0));
                std::os::unix::fs::lchown(&host, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {current}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Copies one file, link or directory (not its contents) to `target` (inside the image).
fn copy_entry(root: &Path, source: &Path, target: &str, job: &CopyJob) -> Result<u64, String> {
    let meta = fs::symlink_metadata(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let parent = Path::new(target)
        .parent()
        .map_or_else(|| "/".to_owned(), |p| p.display().to_string());
    ensure_dir(root, &parent, job.owner)?;
    let name = Path::new(target).file_name().unwrap_or_default();
    let host = join_in_root(root, Path::new(&parent)).join(name);
    let fail = |what: &str, e: std::io::Error| format!("{what} {target}: {e}");
    let existing = fs::symlink_metadata(&host).ok();
    if meta.is_dir() {
        match existing {
            Some(existing) if existing.is_dir() => {}
            Some(_) => {
                fs::remove_file(&host).map_err(|e| fail("replace", e))?;
                fs::create_dir(&host).map_err(|e| fail("create", e))?;
            }
            None => fs::create_dir(&host).map_err(|e| fail("create", e))?,
        }
    } else {
        if let Some(existing) = existing {
            if existing.is_dir() {
                return Err(format!(
                    "cannot copy {} onto the directory {target}: end the destination with / to copy into it",
                    source.display()
                ));
            }
            fs::remove_file(&host).map_err(|e| fail("replace", e))?;
        }
        if meta.file_type().is_symlink() {
            let link = fs::read_link(source).map_err(|e| fail("read link for", e))?;
            symlink(&link, &host).map_err(|e| fail("link", e))?;
        } else if meta.is_file() {
            fs::copy(source, &host).map_err(|e| fail("copy to", e))?;
        } else {
            // Devices, sockets and FIFOs in a context are skipped, as Docker does for sockets.
            return Ok(0);
        }
    }
    let (uid, gid) = job.owner.unwrap_or((0, 0));
    std::os::unix::fs::lchown(&host, Some(uid), Some(gid)).map_err(|e| fail("chown", e))?;
    if !meta.file_type().is_symlink() {
        let mode = job.chmod.unwrap_or(meta.permissions().mode() & 0o7777);
        fs::set_permissions(&host, fs::Permissions::from_mode(mode)).map_err(|e| fail("chmod", e))?;
    }
    let mtime = filetime::FileTime::from_last_modification_time(&meta);
    filetime::set_symlink_file_times(&host, mtime, mtime).map_err(|e| fail("set times of", e))?;
    Ok(1)
}

/// A plain or gzip-compressed tar archive (by its magic numbers).
fn is_tar_archive(path: &Path) -> bool {
    let Ok(mut file) = fs::File::open(path) else {
        return false;
    };
    let mut header = [0u8; 512];
    let Ok(read) = file.read(&mut header) else {
        return false;
    };
    if read >= 2 && header[..2] == [0x1f, 0x8b] {
        return true;
    }
    read >= 262 && &header[257..262] == b"ustar"
}

/// Extracts a tar archive into `dest` (inside the image), owners and modes as archived; entries that
/// would land outside the destination are refused by the tar reader.
fn extract(root: &Path, archive: &Path, dest: &str) -> Result<u64, String> {
    let file = fs::File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut magic = [0u8; 2];
    let gzip = fs::File::open(archive)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == [0x1f, 0x8b];
    let reader: Box<dyn std::io::Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(true);
    tar.set_preserve_mtime(true);
    tar.set_overwrite(true);
    let target = join_in_root(root, Path::new(dest));
    let mut count = 0;
    for entry in tar
        .entries()
        .map_err(|e| format!("reading {}: {e}", archive.display()))?
    {
        let mut entry = entry.map_err(|e| format!("reading {}: {e}", archive.display()))?;
        let unpacked = entry
            .unpack_in(&target)
            .map_err(|e| format!("extracting {} into {dest}: {e}", archive.display()))?;
        if unpacked {
            count += 1;
        }
    }
    Ok(count)
}
