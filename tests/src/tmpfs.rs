//! A small tmpfs mounted on a directory for a test, unmounted when dropped: a disk that fills up.
//!
//! ```no_run
//! let disk = walt_tests::tmpfs::Tmpfs::mount("/tmp/x/data".as_ref(), 48 << 20).expect("tmpfs");
//! // … fill it: writes fail with ENOSPC ("No space left on device") …
//! drop(disk); // unmounted (lazily, should a process still hold a file there)
//! ```

use std::path::{Path, PathBuf};

use crate::FixtureError;

/// A tmpfs of a fixed size mounted on a directory (needs root); unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    /// Creates `path` if needed and mounts there a tmpfs of `bytes` bytes (mode 0755).
    pub fn mount(path: &Path, bytes: u64) -> Result<Self, FixtureError> {
        std::fs::create_dir_all(path)
            .map_err(|e| FixtureError::io(&format!("creating {}", path.display()), e))?;
        let options = format!("size={bytes},mode=0755");
        nix::mount::mount(
            Some("walt-test-disk"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| {
            FixtureError::io(
                &format!(
                    "mounting a tmpfs of {bytes} bytes on {} (needs root)",
                    path.display()
                ),
                e.into(),
            )
        })?;
        Ok(Tmpfs {
            path: path.to_owned(),
            mounted: true,
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes free on it now (`statvfs`).
    pub fn free_bytes(&self) -> Result<u64, FixtureError> {
        let stat = nix::sys::statvfs::statvfs(&self.path)
            .map_err(|e| FixtureError::io(&format!("statvfs {}", self.path.display()), e.into()))?;
        Ok(stat.blocks_available() * stat.fragment_size())
    }

    /// Unmounts it now (also done on drop): lazily, so a process still holding a file there does not
    /// keep it mounted.
    pub fn unmount(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
            self.mounted = false;
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.unmount();
    }
}
