//! A session's changes kept on the cluster node across shell pods.
//!
//! An image shell's changes live in its overlay upper dir, in the walt cache. A plain
//! `walt-operator shell` names its session directory after its PID and removes it when it ends. A
//! shell pod of the operator passes `--keep-changes-as <session uid>` instead: the directory is
//! `sessions/kept-<uid>` in the cache (a hostPath on the cluster node), so when the pod is evicted,
//! deleted or killed, the changes stay where they were, and the session's next shell pod, made on
//! the same cluster node, continues on them. One runtime at a time holds a session's directory
//! (an exclusive `flock` on `kept-<uid>.lock`): a pod force-deleted while its runtime still runs
//! cannot share the upper dir with its successor. Directories no runtime held for [`KEPT_FOR`] are
//! removed by the next runtime that starts on the node (a session deleted, or expired, while its
//! shell pod was being stopped leaves its changes behind for that long).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};

/// How long a kept session directory no runtime holds stays on the node.
pub const KEPT_FOR: Duration = Duration::from_hours(1);

/// How long a new runtime waits for the one before it (a pod being stopped) to let go.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(90);

const PREFIX: &str = "kept-";
const LOCK_SUFFIX: &str = ".lock";

/// Why a kept session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum KeptError {
    /// The id is not one the operator gives (a session uid).
    #[error("--keep-changes-as {0:?}: use letters, digits and '-' only, at most 64 (a session uid)")]
    BadId(String),
    /// Another runtime still holds the directory.
    #[error(
        "another shell pod of this session still holds its changes ({0}) after {1} s: it is being stopped; try again when it is gone"
    )]
    Held(PathBuf, u64),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KeptError {
    let path = path.to_path_buf();
    move |source| KeptError::Io { what, path, source }
}

/// Whether `id` may name a kept session (pure): what the operator passes, a Kubernetes uid.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A session directory held by this runtime until it is dropped.
#[derive(Debug)]
pub struct KeptSession {
    /// The session directory (upper, work and state dirs inside).
    pub dir: PathBuf,
    /// The directory held the changes of an earlier shell pod of the session.
    pub resumed: bool,
    _lock: Flock<File>,
}

impl KeptSession {
    /// Takes session `id`'s directory under `cache_dir/sessions` (waiting up to `wait` for an earlier
    /// runtime to let go), clears what a killed runtime leaves besides the changes (the overlay's work
    /// dir, the mount state), and sweeps the directories no runtime held for [`KEPT_FOR`].
    pub fn open(cache_dir: &Path, id: &str, wait: Duration) -> Result<Self, KeptError> {
        if !valid_id(id) {
            return Err(KeptError::BadId(id.to_owned()));
        }
        let sessions = cache_dir.join("sessions");
        fs::create_dir_all(&sessions).map_err(io_error("creating", &sessions))?;
        let lock_path = sessions.join(format!("{PREFIX}{id}{LOCK_SUFFIX}"));
        let lock = hold(&lock_path, wait)?;
        // The lock file's time says when a runtime last took the session (for the sweep).
        lock.set_modified(SystemTime::now())
            .map_err(io_error("touching", &lock_path))?;
        let dir = sessions.join(format!("{PREFIX}{id}"));
        let upper = dir.join("upper");
        let resumed = fs::read_dir(&upper).is_ok_and(|mut entries| entries.next().is_some());
        for leftover in ["work", "state"] {
            let path = dir.join(leftover);
            if path.exists() {
                fs::remove_dir_all(&path).map_err(io_error("clearing", &path))?;
            }
        }
        fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        sweep(&sessions, &lock_path, KEPT_FOR, SystemTime::now());
        Ok(Self {
            dir,
            resumed,
            _lock: lock,
        })
    }
}

/// Takes the exclusive lock on `path`, trying every half second for up to `wait`.
fn hold(path: &Path, wait: Duration) -> Result<Flock<File>, KeptError> {
    let started = Instant::now();
    loop {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_error("opening", path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if started.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(KeptError::Held(path.to_path_buf(), wait.as_secs()));
            }
            Err((_, errno)) => return Err(io_error("locking", path)(io::Error::from(errno))),
        }
    }
}

