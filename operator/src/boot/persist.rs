//! `/persist`: the one read-write export of the boot service. Each (device, tenant) gets its own
//! directory on the boot service's host, `--persist-dir`/`<device>`/`<tenant>`, exported at WalT's
//! path `/var/lib/walt/nodes/<mac|ip|hostname>/persist` to the device alone; walt's `walt-init`
//! mounts it on the node's `/persist`. A device lent to another tenant gets that tenant's
//! directory (empty at first), never the previous tenant's.
//!
//! Containment is the kernel's, not string checks alone: every path is resolved from the directory's
//! own descriptor with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` and every
//! name is created or removed relative to a directory descriptor (`mkdirat`, `unlinkat`,
//! `renameat`, …), so no symlink a node made, and no `..`, ever leads outside. Names with `/`, `.`,
//! `..` or NUL are refused before any system call.
//!
//! File handles name the directory (a hash of device and tenant) and the inode number: they stay
//! valid across restarts of the boot service (a handle whose path is not known yet is found again by
//! walking the directory, inside it).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};

use super::nfs::status;
use super::rpc::{Refusal, UnixCred};
use super::xdr::{Reader, Writer, XdrError};

/// The last component of the export path (`/var/lib/walt/nodes/<key>/persist`).
pub const EXPORT_NAME: &str = "persist";

const HANDLE_MAGIC: &[u8; 4] = b"wnp1";

/// Longest file name (as Linux's).
pub const NAME_MAX: usize = 255;

/// Most entries a walk of one directory tree visits when looking for a handle's inode.
const MAX_WALK: usize = 1_000_000;

/// Largest WRITE accepted (and advertised in FSINFO).
pub const MAX_WRITE: u32 = super::nfs::MAX_READ;

/// Errors of preparing a persistent directory.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A device or tenant name cannot name a directory.
    #[error(
        "{what} {name:?} cannot name a persistent directory (letters, digits, '.', '-', '_'; not . or ..)"
    )]
    BadName {
        /// `device` or `tenant`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A directory could not be made or opened.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: Errno,
    },
}

/// Who a persistent directory belongs to: a device, while lent to a tenant (a namespace).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PersistOwner {
    /// The device (its Device name; the node name for a `--device` without one).
    pub device: String,
    /// The tenant (the bound Node's namespace).
    pub tenant: String,
}

/// Whether `name` may name a directory under `--persist-dir` (pure): a Kubernetes object name or
/// namespace fits; `.`, `..`, `/`, an empty or overlong name does not.
pub fn valid_component(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl PersistOwner {
    /// An owner whose names are valid directory names.
    pub fn new(device: &str, tenant: &str) -> Result<Self, PersistError> {
        for (what, name) in [("device", device), ("tenant", tenant)] {
            if !valid_component(name) {
                return Err(PersistError::BadName {
                    what,
                    name: name.to_string(),
                });
            }
        }
        Ok(PersistOwner {
            device: device.to_string(),
            tenant: tenant.to_string(),
        })
    }

    /// Its directory under `base` (pure): `base/<device>/<tenant>`.
    pub fn dir(&self, base: &Path) -> PathBuf {
        base.join(&self.device).join(&self.tenant)
    }

    /// The 8 bytes that name its directory in file handles (pure): a hash of device and tenant, so
    /// a handle of one tenant's directory never names another's.
    pub fn key(&self) -> [u8; 8] {
        let mut hasher = Sha256::new();
        hasher.update(b"walt-persist\0");
        hasher.update(self.device.as_bytes());
        hasher.update([0]);
        hasher.update(self.tenant.as_bytes());
        let hash = hasher.finalize();
        let mut key = [0; 8];
        key.copy_from_slice(&hash[..8]);
        key
    }
}

/// A file handle of a persistent directory: magic, the directory's key, the inode number.
pub fn handle(key: [u8; 8], ino: u64) -> Vec<u8> {
    super::nfs::encode_handle(*HANDLE_MAGIC, key, ino)
}

/// The directory key and inode number of a persistent directory's handle.
pub fn parse_handle(fh: &[u8]) -> Option<([u8; 8], u64)> {
    super::nfs::decode_handle(*HANDLE_MAGIC, fh)
}

/// Whether a handle is a persistent directory's (its magic), whatever else it says.
pub fn is_handle(fh: &[u8]) -> bool {
    fh.starts_with(HANDLE_MAGIC)
}

/// Checks a name a client gives for an entry to make, remove or rename (pure): one component, not
/// `.` or `..`; the NFS status to answer otherwise.
pub fn check_name(name: &[u8]) -> Result<&OsStr, u32> {
    if name.len() > NAME_MAX {
        return Err(status::NAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(status::ACCES);
    }
    Ok(OsStr::from_bytes(name))
}

/// The NFS status of a system call's error.
pub fn nfs_status(errno: Errno) -> u32 {
    match errno {
        Errno::EPERM => 1,
        Errno::ENOENT => status::NOENT,
        Errno::EACCES => status::ACCES,
        Errno::EEXIST => 17,
        // A mount inside the directory (RESOLVE_NO_XDEV) or a link across filesystems.
        Errno::EXDEV => 18,
        Errno::ENOTDIR => status::NOTDIR,
        Errno::EISDIR => status::ISDIR,
        // ELOOP: a symlink where a directory or file was expected (never followed).
        Errno::EINVAL | Errno::ELOOP => status::INVAL,
        Errno::EFBIG => 27,
        Errno::ENOSPC => 28,
        Errno::EROFS => status::ROFS,
        Errno::EMLINK => 31,
        Errno::ENAMETOOLONG => status::NAMETOOLONG,
        Errno::ENOTEMPTY => 66,
        Errno::EDQUOT => DQUOT,
        Errno::ESTALE => status::STALE,
        Errno::EOPNOTSUPP => NOTSUPP,
        _ => status::IO,
    }
}

const DQUOT: u32 = 69;
const NOTSUPP: u32 = 10004;

/// How a SETATTR (or a CREATE's attributes) sets a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    /// Leave it.
    Keep,
    /// The server's time.
    Now,
    /// The client's (seconds, nanoseconds).
    At(u32, u32),
}

/// The attributes a client asks to set (`sattr3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size (regular files).
    pub size: Option<u64>,
    /// Access time.
    pub atime: SetTime,
    /// Modification time.
    pub mtime: SetTime,
}

fn optional_u32(r: &mut Reader<'_>) -> Result<Option<u32>, XdrError> {
    Ok(if r.bool()? { Some(r.u32()?) } else { None })
}

fn set_time(r: &mut Reader<'_>) -> Result<SetTime, XdrError> {
    Ok(match r.u32()? {
        0 => SetTime::Keep,
        1 => SetTime::Now,
        2 => SetTime::At(r.u32()?, r.u32()?),
        _ => return Err(XdrError("bad time_how")),
    })
}

