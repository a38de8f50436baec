//! The local terminal: raw mode with a guard that always restores it, and the window size.

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::termios::{self, SetArg, Termios};

use crate::error::{Error, Result};

/// Puts stdin in raw mode while alive; the previous mode comes back on drop, whatever the exit
/// path (return, `?`, panic unwinding). Signals that end the plugin are turned into a normal
/// return by the callers (they select on them), so the guard's drop runs then too.
#[derive(Debug)]
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Enters raw mode if stdin is a terminal; a no-op guard otherwise (pipes, tests).
    pub fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(RawMode { saved: None });
        }
        let fd = stdin.as_fd();
        let saved = termios::tcgetattr(fd).map_err(|e| Error::Io {
            context: "cannot read the terminal settings".into(),
            source: e.into(),
        })?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw).map_err(|e| Error::Io {
            context: "cannot put the terminal in raw mode".into(),
            source: e.into(),
        })?;
        Ok(RawMode { saved: Some(saved) })
    }

    /// Whether the terminal really is in raw mode (stdin is a terminal).
    pub fn is_active(&self) -> bool {
        self.saved.is_some()
    }

    /// Restores the terminal now (idempotent; drop does it too).
    pub fn restore(&mut self) {
        if let Some(saved) = self.saved.take() {
            let stdin = std::io::stdin();
            // Best effort: there is nothing more to do if the terminal went away.
            let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &saved);
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The terminal size (columns, rows), from stdout, else stdin, else 80x24.
pub fn size() -> (u16, u16) {
    let from = |fd: BorrowedFd<'_>| terminal_size::terminal_size_of(fd);
    from(std::io::stdout().as_fd())
        .or_else(|| from(std::io::stdin().as_fd()))
        .map_or((80, 24), |(w, h)| (w.0, h.0))
}

/// The `TERM` to announce to remote PTYs.
pub fn term() -> String {
    std::env::var("TERM")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "xterm-256color".into())
}

/// Whether stdin and stdout are both terminals (interactive use).
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// Reads stdin on a thread of its own (interactive input must not block the runtime) and hands
/// the bytes over a channel. Dropping the pump stops the thread within 100 ms, without losing
/// input typed afterwards: it polls before each read, so no read is left pending that would
/// swallow what the next prompt (the image shell dialogue) wants to read.
#[derive(Debug)]
pub struct StdinPump {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StdinPump {
    /// Starts the pump; the receiver yields chunks, and closes at end of input.
    pub fn start() -> (StdinPump, tokio::sync::mpsc::Receiver<Vec<u8>>) {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let stdin = std::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            while !flag.load(Ordering::Relaxed) {
                let ready = {
                    let fd = stdin.as_fd();
                    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)) {
                        Ok(n) => n > 0,
                        Err(nix::errno::Errno::EINTR) => false,
                        Err(_) => break,
                    }
                };
                if !ready {
                    continue;
                }
                match stdin.lock().read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        (
            StdinPump {
                stop,
                thread: Some(thread),
            },
            rx,
        )
    }
}

impl Drop for StdinPump {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread wakes up within its poll timeout, or is blocked sending to a receiver
            // that is gone (which fails at once).
            let _ = thread.join();
        }
    }
}
