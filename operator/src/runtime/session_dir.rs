//! A runtime's own working directory in the walt cache: `sessions/<pid>-<time>` (the overlay's upper,
//! work and state dirs of an image shell, a virtual node or a build step).
//!
//! The runtime holds an exclusive `flock` on `sessions/<pid>-<time>.lock` for as long as the
//! directory exists, and removes both when it ends. A runtime killed before that (a pod killed past
//! its grace period, out of memory, a cluster node restarted) leaves them behind: the next runtime
//! that starts with the same cache takes the free lock and removes them. The lock, not the PID, says
//! whether a runtime still uses a directory: in a pod every runtime is PID 1 of its own PID namespace,
//! so on the cluster node's shared cache a PID says nothing. Directories without a lock file (made
//! by a runtime from before the locks) are removed when their PID no longer runs, as then.
//!
//! A kept session's directory (`kept-<uid>`, see [`super::kept`]) is held and swept by its own
//! rules; it is only removed at the end through [`SessionDir::of_kept`].

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

const LOCK_SUFFIX: &str = ".lock";
const KEPT_PREFIX: &str = "kept-";

/// A session directory, removed with its lock file when dropped (unless kept).
#[derive(Debug)]
pub struct SessionDir {
    path: PathBuf,
    /// The lock file and the held lock (none for a kept session's directory: its own lock is the
    /// [`super::kept::KeptSession`]'s).
    lock: Option<(PathBuf, Flock<File>)>,
    keep: bool,
}

impl SessionDir {
    /// Creates and holds a new session directory under `cache_dir/sessions`, first removing those
    /// that runtimes killed earlier left behind.
    ///
    /// # Errors
    /// When the directory or its lock file cannot be created.
    pub fn create(cache_dir: &Path) -> io::Result<Self> {
        let sessions = cache_dir.join("sessions");
        fs::create_dir_all(&sessions)?;
        remove_abandoned(&sessions);
        let name = format!("{}-{:x}", std::process::id(), nanos_since_epoch());
        let lock_path = sessions.join(format!("{name}{LOCK_SUFFIX}"));
        // A new file: no one else can know its name, so the lock is free.
        let file = File::options().write(true).create_new(true).open(&lock_path)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| io::Error::from(errno))?;
        // Made after the lock is held: whoever sees the directory finds its lock taken.
        let path = sessions.join(&name);
        fs::create_dir(&path)?;
        Ok(Self {
            path,
            lock: Some((lock_path, lock)),
            keep: false,
        })
    }

    /// A kept session's directory, held by its [`super::kept::KeptSession`]: removed when dropped,
    /// unless [`SessionDir::keep`] was called. Removes, beside it, what runtimes killed earlier left.
    #[must_use]
    pub fn of_kept(path: PathBuf) -> Self {
        if let Some(sessions) = path.parent() {
            remove_abandoned(sessions);
        }
        Self {
            path,
            lock: None,
            keep: false,
        }
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory where it is when dropped (a kept session's changes, for its next pod).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for SessionDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let removed = fs::remove_dir_all(&self.path);
        // The lock file goes only with its directory: a directory left without one would be judged
        // by its PID, which in a pod is always running.
        if removed.is_ok()
            && let Some((lock_path, _held)) = &self.lock
        {
            let _ = fs::remove_file(lock_path);
        }
    }
}

/// What to do with an entry of the sessions directory (pure): its name, whether it is a directory,
/// and the state of its lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Not a runtime's own session directory, or one still in use: left alone.
    Leave,
    /// Its runtime is gone: remove the directory, then its lock file.
    Remove,
    /// A lock file is there: take it to know (free: the runtime is gone).
    TryLock,
}

/// The state of a session directory's lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockFile {
    /// None (a directory made before the locks).
    Missing,
    /// There.
    Present,
}

/// Decides about one entry of the sessions directory (pure); `running(pid)` says whether a process
/// runs with that PID (for directories from before the locks only).
fn verdict(name: &str, is_dir: bool, lock: LockFile, running: impl Fn(u32) -> bool) -> Verdict {
    if !is_dir || name.starts_with(KEPT_PREFIX) {
        return Verdict::Leave;
    }
    match lock {
        LockFile::Present => Verdict::TryLock,
        LockFile::Missing => match name.split('-').next().and_then(|pid| pid.parse::<u32>().ok()) {
            Some(pid) if pid != std::process::id() && !running(pid) => Verdict::Remove,
            _ => Verdict::Leave,
        },
    }
}

