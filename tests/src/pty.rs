//! Driving an interactive program through a pseudo-terminal, as a person at a terminal does: type
//! lines, wait for output, read the exit status, and check the terminal was restored.

use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::wait::Wait;

/// A child process on a pseudo-terminal (its controlling terminal, through `setsid -c`), sized
/// 30 rows × 100 columns.
pub struct Pty {
    master: OwnedFd,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    /// Set by the reader thread once the terminal has nothing more to give (every writer gone).
    drained: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pty")
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl Pty {
    /// Starts `command` (program, arguments and environment are taken from it) on a new PTY.
    ///
    /// # Panics
    /// When the PTY or the process cannot be created (test helper).
    pub fn spawn(command: &Command) -> Pty {
        let pty = nix::pty::openpty(
            Some(&nix::pty::Winsize {
                ws_row: 30,
                ws_col: 100,
                ws_xpixel: 0,
                ws_ypixel: 0,
            }),
            None,
        )
        .expect("openpty");
        let program = command.get_program().to_owned();
        let args: Vec<_> = command.get_args().map(ToOwned::to_owned).collect();
        let envs: Vec<_> = command
            .get_envs()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned())))
            .collect();
        let slave = pty.slave;
        let mut wrapper = Command::new("setsid");
        wrapper
            .arg("-c")
            .arg(program)
            .args(args)
            .envs(envs)
            .env("TERM", "xterm")
            .stdin(Stdio::from(slave.try_clone().expect("dup pty")))
            .stdout(Stdio::from(slave.try_clone().expect("dup pty")))
            .stderr(Stdio::from(slave));
        if let Some(dir) = command.get_current_dir() {
            wrapper.current_dir(dir);
        }
        let child = wrapper.spawn().expect("start setsid (util-linux)");
        let output = Arc::new(Mutex::new(Vec::new()));
        let reader_fd = pty.master.try_clone().expect("dup pty");
        let sink = output.clone();
        let drained = Arc::new(AtomicBool::new(false));
        let done = drained.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::from(reader_fd);
            let mut buf = [0u8; 4096];
            while let Ok(n) = file.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(&buf[..n]);
            }
            done.store(true, Ordering::Release);
        });
        Pty {
            master: pty.master,
            child,
            output,
            drained,
        }
    }

    /// Types `text` (use `\n` for Enter, `\x03` for Ctrl-C, `\x04` for Ctrl-D).
    ///
    /// # Panics
    /// When the PTY cannot be written.
    pub fn send(&self, text: &str) {
        let mut file = std::fs::File::from(self.master.try_clone().expect("dup pty"));
        file.write_all(text.as_bytes()).expect("write to the pty");
    }

    /// Everything shown so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .output
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }

    /// Waits until `needle` has been shown (30 s).
    ///
    /// # Panics
    /// When it is not shown in time, with everything shown.
    pub fn expect(&self, needle: &str) {
        self.expect_within(needle, Duration::from_secs(30));
    }

    /// Waits until `needle` has been shown, at most `within`.
    ///
    /// # Panics
    /// When it is not shown in time, with everything shown.
    pub fn expect_within(&self, needle: &str, within: Duration) {
        self.expect_times_within(needle, 1, within);
    }

    /// Waits until `needle` has been shown `times` times in all (a message said again for a second
    /// event), at most `within`.
    ///
    /// # Panics
    /// When it is not shown so often in time, with everything shown.
    pub fn expect_times_within(&self, needle: &str, times: usize, within: Duration) {
        Wait::new(&format!("{needle:?} to be shown {times} time(s)"), within)
            .every(Duration::from_millis(50))
            .until(|| self.text().matches(needle).count() >= times)
            .unwrap_or_else(|e| panic!("{e}; got:\n{}", self.text()));
    }

    /// Waits for the program to exit (at most `within`): its exit code and everything shown.
    ///
    /// # Panics
    /// When it does not exit in time (it is killed then).
    pub fn wait_within(&mut self, within: Duration) -> (i32, String) {
        let exited = Wait::new("the program to exit", within)
            .every(Duration::from_millis(50))
            .until(|| self.child.try_wait().expect("wait"));
        match exited {
            Ok(status) => {
                self.read_last_words();
                (status.code().unwrap_or(-1), self.text())
            }
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{e} (killed it):\n{}", self.text());
            }
        }
    }

    /// Waits until what the exited program wrote last has been read: until the terminal is drained,
    /// at most 2 s (a process left holding the terminal keeps it open).
    fn read_last_words(&self) {
        let exited = Instant::now();
        while !self.drained.load(Ordering::Acquire) && exited.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit code when the program has exited (-1 for a signal), else None; does not wait.
    ///
    /// # Panics
    /// When the child cannot be waited for.
    pub fn try_wait(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .expect("wait")
            .map(|status| status.code().unwrap_or(-1))
    }

    /// [`Pty::wait_within`] 30 s.
    pub fn wait(&mut self) -> (i32, String) {
        self.wait_within(Duration::from_secs(30))
    }

    /// Whether the terminal is back in canonical (cooked) mode with echo.
    ///
    /// # Panics
    /// When the terminal attributes cannot be read.
    pub fn cooked(&self) -> bool {
        let attrs = nix::sys::termios::tcgetattr(&self.master).expect("tcgetattr");
        attrs.local_flags.contains(nix::sys::termios::LocalFlags::ICANON)
            && attrs.local_flags.contains(nix::sys::termios::LocalFlags::ECHO)
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
