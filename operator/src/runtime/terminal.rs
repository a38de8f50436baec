//! The caller's terminal: raw mode while a shell runs, and the relay between
//! it and the shell's PTY (input, output, window size, signals, exit status).

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::termios::{self, SetArg, Termios};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, read, write};

use super::sys;

/// Puts a terminal in raw mode and restores it when dropped (also on panic).
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Raw mode on stdin when it is a terminal; a no-op guard otherwise.
    pub fn enable() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return Self { saved: None };
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = self.saved.take() {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &saved);
        }
    }
}

/// The signals the runtime handles itself (through a signalfd) while a
/// session runs. Children reset their mask before `execve`.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGWINCH,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
    ] {
        set.add(signal);
    }
    set
}

/// Blocks [`handled_signals`] and returns a signalfd that receives them.
pub fn signal_fd() -> nix::Result<SignalFd> {
    let set = handled_signals();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
}

/// The caller's terminal size (stdin, else stdout), if it is a terminal.
pub fn caller_window_size() -> Option<libc::winsize> {
    sys::window_size(std::io::stdin().as_fd()).or_else(|| sys::window_size(std::io::stdout().as_fd()))
}

/// Converts a wait status to a shell-style exit code.
pub fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
        _ => 1,
    }
}

/// How the relay ended.
#[derive(Debug, Default)]
pub struct RelayEnd {
    /// The shell's exit code (128 + signal when killed).
    pub shell_code: i32,
    /// PID 1's status, when it ended (and was reaped) during the relay.
    pub init_status: Option<WaitStatus>,
    /// The shell was hung up by a termination signal to the runtime (`SIGTERM`, `SIGHUP`, `SIGQUIT`):
    /// the pod is being stopped (evicted, deleted, its node drained), not ended by the user.
    pub hung_up: bool,
}

/// Relays between the caller's stdin/stdout and the shell's PTY `master`
/// until process `shell` ends. `console` (PID 1's console in init mode) is
/// drained into `console_sink`. Window size changes and termination signals
/// are passed on.
pub fn relay(
    master: &OwnedFd,
    shell: Pid,
    init: Pid,
    console: Option<&OwnedFd>,
    console_sink: &mut dyn Write,
    signals: &SignalFd,
) -> RelayEnd {
    let stdin = std::io::stdin();
    let stdin_is_tty = termios::tcgetattr(stdin.as_fd()).is_ok();
    let mut stdin_open = true;
    let mut master_open = true;
    let mut end = RelayEnd::default();
    let mut shell_status: Option<WaitStatus> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut buffer = vec![0u8; 65536];
    let mut stdout = std::io::stdout().lock();
    loop {
        if let Some(deadline) = drain_deadline
            && (Instant::now() >= deadline || !master_open)
        {
            break;
        }
        let mut fds = Vec::with_capacity(4);
        fds.push(PollFd::new(signals.as_fd(), PollFlags::POLLIN));
        let master_index = master_open.then(|| {
            fds.push(PollFd::new(master.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let console_index = console.map(|c| {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let stdin_index = (stdin_open && shell_status.is_none()).then(|| {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let timeout = if drain_deadline.is_some() {
            PollTimeout::from(50u16)
        } else {
            PollTimeout::NONE
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => break,
        }
        let ready = |index: Option<usize>| {
            index.is_some_and(|i| {
                fds[i].revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                })
            })
        };
        let (signals_ready, master_ready, console_ready, stdin_ready) = (
            ready(Some(0)),
            ready(master_index),
            ready(console_index),
            ready(stdin_index),
        );
        drop(fds);
        if master_ready {
            match read(master, &mut buffer) {
                Ok(0) | Err(Errno::EIO) => master_open = false,
                Ok(n) => {
                    let _ = stdout.write_all(&buffer[..n]);
                    let _ = stdout.flush();
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(_) => master_open = false,
            }
        }
        if console_ready
            && let Some(console) = console
            && let Ok(n) = read(console, &mut buffer)
        {
            let _ = console_sink.write_all(&buffer[..n]);
        }
        if stdin_ready {
            match read(stdin.as_fd(), &mut buffer) {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    if !stdin_is_tty {
                        // End of piped input: end of input for the shell too.
                        let _ = write_all(master.as_fd(), b"\x04");
                    }
                }
                Ok(n) => {
                    let _ = write_all(master.as_fd(), &buffer[..n]);
                }
            }
        }
        if signals_ready {
            while let Ok(Some(info)) = signals.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGWINCH) => {
                        if let Some(size) = caller_window_size() {
                            let _ = sys::set_window_size(master.as_fd(), &size);
                        }
                    }
                    // SIGCHLD: reaped below.
                    Ok(Signal::SIGCHLD) | Err(_) => {}
                    Ok(Signal::SIGINT) => {
                        let _ = kill(shell, Signal::SIGINT);
                    }
                    Ok(_) => {
                        // SIGTERM, SIGHUP, SIGQUIT: hang up the shell, as a
                        // closed terminal would; cleanup follows its exit.
                        end.hung_up = true;
                        if shell == init {
                            // A basic shell is its PID namespace's init, and the kernel
                            // drops signals from outside the namespace that its init does
                            // not handle (a shell ignores SIGHUP there): only SIGKILL ends
                            // it. What it wrote is in the upper dir already.
                            let _ = kill(shell, Signal::SIGKILL);
                        } else {
                            let _ = kill(shell, Signal::SIGHUP);
                            let _ = kill(shell, Signal::SIGCONT);
                        }
                    }
                }
            }
        }
        // Reap whatever ended (the shell, PID 1, exec helpers).
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    let pid = status.pid();
                    if pid == Some(shell) {
                        shell_status = Some(status);
                    }
                    if pid == Some(init) {
                        end.init_status = Some(status);
                    }
                }
            }
        }
        if shell_status.is_some() && drain_deadline.is_none() {
            // Give the PTY a moment to deliver the shell's last output.
            drain_deadline = Some(Instant::now() + Duration::from_millis(300));
        }
    }
    end.shell_code = shell_status.map_or(1, exit_code);
    end
}

fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> nix::Result<()> {
    while !data.is_empty() {
        match write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