/// Removes the session directories (and their lock files) of runtimes that are gone (best effort).
fn remove_abandoned(sessions: &Path) {
    let Ok(entries) = fs::read_dir(sessions) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
        let lock_path = sessions.join(format!("{name}{LOCK_SUFFIX}"));
        let lock = if lock_path.exists() {
            LockFile::Present
        } else {
            LockFile::Missing
        };
        let running = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
        match verdict(&name, is_dir, lock, running) {
            Verdict::Leave => {}
            Verdict::Remove => {
                let _ = fs::remove_dir_all(&dir);
            }
            Verdict::TryLock => {
                let Ok(file) = File::options().write(true).open(&lock_path) else {
                    continue;
                };
                // Held: its runtime still works in it.
                if let Ok(_free) = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                    && remove_if_there(&dir).is_ok()
                {
                    let _ = remove_if_there(&lock_path);
                }
            }
        }
    }
}

/// Removes a file or a directory tree; one already gone (another runtime swept it) is fine.
fn remove_if_there(path: &Path) -> io::Result<()> {
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

fn nanos_since_epoch() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_nanos())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never_running(_: u32) -> bool {
        false
    }

    #[test]
    fn a_locked_directory_is_judged_by_its_lock_not_its_pid() {
        // PID 1 always runs: in a pod it is every runtime's PID.
        assert_eq!(
            verdict("1-17f3a", true, LockFile::Present, |_| true),
            Verdict::TryLock
        );
        assert_eq!(
            verdict("1-17f3a", true, LockFile::Missing, |_| true),
            Verdict::Leave,
            "a directory from before the locks whose PID runs"
        );
        assert_eq!(
            verdict("4242-17f3a", true, LockFile::Missing, never_running),
            Verdict::Remove
        );
    }

    #[test]
    fn kept_sessions_lock_files_and_strangers_are_left_alone() {
        assert_eq!(
            verdict("kept-0a1b", true, LockFile::Present, never_running),
            Verdict::Leave
        );
        assert_eq!(
            verdict("4242-17f3a.lock", false, LockFile::Missing, never_running),
            Verdict::Leave
        );
        assert_eq!(
            verdict("notes", true, LockFile::Missing, never_running),
            Verdict::Leave
        );
    }

    #[test]
    fn a_held_directory_stays_and_an_abandoned_one_goes() {
        let cache = tempfile::tempdir().expect("tempdir");
        let held = SessionDir::create(cache.path()).expect("a session dir");
        fs::write(held.path().join("upper"), "changes").expect("write");
        // A runtime killed in a pod: PID 1, its lock file free.
        let sessions = cache.path().join("sessions");
        let abandoned = sessions.join("1-abandoned");
        fs::create_dir_all(abandoned.join("upper/etc")).expect("mkdir");
        fs::write(sessions.join("1-abandoned.lock"), "").expect("lock file");
        let second = SessionDir::create(cache.path()).expect("a second session dir");
        assert!(!abandoned.exists(), "the killed runtime's directory is removed");
        assert!(!sessions.join("1-abandoned.lock").exists());
        assert!(held.path().join("upper").exists(), "the held one stays");
        let (first_path, second_path) = (held.path().to_path_buf(), second.path().to_path_buf());
        drop(held);
        drop(second);
        assert!(!first_path.exists() && !second_path.exists());
        let left: Vec<_> = fs::read_dir(&sessions).expect("read").flatten().collect();
        assert!(left.is_empty(), "nothing left: {left:?}");
    }

    #[test]
    fn a_kept_directory_stays_when_kept_and_goes_otherwise() {
        let cache = tempfile::tempdir().expect("tempdir");
        let path = cache.path().join("kept-x");
        fs::create_dir_all(&path).expect("mkdir");
        let mut kept = SessionDir::of_kept(path.clone());
        kept.keep();
        drop(kept);
        assert!(path.exists());
        drop(SessionDir::of_kept(path.clone()));
        assert!(!path.exists());
    }
}