/// Whether a kept session whose lock was last taken at `taken` is past keeping at `now` (pure).
pub fn expired(taken: SystemTime, now: SystemTime, kept_for: Duration) -> bool {
    now.duration_since(taken).is_ok_and(|idle| idle > kept_for)
}

/// Removes the kept sessions under `sessions` that no runtime holds and none took for `kept_for`
/// (best effort: a directory another runtime takes meanwhile is left alone, since its lock is held).
fn sweep(sessions: &Path, own_lock: &Path, kept_for: Duration, now: SystemTime) {
    let Ok(entries) = fs::read_dir(sessions) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_suffix(LOCK_SUFFIX))
        else {
            continue;
        };
        let taken = entry.metadata().and_then(|meta| meta.modified());
        if path == own_lock || !taken.is_ok_and(|taken| expired(taken, now, kept_for)) {
            continue;
        }
        let Ok(file) = File::options().write(true).open(&path) else {
            continue;
        };
        if let Ok(held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            let dir = sessions.join(format!("{PREFIX}{id}"));
            let removed = fs::remove_dir_all(&dir).or_else(|error| match error.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(error),
            });
            match removed {
                Ok(()) => {
                    let _ = fs::remove_file(&path);
                }
                Err(error) => eprintln!(
                    "walt: could not remove the kept session {}: {error}",
                    dir.display()
                ),
            }
            drop(held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_session_uids() {
        assert!(valid_id("0b9f3c2e-6f1a-4c55-9d2e-1f0a7b3c9d11"));
        assert!(!valid_id(""));
        assert!(!valid_id("../etc"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"a".repeat(65)));
    }

    #[test]
    fn a_second_runtime_continues_on_the_changes_and_waits_for_the_first() {
        let cache = tempfile::tempdir().expect("tempdir");
        let first = KeptSession::open(cache.path(), "s1", Duration::ZERO).expect("first runtime");
        assert!(!first.resumed, "a new session starts with no changes");
        fs::create_dir_all(first.dir.join("upper/etc")).expect("upper");
        fs::write(first.dir.join("upper/etc/motd"), "changed").expect("a change");
        fs::create_dir_all(first.dir.join("work/work")).expect("overlay work dir");
        // While the first holds it, a second one is refused (after its wait).
        let held = KeptSession::open(cache.path(), "s1", Duration::from_millis(600));
        assert!(matches!(held, Err(KeptError::Held(..))), "{held:?}");
        // The first runtime is killed: its lock goes with it, its changes stay.
        drop(first);
        let second = KeptSession::open(cache.path(), "s1", Duration::ZERO).expect("second runtime");
        assert!(second.resumed);
        assert_eq!(
            fs::read_to_string(second.dir.join("upper/etc/motd")).expect("the change"),
            "changed"
        );
        assert!(
            !second.dir.join("work").exists(),
            "the dead overlay's work dir is cleared"
        );
    }

    #[test]
    fn sessions_nobody_took_for_an_hour_are_swept_and_held_ones_are_not() {
        let cache = tempfile::tempdir().expect("tempdir");
        let sessions = cache.path().join("sessions");
        let old = KeptSession::open(cache.path(), "old", Duration::ZERO).expect("old");
        fs::create_dir_all(old.dir.join("upper")).expect("upper");
        let held = KeptSession::open(cache.path(), "held", Duration::ZERO).expect("held");
        drop(old);
        let later = SystemTime::now() + KEPT_FOR + Duration::from_mins(1);
        sweep(&sessions, &sessions.join("kept-new.lock"), KEPT_FOR, later);
        assert!(
            !sessions.join("kept-old").exists(),
            "an old session nobody holds is removed"
        );
        assert!(!sessions.join("kept-old.lock").exists());
        assert!(held.dir.exists(), "a session a runtime holds stays, however old");
        sweep(
            &sessions,
            &sessions.join("kept-new.lock"),
            KEPT_FOR,
            SystemTime::now(),
        );
        assert!(held.dir.exists());
    }

    #[test]
    fn expiry_counts_from_the_last_take() {
        let now = SystemTime::now();
        assert!(!expired(now, now, KEPT_FOR));
        assert!(expired(now - KEPT_FOR - Duration::from_secs(1), now, KEPT_FOR));
        // A lock file from the future (a clock set back) is not expired.
        assert!(!expired(now + KEPT_FOR * 2, now, KEPT_FOR));
    }
}