impl SetAttr {
    /// Decodes a `sattr3`.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, XdrError> {
        Ok(SetAttr {
            mode: optional_u32(r)?,
            uid: optional_u32(r)?,
            gid: optional_u32(r)?,
            size: if r.bool()? { Some(r.u64()?) } else { None },
            atime: set_time(r)?,
            mtime: set_time(r)?,
        })
    }

    /// Nothing to set.
    pub fn is_empty(&self) -> bool {
        *self
            == SetAttr {
                mode: None,
                uid: None,
                gid: None,
                size: None,
                atime: SetTime::Keep,
                mtime: SetTime::Keep,
            }
    }
}

fn timespec(time: SetTime) -> TimeSpec {
    match time {
        SetTime::Keep => TimeSpec::UTIME_OMIT,
        SetTime::Now => TimeSpec::UTIME_NOW,
        SetTime::At(secs, nanos) => TimeSpec::new(i64::from(secs), i64::from(nanos)),
    }
}

/// The NFS file type of a `stat` mode.
fn ftype(mode: u32) -> u32 {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => 1,
        SFlag::S_IFDIR => 2,
        SFlag::S_IFBLK => 3,
        SFlag::S_IFCHR => 4,
        SFlag::S_IFLNK => 5,
        SFlag::S_IFSOCK => 6,
        _ => 7,
    }
}

fn is(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == kind
}

fn clamp_secs(secs: i64) -> u32 {
    secs.clamp(0, i64::from(u32::MAX)) as u32
}

/// Writes a `fattr3` from `stat`.
fn fattr(w: &mut Writer, fsid: u64, st: &FileStat) {
    w.u32(ftype(st.st_mode))
        .u32(st.st_mode & 0o7777)
        .u32(u32::try_from(st.st_nlink).unwrap_or(u32::MAX))
        .u32(st.st_uid)
        .u32(st.st_gid);
    w.u64(st.st_size.max(0) as u64)
        .u64(st.st_blocks.max(0) as u64 * 512);
    w.u32(libc::major(st.st_rdev)).u32(libc::minor(st.st_rdev));
    w.u64(fsid).u64(st.st_ino);
    for (secs, nanos) in [
        (st.st_atime, st.st_atime_nsec),
        (st.st_mtime, st.st_mtime_nsec),
        (st.st_ctime, st.st_ctime_nsec),
    ] {
        w.u32(clamp_secs(secs)).u32(nanos.clamp(0, 999_999_999) as u32);
    }
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

fn open_beneath(dir: impl AsFd, path: &Path, flags: OFlag) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(resolve_flags());
    nix::fcntl::openat2(dir, path, how)
}

/// Where one inode of the directory was last seen: its parent directory and its name there.
type Names = HashMap<u64, (u64, Vec<u8>)>;

/// One (device, tenant)'s persistent directory, open.
#[derive(Debug)]
pub struct PersistDir {
    owner: PersistOwner,
    key: [u8; 8],
    root: OwnedFd,
    root_ino: u64,
    dev: u64,
    names: Mutex<Names>,
    quota: Option<u64>,
    /// Bytes of regular files, counted at the first write when a quota is set.
    used: Mutex<Option<u64>>,
}

/// What a call found: the inode, its descriptor (`O_PATH` unless asked otherwise) and its `stat`.
struct Found {
    ino: u64,
    fd: OwnedFd,
    st: FileStat,
}

impl PersistDir {
    /// Opens (making it when missing) `owner`'s directory under `base`; `quota` bounds the bytes
    /// of its regular files.
    pub fn open(base: &Path, owner: PersistOwner, quota: Option<u64>) -> Result<Self, PersistError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| PersistError::Io { action, path, source }
        };
        std::fs::create_dir_all(base)
            .map_err(|e| io("making", base)(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        let base_fd = nix::fcntl::open(
            base,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("opening", base))?;
        // The device's directory is the lab's (0700); the tenant's is the node's root directory.
        let mut dir = base_fd;
        for (name, mode) in [(&owner.device, 0o700), (&owner.tenant, 0o755)] {
            let shown = owner.dir(base);
            match nix::sys::stat::mkdirat(&dir, name.as_str(), Mode::from_bits_truncate(mode)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(io("making", &shown)(e)),
            }
            dir = open_beneath(&dir, Path::new(name), OFlag::O_PATH | OFlag::O_DIRECTORY)
                .map_err(io("opening", &shown))?;
        }
        let st = nix::sys::stat::fstat(&dir).map_err(io("reading", &owner.dir(base)))?;
        Ok(PersistDir {
            key: owner.key(),
            owner,
            root: dir,
            root_ino: st.st_ino,
            dev: st.st_dev,
            names: Mutex::new(HashMap::new()),
            quota,
            used: Mutex::new(None),
        })
    }

    /// Its handle key.
    pub fn key(&self) -> [u8; 8] {
        self.key
    }

    /// Its owner.
    pub fn owner(&self) -> &PersistOwner {
        &self.owner
    }

    /// The root's handle.
    pub fn root_handle(&self) -> Vec<u8> {
        handle(self.key, self.root_ino)
    }

    /// The handle of the directory at `inside` (`/`-separated, from the root), resolved beneath
    /// the root without following any link; each step is remembered.
    pub fn resolve_dir(&self, inside: &str) -> Result<Vec<u8>, Errno> {
        let mut dir = self.find_dir(self.root_ino)?;
        for part in inside.split('/').filter(|p| !p.is_empty() && *p != ".") {
            let name = check_name(part.as_bytes()).map_err(|_| Errno::ENOENT)?;
            let (child, st) = self.child(&dir, name)?;
            if !is(&st, SFlag::S_IFDIR) {
                return Err(Errno::ENOTDIR);
            }
            dir = self.find_dir(child)?;
        }
        Ok(handle(self.key, dir.ino))
    }

    fn fsid(&self) -> u64 {
        u64::from_be_bytes(self.key)
    }

    fn names(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The path of `ino` relative to the root, from the names seen (`None`: not known, or a loop).
    fn path_of(&self, ino: u64) -> Option<PathBuf> {
        if ino == self.root_ino {
            return Some(PathBuf::from("."));
        }
        let names = self.names();
        let mut parts = Vec::new();
        let mut at = ino;
        while at != self.root_ino {
            let (parent, name) = names.get(&at)?;
            parts.push(name.clone());
            if parts.len() > 4096 {
                return None;
            }
            at = *parent;
        }
        let mut path = PathBuf::new();
        for part in parts.iter().rev() {
            path.push(OsStr::from_bytes(part));
        }
        Some(path)
    }

    fn remember(&self, ino: u64, parent: u64, name: &[u8]) {
        if ino != self.root_ino {
            self.names().insert(ino, (parent, name.to_vec()));
        }
    }

    /// Forgets `ino` when it was last seen as `parent`/`name` (a removed link).
    fn forget(&self, ino: u64, parent: u64, name: &[u8]) {
        let mut names = self.names();
        if names.get(&ino).is_some_and(|(p, n)| *p == parent && n == name) {
            names.remove(&ino);
        }
    }

    /// Walks the whole directory (from its own descriptor, never following a link) and records
    /// where every inode is: how a handle from before a restart of the boot service is found.
    fn walk(&self) {
        let mut found: Names = HashMap::new();
        let mut queue = VecDeque::from([(self.root_ino, PathBuf::from("."))]);
        let mut visited = 0;
        while let Some((dir_ino, path)) = queue.pop_front() {
            let Ok(fd) = open_beneath(&self.root, &path, OFlag::O_RDONLY | OFlag::O_DIRECTORY) else {
                continue;
            };
            let Ok(dir) = nix::dir::Dir::from_fd(fd) else {
                continue;
            };
            for entry in dir.into_iter().flatten() {
                let name = entry.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                visited += 1;
                if visited > MAX_WALK {
                    break;
                }
                found.insert(entry.ino(), (dir_ino, name.to_vec()));
                let child = path.join(OsStr::from_bytes(name));
                // A filesystem that does not say the type in its listing: asked, never followed.
                let is_dir = entry.file_type().map_or_else(
                    || {
                        nix::sys::stat::fstatat(&self.root, &child, AtFlags::AT_SYMLINK_NOFOLLOW)
                            .is_ok_and(|st| is(&st, SFlag::S_IFDIR))
                    },
                    |kind| kind == nix::dir::Type::Directory,
                );
                if is_dir {
                    queue.push_back((entry.ino(), child));
                }
            }
        }
        *self.names() = found;
    }

    /// Opens `ino` with `flags` (plus `O_NOFOLLOW`), checking it is that inode; walks the
    /// directory once when its path is unknown or out of date.
    fn open_ino(&self, ino: u64, flags: OFlag) -> Result<Found, Errno> {
        let attempt = || -> Result<Found, Errno> {
            let path = self.path_of(ino).ok_or(Errno::ESTALE)?;
            let fd = open_beneath(&self.root, &path, flags)?;
            let st = nix::sys::stat::fstat(&fd)?;
            if st.st_ino == ino && st.st_dev == self.dev {
                Ok(Found { ino, fd, st })
            } else {
                Err(Errno::ESTALE)
            }
        };
        match attempt() {
            Err(Errno::ESTALE | Errno::ENOENT) if ino != self.root_ino => {
                self.walk();
                attempt().map_err(|e| if e == Errno::ENOENT { Errno::ESTALE } else { e })
            }
            other => other,
        }
    }

    fn find(&self, ino: u64) -> Result<Found, Errno> {
        self.open_ino(ino, OFlag::O_PATH)
    }

    fn find_dir(&self, ino: u64) -> Result<Found, Errno> {
        self.open_ino(ino, OFlag::O_PATH | OFlag::O_DIRECTORY)
    }

    /// The parent directory of `ino` (the root is its own).
    fn parent_of(&self, ino: u64) -> u64 {
        self.names()
            .get(&ino)
            .map_or(self.root_ino, |(parent, _)| *parent)
    }

    /// Looks `name` up in `dir` without following it; remembers where it is.
    fn child(&self, dir: &Found, name: &OsStr) -> Result<(u64, FileStat), Errno> {
        let st = nix::sys::stat::fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if st.st_dev != self.dev {
            return Err(Errno::EXDEV);
        }
        self.remember(st.st_ino, dir.ino, name.as_bytes());
        Ok((st.st_ino, st))
    }

    fn post_op(&self, w: &mut Writer, st: Option<&FileStat>) {
        match st {
            Some(st) => {
                w.bool(true);
                fattr(w, self.fsid(), st);
            }
            None => {
                w.bool(false);
            }
        }
    }

    /// `wcc_data` of `dir` after a change: no pre-operation attributes, the new ones.
    fn wcc(&self, w: &mut Writer, dir: &Found) {
        w.bool(false);
        let st = nix::sys::stat::fstat(&dir.fd).ok();
        self.post_op(w, st.as_ref());
    }

    /// The bytes of regular files (counted once, then kept up to date by the calls that change it).
    fn usage(&self) -> u64 {
        let mut used = self
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bytes) = *used {
            return bytes;
        }
        self.walk();
        let paths: Vec<u64> = self.names().keys().copied().collect();
        let bytes = paths
            .into_iter()
            .filter_map(|ino| self.path_of(ino))
            .filter_map(|path| nix::sys::stat::fstatat(&self.root, &path, AtFlags::AT_SYMLINK_NOFOLLOW).ok())
            .filter(|st| is(st, SFlag::S_IFREG))
            .map(|st| st.st_size.max(0) as u64)
            .sum();
        *used = Some(bytes);
        bytes
    }

    /// Whether growing a file by `grow` bytes stays within the quota.
    fn may_grow(&self, grow: u64) -> bool {
        match self.quota {
            None => true,
            Some(quota) => grow == 0 || self.usage().saturating_add(grow) <= quota,
        }
    }

    /// Records a change of the bytes of regular files (when they are counted).
    fn account(&self, before: u64, after: u64) {
        if self.quota.is_none() {
            return;
        }
        let mut used = self
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bytes) = used.as_mut() {
            *bytes = bytes.saturating_add(after).saturating_sub(before);
        }
    }

    /// Answers one NFSv3 call whose first argument is the handle of `ino` (the reply header is in
    /// `w`; the status and results are appended).
    pub fn call(
        &self,
        procedure: u32,
        ino: u64,
        r: &mut Reader<'_>,
        w: &mut Writer,
        cred: Option<&UnixCred>,
    ) -> Result<(), Refusal> {
        let garbage = |_| Refusal::GarbageArgs;
        match procedure {
            1 => match self.find(ino) {
                Ok(found) => {
                    w.u32(status::OK);
                    fattr(w, self.fsid(), &found.st);
                }
                Err(e) => {
                    w.u32(nfs_status(e));
                }
            },
            2 => self.setattr(ino, r, w)?,
            3 => self.lookup(ino, r, w)?,
            4 => {
                let asked = r.u32().map_err(garbage)?;
                // What the mode bits grant the caller: the node's kernel asks before it lets one of
                // its users open or change a file.
                self.attrs_then(ino, w, |st, w| {
                    w.u32(access_granted(asked, cred, st));
                });
            }
            5 => self.readlink(ino, w),
            6 => {
                let offset = r.u64().map_err(garbage)?;
                let count = r.u32().map_err(garbage)?.min(super::nfs::MAX_READ);
                self.read(ino, offset, count, w);
            }
            7 => {
                let offset = r.u64().map_err(garbage)?;
                let _count = r.u32().map_err(garbage)?;
                let stable = r.u32().map_err(garbage)?;
                let data = r.opaque(MAX_WRITE as usize).map_err(garbage)?;
                self.write(ino, offset, stable, data, w);
            }
            8..=11 => self.make(procedure, ino, r, w, cred)?,
            12 | 13 => {
                let name = r.string(4096).map_err(garbage)?;
                let result = self
                    .find_dir(ino)
                    .and_then(|dir| self.remove(&dir, name, procedure == 13).map(|()| dir));
                self.status_wcc(w, result, nfs_status);
            }
            14 => self.rename(ino, r, w)?,
            15 => self.link(ino, r, w)?,
            16 | 17 => self.readdir(ino, r, w, procedure == 17)?,
            18 => self.fsstat(ino, w),
            19 => self.attrs_then(ino, w, |_, w| {
                w.u32(super::nfs::MAX_READ).u32(super::nfs::MAX_READ).u32(4096);
                w.u32(MAX_WRITE).u32(MAX_WRITE).u32(4096);
                w.u32(64 * 1024).u64(u64::MAX).u32(0).u32(1);
                // LINK | SYMLINK | HOMOGENEOUS | CANSETTIME
                w.u32(0x01 | 0x02 | 0x08 | 0x10);
            }),
            20 => self.attrs_then(ino, w, |_, w| {
                w.u32(65_000)
                    .u32(NAME_MAX as u32)
                    .bool(true)
                    .bool(true)
                    .bool(false)
                    .bool(true);
            }),
            21 => self.commit(ino, w),
            _ => return Err(Refusal::ProcUnavail),
        }
        Ok(())
    }

    /// A reply of a status, the post-operation attributes, then what `results` writes (ACCESS,
    /// FSINFO, PATHCONF).
    fn attrs_then(&self, ino: u64, w: &mut Writer, results: impl FnOnce(&FileStat, &mut Writer)) {
        match self.find(ino) {
            Ok(found) => {
                w.u32(status::OK);
                self.post_op(w, Some(&found.st));
                results(&found.st, w);
            }
            Err(e) => {
                w.u32(nfs_status(e)).bool(false);
            }
        }
    }

    /// SETATTR, with its guard (the ctime the client last saw).
    fn setattr(&self, ino: u64, r: &mut Reader<'_>, w: &mut Writer) -> Result<(), Refusal> {
        let garbage = |_| Refusal::GarbageArgs;
        let attr = SetAttr::decode(r).map_err(garbage)?;
        let guard = if r.bool().map_err(garbage)? {
            Some((r.u32().map_err(garbage)?, r.u32().map_err(garbage)?))
        } else {
            None
        };
        let result = self.find(ino).and_then(|found| {
            let ctime = (clamp_secs(found.st.st_ctime), found.st.st_ctime_nsec as u32);
            if guard.is_some_and(|seen| seen != ctime) {
                return Err(Errno::EAGAIN);
            }
            self.set_attr(&found, &attr)?;
            Ok(found)
        });
        // EAGAIN stands for NFS3ERR_NOT_SYNC: the guard did not match.
        self.status_wcc(
            w,
            result,
            |e| if e == Errno::EAGAIN { 10008 } else { nfs_status(e) },
        );
        Ok(())
    }

    fn readlink(&self, ino: u64, w: &mut Writer) {
        let found = match self.find(ino) {
            Ok(found) => found,
            Err(e) => {
                w.u32(nfs_status(e)).bool(false);
                return;
            }
        };
        let target = if is(&found.st, SFlag::S_IFLNK) {
            nix::fcntl::readlinkat(&found.fd, "")
        } else {
            Err(Errno::EINVAL)
        };
        match target {
            Ok(target) => {
                w.u32(status::OK);
                self.post_op(w, Some(&found.st));
                w.opaque(target.as_bytes());
            }
            Err(e) => {
                w.u32(nfs_status(e));
                self.post_op(w, Some(&found.st));
            }
        }
    }

    /// COMMIT: the file's writes to disk (`fsync`), and this run's write verifier.
    fn commit(&self, ino: u64, w: &mut Writer) {
        let result = self
            .open_ino(ino, OFlag::O_RDONLY | OFlag::O_NONBLOCK)
            .and_then(|found| nix::unistd::fsync(&found.fd).map(|()| found));
        match result {
            Ok(found) => {
                w.u32(status::OK).bool(false);
                let st = nix::sys::stat::fstat(&found.fd).ok();
                self.post_op(w, st.as_ref());
                w.fixed(&write_verifier());
            }
            Err(e) => {
                w.u32(nfs_status(e)).bool(false).bool(false);
            }
        }
    }

    /// A status and the `wcc_data` of what `result` found (none on an error before it was found).
    fn status_wcc(&self, w: &mut Writer, result: Result<Found, Errno>, code: impl Fn(Errno) -> u32) {
        match result {
            Ok(found) => {
                w.u32(status::OK);
                self.wcc(w, &found);
            }
            Err(e) => {
                w.u32(code(e)).bool(false).bool(false);
            }
        }
    }

    fn set_attr(&self, found: &Found, attr: &SetAttr) -> Result<(), Errno> {
        if is(&found.st, SFlag::S_IFLNK) {
            // A link's own owner only: its mode means nothing, and it is never opened.
            if attr.uid.is_some() || attr.gid.is_some() {
                nix::unistd::fchownat(
                    &found.fd,
                    "",
                    attr.uid.map(nix::unistd::Uid::from_raw),
                    attr.gid.map(nix::unistd::Gid::from_raw),
                    AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
                )?;
            }
            return Ok(());
        }
        let dir = is(&found.st, SFlag::S_IFDIR);
        if !dir && !is(&found.st, SFlag::S_IFREG) {
            return Err(Errno::EINVAL);
        }
        if attr.size.is_some() && dir {
            return Err(Errno::EISDIR);
        }
        let flags = if dir {
            OFlag::O_RDONLY | OFlag::O_DIRECTORY
        } else if attr.size.is_some() {
            OFlag::O_WRONLY | OFlag::O_NONBLOCK
        } else {
            OFlag::O_RDONLY | OFlag::O_NONBLOCK
        };
        let opened = self.open_ino(found.ino, flags)?;
        if let Some(size) = attr.size {
            let before = opened.st.st_size.max(0) as u64;
            if size > before && !self.may_grow(size - before) {
                return Err(Errno::EDQUOT);
            }
            nix::unistd::ftruncate(&opened.fd, i64::try_from(size).map_err(|_| Errno::EFBIG)?)?;
            self.account(before, size);
        }
        if attr.uid.is_some() || attr.gid.is_some() {
            nix::unistd::fchown(
                &opened.fd,
                attr.uid.map(nix::unistd::Uid::from_raw),
                attr.gid.map(nix::unistd::Gid::from_raw),
            )?;
        }
        if let Some(mode) = attr.mode {
            nix::sys::stat::fchmod(&opened.fd, Mode::from_bits_truncate(mode & 0o7777))?;
        }
        if attr.atime != SetTime::Keep || attr.mtime != SetTime::Keep {
            nix::sys::stat::futimens(&opened.fd, &timespec(attr.atime), &timespec(attr.mtime))?;
        }
        Ok(())
    }

    fn lookup(&self, ino: u64, r: &mut Reader<'_>, w: &mut Writer) -> Result<(), Refusal> {
        let name = r.string(4096).map_err(|_| Refusal::GarbageArgs)?;
        let dir = match self.find_dir(ino) {
            Ok(dir) => dir,
            Err(e) => {
                w.u32(nfs_status(e)).bool(false);
                return Ok(());
            }
        };
        let result = match name {
            b"." => Ok((dir.ino, dir.st)),
            // `..` of the root is the root: nothing above it is reachable.
            b".." => self.find(self.parent_of(dir.ino)).map(|p| (p.ino, p.st)),
            _ => match check_name(name) {
                Ok(name) => self.child(&dir, name),
                Err(code) => {
                    w.u32(code);
                    self.post_op(w, Some(&dir.st));
                    return Ok(());
                }
            },
        };
        match result {
            Ok((child, st)) => {
                w.u32(status::OK).opaque(&handle(self.key, child));
                self.post_op(w, Some(&st));
                self.post_op(w, Some(&dir.st));
            }
            Err(e) => {
                w.u32(nfs_status(e));
                self.post_op(w, Some(&dir.st));
            }
        }
        Ok(())
    }

    fn read(&self, ino: u64, offset: u64, count: u32, w: &mut Writer) {
        let opened = self.open_ino(ino, OFlag::O_RDONLY | OFlag::O_NONBLOCK);
        let result = opened.and_then(|found| {
            if !is(&found.st, SFlag::S_IFREG) {
                return Err(if is(&found.st, SFlag::S_IFDIR) {
                    Errno::EISDIR
                } else {
                    Errno::EINVAL
                });
            }
            let mut data = vec![0; count as usize];
            let mut filled = 0;
            let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
            while filled < data.len() {
                let n = nix::sys::uio::pread(&found.fd, &mut data[filled..], offset + filled as i64)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            data.truncate(filled);
            let eof = offset as u64 + filled as u64 >= found.st.st_size.max(0) as u64;
            Ok((found, data, eof))
        });
        match result {
            Ok((found, data, eof)) => {
                w.u32(status::OK);
                self.post_op(w, Some(&found.st));
                w.u32(data.len() as u32).bool(eof).opaque(&data);
            }
            Err(e) => {
                w.u32(nfs_status(e)).bool(false);
            }
        }
    }

    fn write(&self, ino: u64, offset: u64, stable: u32, data: &[u8], w: &mut Writer) {
        let result = self
            .open_ino(ino, OFlag::O_WRONLY | OFlag::O_NONBLOCK)
            .and_then(|found| {
                if !is(&found.st, SFlag::S_IFREG) {
                    return Err(Errno::EINVAL);
                }
                let before = found.st.st_size.max(0) as u64;
                let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
                if end > before && !self.may_grow(end - before) {
                    return Err(Errno::EDQUOT);
                }
                let start = i64::try_from(offset).map_err(|_| Errno::EFBIG)?;
                let mut written = 0;
                while written < data.len() {
                    written += nix::sys::uio::pwrite(&found.fd, &data[written..], start + written as i64)?;
                }
                self.account(before, end.max(before));
                // UNSTABLE writes reach the disk at COMMIT; DATA_SYNC and FILE_SYNC now.
                let committed = if stable == 0 {
                    0
                } else {
                    nix::unistd::fsync(&found.fd)?;
                    2
                };
                Ok((found, committed))
            });
        match result {
            Ok((found, committed)) => {
                w.u32(status::OK).bool(false);
                let st = nix::sys::stat::fstat(&found.fd).ok();
                self.post_op(w, st.as_ref());
                w.u32(data.len() as u32).u32(committed).fixed(&write_verifier());
            }
            Err(e) => {
                w.u32(nfs_status(e)).bool(false).bool(false);
            }
        }
    }

    /// CREATE, MKDIR, SYMLINK, MKNOD: makes `name` in directory `ino`, owned by the caller.
    fn make(
        &self,
        procedure: u32,
        ino: u64,
        r: &mut Reader<'_>,
        w: &mut Writer,
        cred: Option<&UnixCred>,
    ) -> Result<(), Refusal> {
        let name = r.string(4096).map_err(|_| Refusal::GarbageArgs)?;
        let (what, attr) = What::decode(procedure, r).map_err(|_| Refusal::GarbageArgs)?;
        let dir = match self.find_dir(ino) {
            Ok(dir) => dir,
            Err(e) => {
                w.u32(nfs_status(e)).bool(false).bool(false);
                return Ok(());
            }
        };
        let name = match check_name(name) {
            Ok(name) => name,
            Err(code) => {
                w.u32(code);
                self.wcc(w, &dir);
                return Ok(());
            }
        };
        let mode = attr.and_then(|a| a.mode);
        let result = Self::create_entry(&dir, name, &what, mode).and_then(|created| {
            let (child, _) = self.child(&dir, name)?;
            let found = self.find(child)?;
            // Owned by the caller (the node's user), then what the client asked beyond the mode.
            if let Some(cred) = cred.filter(|_| created) {
                nix::unistd::fchownat(
                    &found.fd,
                    "",
                    Some(nix::unistd::Uid::from_raw(cred.uid)),
                    Some(nix::unistd::Gid::from_raw(cred.gid)),
                    AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
                )?;
            }
            let rest = attr.map(|attr| SetAttr { mode: None, ..attr });
            if let Some(rest) = rest.filter(|rest| !rest.is_empty()) {
                self.set_attr(&found, &rest)?;
            }
            Ok(child)
        });
        match result {
            Ok(child) => {
                let st = self.find(child).ok().map(|f| f.st);
                w.u32(status::OK).bool(true).opaque(&handle(self.key, child));
                self.post_op(w, st.as_ref());
            }
            Err(e) => {
                w.u32(nfs_status(e));
            }
        }
        self.wcc(w, &dir);
        Ok(())
    }

    /// Makes `name` in `dir` (relative to its descriptor, never through a link); whether it was
    /// made now (an UNCHECKED CREATE may open an existing file, whose owner then stays).
    fn create_entry(dir: &Found, name: &OsStr, what: &What<'_>, mode: Option<u32>) -> Result<bool, Errno> {
        let mode = |default: u32| Mode::from_bits_truncate(mode.unwrap_or(default) & 0o7777);
        match *what {
            What::File { exclusive, guarded } => {
                let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NONBLOCK;
                let how = OpenHow::new()
                    .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                    .mode(mode(0o644))
                    .resolve(resolve_flags());
                match nix::fcntl::openat2(&dir.fd, name, how) {
                    Ok(fd) => {
                        if let Some(verf) = exclusive {
                            // The verifier is kept in the times, so that a retransmitted EXCLUSIVE
                            // CREATE finds its own file (as RFC 1813 suggests).
                            let (a, m) = verifier_times(verf);
                            nix::sys::stat::futimens(&fd, &a, &m)?;
                        }
                        Ok(true)
                    }
                    Err(Errno::EEXIST) if !guarded || exclusive.is_some() => {
                        let st = nix::sys::stat::fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
                        let ours = match exclusive {
                            Some(verf) => {
                                let (a, m) = verifier_times(verf);
                                st.st_atime == a.tv_sec()
                                    && st.st_atime_nsec == a.tv_nsec()
                                    && st.st_mtime == m.tv_sec()
                                    && st.st_mtime_nsec == m.tv_nsec()
                            }
                            None => is(&st, SFlag::S_IFREG),
                        };
                        if ours { Ok(false) } else { Err(Errno::EEXIST) }
                    }
                    Err(e) => Err(e),
                }
            }
            What::Dir => nix::sys::stat::mkdirat(&dir.fd, name, mode(0o755)).map(|()| true),
            // The target is only text here: it is never followed on this side.
            What::Symlink(target) if target.contains(&0) => Err(Errno::EINVAL),
            What::Symlink(target) => {
                nix::unistd::symlinkat(OsStr::from_bytes(target), &dir.fd, name).map(|()| true)
            }
            What::Special => Err(Errno::EOPNOTSUPP),
        }
    }

    fn remove(&self, dir: &Found, name: &[u8], directory: bool) -> Result<(), Errno> {
        let name = check_name(name).map_err(|code| {
            if code == status::NAMETOOLONG {
                Errno::ENAMETOOLONG
            } else {
                Errno::EACCES
            }
        })?;
        let st = nix::sys::stat::fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let flag = if directory {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        nix::unistd::unlinkat(&dir.fd, name, flag)?;
        self.forget(st.st_ino, dir.ino, name.as_bytes());
        if is(&st, SFlag::S_IFREG) && st.st_nlink == 1 {
            self.account(st.st_size.max(0) as u64, 0);
        }
        Ok(())
    }

    fn rename(&self, ino: u64, r: &mut Reader<'_>, w: &mut Writer) -> Result<(), Refusal> {
        let garbage = |_| Refusal::GarbageArgs;
        let from_name = r.string(4096).map_err(garbage)?;
        let to_fh = r.opaque(64).map_err(garbage)?;
        let to_name = r.string(4096).map_err(garbage)?;
        let wcc_none = |w: &mut Writer| {
            w.bool(false).bool(false).bool(false).bool(false);
        };
        let to_ino = match parse_handle(to_fh) {
            Some((key, to)) if key == self.key => to,
            // Across directories: never into another device's or tenant's.
            _ => {
                w.u32(18);
                wcc_none(w);
                return Ok(());
            }
        };
        let dirs = self
            .find_dir(ino)
            .and_then(|from| Ok((from, self.find_dir(to_ino)?)));
        let (from, to) = match dirs {
            Ok(dirs) => dirs,
            Err(e) => {
                w.u32(nfs_status(e));
                wcc_none(w);
                return Ok(());
            }
        };
        let names = check_name(from_name).and_then(|f| Ok((f, check_name(to_name)?)));
        let result = match names {
            Err(code) => Err(code),
            Ok((from_name, to_name)) => {
                let replaced = nix::sys::stat::fstatat(&to.fd, to_name, AtFlags::AT_SYMLINK_NOFOLLOW).ok();
                let moved = nix::sys::stat::fstatat(&from.fd, from_name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .and_then(|st| {
                        nix::fcntl::renameat(&from.fd, from_name, &to.fd, to_name)?;
                        Ok(st)
                    });
                match moved {
                    Ok(st) => {
                        if let Some(old) = replaced.filter(|old| old.st_ino != st.st_ino) {
                            self.forget(old.st_ino, to.ino, to_name.as_bytes());
                            if is(&old, SFlag::S_IFREG) && old.st_nlink == 1 {
                                self.account(old.st_size.max(0) as u64, 0);
                            }
                        }
                        self.remember(st.st_ino, to.ino, to_name.as_bytes());
                        Ok(())
                    }
                    Err(e) => Err(nfs_status(e)),
                }
            }
        };
        w.u32(result.err().unwrap_or(status::OK));
        self.wcc(w, &from);
        self.wcc(w, &to);
        Ok(())
    }

    fn link(&self, ino: u64, r: &mut Reader<'_>, w: &mut Writer) -> Result<(), Refusal> {
        let garbage = |_| Refusal::GarbageArgs;
        let dir_fh = r.opaque(64).map_err(garbage)?;
        let name = r.string(4096).map_err(garbage)?;
        let dir_ino = match parse_handle(dir_fh) {
            Some((key, dir)) if key == self.key => dir,
            _ => {
                w.u32(18).bool(false).bool(false).bool(false);
                return Ok(());
            }
        };
        let found = self
            .find(ino)
            .and_then(|file| Ok((file, self.find_dir(dir_ino)?)));
        let (file, dir) = match found {
            Ok(found) => found,
            Err(e) => {
                w.u32(nfs_status(e)).bool(false).bool(false).bool(false);
                return Ok(());
            }
        };
        let result = match check_name(name) {
            Err(code) => Err(code),
            Ok(_) if is(&file.st, SFlag::S_IFDIR) => Err(status::ISDIR),
            Ok(name) => {
                // Linked from where the file is (its parent and name), never through a path.
                let (parent, old_name) = self
                    .names()
                    .get(&file.ino)
                    .cloned()
                    .unwrap_or((self.root_ino, Vec::new()));
                self.find_dir(parent)
                    .and_then(|parent| {
                        nix::unistd::linkat(
                            &parent.fd,
                            OsStr::from_bytes(&old_name),
                            &dir.fd,
                            name,
                            AtFlags::empty(),
                        )
                    })
                    .map_err(nfs_status)
            }
        };
        w.u32(result.err().unwrap_or(status::OK));
        let st = nix::sys::stat::fstat(&file.fd).ok();
        self.post_op(w, st.as_ref());
        self.wcc(w, &dir);
        Ok(())
    }

    /// READDIR / READDIRPLUS: `.`, `..`, then the entries in name order; cookie `n` resumes after
    /// the `n`-th entry.
    fn readdir(&self, ino: u64, r: &mut Reader<'_>, w: &mut Writer, plus: bool) -> Result<(), Refusal> {
        let garbage = |_| Refusal::GarbageArgs;
        let cookie = r.u64().map_err(garbage)?;
        r.fixed(8).map_err(garbage)?;
        let count = r.u32().map_err(garbage)?;
        let maxcount = if plus { r.u32().map_err(garbage)? } else { count };
        let listed = self
            .open_ino(ino, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
            .and_then(|dir| {
                let listing =
                    nix::fcntl::openat(&dir.fd, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())?;
                let mut names: Vec<(Vec<u8>, u64)> = nix::dir::Dir::from_fd(listing)?
                    .into_iter()
                    .flatten()
                    .map(|e| (e.file_name().to_bytes().to_vec(), e.ino()))
                    .filter(|(n, _)| n != b"." && n != b"..")
                    .collect();
                names.sort();
                Ok((dir, names))
            });
        let (dir, names) = match listed {
            Ok(listed) => listed,
            Err(e) => {
                w.u32(nfs_status(e)).bool(false);
                return Ok(());
            }
        };
        let mut entries: Vec<(Vec<u8>, u64)> = vec![
            (b".".to_vec(), dir.ino),
            (b"..".to_vec(), self.parent_of(dir.ino)),
        ];
        entries.extend(names);
        let start = usize::try_from(cookie).unwrap_or(usize::MAX);
        if start > entries.len() {
            w.u32(status::INVAL);
            self.post_op(w, Some(&dir.st));
            return Ok(());
        }
        let limit = (maxcount as usize).saturating_sub(200);
        let mut body = Writer::new();
        let mut eof = true;
        let mut emitted = 0;
        for (index, (name, child)) in entries.iter().enumerate().skip(start) {
            let mut entry = Writer::new();
            entry.bool(true).u64(*child).opaque(name).u64(index as u64 + 1);
            if plus {
                let st = match name.as_slice() {
                    b"." => Some(dir.st),
                    b".." => self.find(*child).ok().map(|f| f.st),
                    _ => self.child(&dir, OsStr::from_bytes(name)).ok().map(|(_, st)| st),
                };
                self.post_op(&mut entry, st.as_ref());
                match st {
                    Some(st) => {
                        entry.bool(true).opaque(&handle(self.key, st.st_ino));
                    }
                    None => {
                        entry.bool(false);
                    }
                }
            } else if index >= 2 {
                self.remember(*child, dir.ino, name);
            }
            if body.bytes.len() + entry.bytes.len() > limit {
                eof = false;
                break;
            }
            body.bytes.extend_from_slice(&entry.bytes);
            emitted += 1;
        }
        if emitted == 0 && !eof {
            w.u32(status::TOOSMALL);
            self.post_op(w, Some(&dir.st));
            return Ok(());
        }
        w.u32(status::OK);
        self.post_op(w, Some(&dir.st));
        w.fixed(&[0; 8]);
        w.bytes.extend_from_slice(&body.bytes);
        w.bool(false).bool(eof);
        Ok(())
    }

    fn fsstat(&self, ino: u64, w: &mut Writer) {
        let result = self
            .find(ino)
            .and_then(|found| Ok((nix::sys::statvfs::fstatvfs(&self.root)?, found)));
        match result {
            Ok((vfs, found)) => {
                w.u32(status::OK);
                self.post_op(w, Some(&found.st));
                let block = vfs.fragment_size();
                let (mut total, mut free) = (vfs.blocks() * block, vfs.blocks_available() * block);
                if let Some(quota) = self.quota {
                    free = free.min(quota.saturating_sub(self.usage()));
                    total = total.min(quota);
                }
                w.u64(total).u64(free).u64(free);
                w.u64(vfs.files())
                    .u64(vfs.files_available())
                    .u64(vfs.files_available());
                w.u32(0);
            }
            Err(e) => {
                w.u32(nfs_status(e)).bool(false);
            }
        }
    }
}

/// What a CREATE, MKDIR, SYMLINK or MKNOD makes.
enum What<'a> {
    /// A regular file: UNCHECKED, GUARDED, or EXCLUSIVE with its verifier.
    File {
        /// EXCLUSIVE's verifier.
        exclusive: Option<[u8; 8]>,
        /// An existing entry is an error.
        guarded: bool,
    },
    /// A directory.
    Dir,
    /// A symbolic link to this target.
    Symlink(&'a [u8]),
    /// A device, FIFO or socket (refused).
    Special,
}

impl<'a> What<'a> {
    /// Decodes what follows the name in the arguments of `procedure`, and the attributes asked.
    fn decode(procedure: u32, r: &mut Reader<'a>) -> Result<(Self, Option<SetAttr>), XdrError> {
        Ok(match procedure {
            8 => match r.u32()? {
                2 => {
                    let mut verf = [0; 8];
                    verf.copy_from_slice(r.fixed(8)?);
                    let what = What::File {
                        exclusive: Some(verf),
                        guarded: true,
                    };
                    (what, None)
                }
                how => {
                    let attr = SetAttr::decode(r)?;
                    let what = What::File {
                        exclusive: None,
                        guarded: how == 1,
                    };
                    (what, Some(attr))
                }
            },
            9 => (What::Dir, Some(SetAttr::decode(r)?)),
            10 => {
                let attr = SetAttr::decode(r)?;
                (What::Symlink(r.string(4096)?), Some(attr))
            }
            _ => (What::Special, None),
        })
    }
}

/// ACCESS bits (RFC 1813): READ, LOOKUP, MODIFY, EXTEND, DELETE, EXECUTE.
const ACCESS_READ: u32 = 0x01;
const ACCESS_LOOKUP: u32 = 0x02;
const ACCESS_MODIFY: u32 = 0x04;
const ACCESS_EXTEND: u32 = 0x08;
const ACCESS_DELETE: u32 = 0x10;
const ACCESS_EXECUTE: u32 = 0x20;

/// What of `asked` the mode bits of `st` grant `cred` (pure): root everything (execute only where
/// some execute bit is set, as on Linux), the owner the owner bits, a member of the file's group the
/// group bits, others the other bits. No credential: the other bits.
pub fn access_granted(asked: u32, cred: Option<&UnixCred>, st: &FileStat) -> u32 {
    let dir = is(st, SFlag::S_IFDIR);
    let mode = st.st_mode;
    let bits = match cred {
        Some(c) if c.uid == 0 => {
            let any_x = dir || mode & 0o111 != 0;
            0o6 | u32::from(any_x)
        }
        Some(c) if c.uid == st.st_uid => (mode >> 6) & 0o7,
        Some(c) if c.gid == st.st_gid || c.gids.contains(&st.st_gid) => (mode >> 3) & 0o7,
        _ => mode & 0o7,
    };
    let mut granted = 0;
    if bits & 0o4 != 0 {
        granted |= ACCESS_READ;
    }
    if bits & 0o2 != 0 {
        granted |= ACCESS_MODIFY | ACCESS_EXTEND | if dir { ACCESS_DELETE } else { 0 };
    }
    if bits & 0o1 != 0 {
        granted |= if dir { ACCESS_LOOKUP } else { ACCESS_EXECUTE };
    }
    asked & granted
}

/// The times that carry an EXCLUSIVE CREATE's verifier.
fn verifier_times(verf: [u8; 8]) -> (TimeSpec, TimeSpec) {
    let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    // Nanoseconds must stay below a second: the low bits of each half.
    let (a, m) = (word(&verf[..4]), word(&verf[4..]));
    (
        TimeSpec::new(i64::from(a >> 1), i64::from(a % 1_000_000)),
        TimeSpec::new(i64::from(m >> 1), i64::from(m % 1_000_000)),
    )
}

/// The write verifier of this run of the boot service: a client whose unstable writes were not
/// committed before a restart sees it change and writes them again.
pub fn write_verifier() -> [u8; 8] {
    static VERIFIER: std::sync::OnceLock<[u8; 8]> = std::sync::OnceLock::new();
    *VERIFIER.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        (nanos ^ u64::from(std::process::id())).to_be_bytes()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        assert_eq!(check_name(b"notes.txt"), Ok(OsStr::new("notes.txt")));
        for bad in [&b""[..], b".", b"..", b"a/b", b"../etc", b"/etc", b"a\0b"] {
            assert_eq!(check_name(bad), Err(status::ACCES), "{bad:?}");
        }
        assert_eq!(check_name(&[b'a'; 256]), Err(status::NAMETOOLONG));
        assert!(check_name(&[b'a'; 255]).is_ok());
    }

    #[test]
    fn each_device_and_tenant_has_its_own_directory_and_handle_key() {
        let base = Path::new("/var/lib/walt/persist");
        let alice = PersistOwner::new("rpi-12", "alice").expect("valid");
        let bob = PersistOwner::new("rpi-12", "bob").expect("valid");
        let other = PersistOwner::new("rpi-13", "alice").expect("valid");
        assert_eq!(alice.dir(base), Path::new("/var/lib/walt/persist/rpi-12/alice"));
        assert_ne!(alice.key(), bob.key(), "another tenant of the device");
        assert_ne!(alice.key(), other.key(), "another device of the tenant");
        assert_eq!(
            alice.key(),
            PersistOwner::new("rpi-12", "alice").expect("valid").key(),
            "stable"
        );
        // "a-b" + "c" and "a" + "b-c" must not meet.
        assert_ne!(
            PersistOwner::new("a-b", "c").expect("valid").key(),
            PersistOwner::new("a", "b-c").expect("valid").key()
        );
        for (device, tenant) in [
            ("..", "alice"),
            ("rpi", "."),
            ("rpi/x", "a"),
            ("rpi", ""),
            ("rpi", "a b"),
        ] {
            let error = PersistOwner::new(device, tenant).expect_err("refused");
            assert!(
                error.to_string().contains("cannot name a persistent directory"),
                "{error}"
            );
        }
    }

    #[test]
    fn persist_handles_round_trip_and_are_told_from_root_handles() {
        let fh = handle([3; 8], 77);
        assert!(is_handle(&fh));
        assert_eq!(parse_handle(&fh), Some(([3; 8], 77)));
        assert_eq!(parse_handle(&fh[..19]), None);
        let root = [b"wnb1".as_slice(), &[3; 8], &77u64.to_be_bytes()].concat();
        assert!(!is_handle(&root), "a root handle is not a persist handle");
        assert_eq!(parse_handle(&root), None);
    }

    #[test]
    fn sattr_decodes_what_is_set() {
        let mut w = Writer::new();
        w.bool(true)
            .u32(0o600)
            .bool(false)
            .bool(true)
            .u32(100)
            .bool(true)
            .u64(4096);
        w.u32(1).u32(2).u32(10).u32(20);
        let attr = SetAttr::decode(&mut Reader::new(&w.bytes)).expect("decodes");
        assert_eq!(
            attr,
            SetAttr {
                mode: Some(0o600),
                uid: None,
                gid: Some(100),
                size: Some(4096),
                atime: SetTime::Now,
                mtime: SetTime::At(10, 20),
            }
        );
        assert!(!attr.is_empty());
        let mut w = Writer::new();
        w.bool(false).bool(false).bool(false).bool(false).u32(0).u32(0);
        assert!(
            SetAttr::decode(&mut Reader::new(&w.bytes))
                .expect("decodes")
                .is_empty()
        );
    }

    #[test]
    fn access_follows_the_mode_bits_of_the_caller() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, "x").expect("write");
        let mut st = nix::sys::stat::stat(&file).expect("stat");
        st.st_mode = SFlag::S_IFREG.bits() | 0o640;
        st.st_uid = 1000;
        st.st_gid = 100;
        let cred = |uid, gid, gids: &[u32]| UnixCred {
            uid,
            gid,
            gids: gids.to_vec(),
        };
        let all = 0x3f;
        let rw = ACCESS_READ | ACCESS_MODIFY | ACCESS_EXTEND;
        assert_eq!(
            access_granted(all, Some(&cred(1000, 1000, &[])), &st),
            rw,
            "the owner"
        );
        assert_eq!(
            access_granted(all, Some(&cred(1001, 100, &[])), &st),
            ACCESS_READ,
            "the group"
        );
        assert_eq!(
            access_granted(all, Some(&cred(1001, 5, &[7, 100])), &st),
            ACCESS_READ,
            "a supplementary group"
        );
        assert_eq!(access_granted(all, Some(&cred(1001, 5, &[])), &st), 0, "others");
        assert_eq!(access_granted(all, None, &st), 0, "no credential: others");
        assert_eq!(
            access_granted(all, Some(&cred(0, 0, &[])), &st),
            rw,
            "root, no execute bit"
        );
        assert_eq!(
            access_granted(ACCESS_READ, Some(&cred(1000, 1, &[])), &st),
            ACCESS_READ,
            "only what is asked"
        );
        st.st_mode = SFlag::S_IFDIR.bits() | 0o755;
        assert_eq!(
            access_granted(all, Some(&cred(1001, 5, &[])), &st),
            ACCESS_READ | ACCESS_LOOKUP,
            "a directory others may list and cross"
        );
        assert_eq!(
            access_granted(all, Some(&cred(1000, 5, &[])), &st),
            ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
        );
    }

    #[test]
    fn exclusive_create_verifiers_fit_in_valid_times() {
        let (a, m) = verifier_times([0xff; 8]);
        assert!(a.tv_nsec() < 1_000_000_000 && m.tv_nsec() < 1_000_000_000);
        assert_ne!(verifier_times([1; 8]), verifier_times([2; 8]));
    }

    /// A directory tree with a symlink pointing out of it: walked, opened and listed from the
    /// directory's own descriptor, the link is never followed.
    #[test]
    fn paths_resolve_beneath_the_directory_and_never_through_a_link() {
        let base = tempfile::tempdir().expect("tempdir");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), "other tenant").expect("write");
        let owner = PersistOwner::new("dev1", "alice").expect("owner");
        let dir = PersistDir::open(&base.path().join("persist"), owner.clone(), None).expect("open");
        let root = owner.dir(&base.path().join("persist"));
        std::fs::create_dir(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub/file"), "mine").expect("write");
        std::os::unix::fs::symlink(&outside, root.join("escape")).expect("symlink");
        std::os::unix::fs::symlink("../../..", root.join("up")).expect("symlink");
        use std::os::unix::fs::MetadataExt;
        let file_ino = std::fs::metadata(root.join("sub/file")).expect("stat").ino();
        // Not seen yet (as after a restart): found by walking the directory.
        let found = dir.find(file_ino).expect("found by a walk");
        assert_eq!(found.st.st_size, 4);
        let escape = std::fs::symlink_metadata(root.join("escape"))
            .expect("stat")
            .ino();
        assert_eq!(
            dir.open_ino(escape, OFlag::O_RDONLY).err(),
            Some(Errno::ELOOP),
            "a link is never opened through"
        );
        // A path through a link is refused by the kernel (RESOLVE_NO_SYMLINKS / BENEATH).
        assert!(open_beneath(&dir.root, Path::new("escape/secret"), OFlag::O_RDONLY).is_err());
        assert!(open_beneath(&dir.root, Path::new("../../outside/secret"), OFlag::O_RDONLY).is_err());
        let secret = std::fs::metadata(outside.join("secret")).expect("stat").ino();
        assert_eq!(
            dir.find(secret).err(),
            Some(Errno::ESTALE),
            "an inode outside is not found"
        );
    }
}
