//! Run an OS image like a WalT node: the image root of [`super::root`] with
//! the overlay upper dir in RAM and exposed at WalT's path, `/persist` bound
//! from a directory, the hostname of the node, the image's init (WalT's init
//! contract) or a keep-alive PID 1, and `/run/uptime-ready` once booted.
//! Processes (SSH sessions) are then started inside it on request.
//!
//! # Why a supervisor process
//! [`Container::start`] and [`Container::exec`] fork, so they need a
//! single-threaded caller, while the SSH server that asks for processes runs
//! on a multi-threaded async runtime. [`boot`] therefore forks, before any
//! thread exists, a **node supervisor**: a small single-threaded process that
//! owns the container (it is PID 1's parent, and a child subreaper so it can
//! wait for every process it starts), serves start and signal requests over a
//! `SOCK_SEQPACKET` socket pair, passes the session's pipes in and PTY masters
//! back with `SCM_RIGHTS`, and reports exit statuses. This was preferred to
//! re-executing our own binary per session (a fresh process per session is
//! single-threaded too): the supervisor starts a session in one fork plus one
//! `setns` round, keeps the PTY master in the SSH server's process (no extra
//! relay hop for keystrokes), and ties the container's lifetime to one process
//! whose end (socket closed, `SIGTERM`, parent death) shuts the node down.
//!
//! Nothing is left behind: every mount (the RAM upper dir included) lives in
//! the container's mount namespace, which goes away with its processes, and
//! PID 1 is killed when the supervisor dies.

use std::collections::{HashMap, HashSet};
use std::io::{IoSlice, IoSliceMut, Write as _};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};

use super::root::{BindMount, Command, Container, Network, RootSpec, Stdio};
use super::session::{self, Inspection, Mode, ModeChoice, SessionError, ShellRequest};
use super::sys::{self, Forked};
use super::terminal;

/// Where a WalT node exposes its overlay upper dir (what node save reads).
pub const UPPER_DIR_PATH: &str = "/run/walt/rootfs/mnt/fs_rw";
/// The file a WalT node writes once booted.
pub const READY_MARKER: &str = "/run/uptime-ready";
/// Where `--persist` is bound inside the node.
pub const PERSIST_PATH: &str = "/persist";
/// PID 1 of an image without WalT's init scripts: a shell that sleeps (and
/// reaps the orphans it inherits) until told to stop.
pub const KEEP_ALIVE_SCRIPT: &str = "trap 'exit 0' TERM INT HUP; while :; do sleep 3600 & wait $!; done";

/// Errors of booting and running a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The image cannot run as a node (checks of the shell runtime).
    #[error(transparent)]
    Refused(#[from] SessionError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        source: nix::Error,
    },
    /// The node supervisor failed to boot the node.
    #[error("booting the node failed: {0}")]
    Boot(String),
    /// The node supervisor is gone (the node stopped).
    #[error("the node is not running (its supervisor stopped): {0}")]
    Gone(String),
    /// A process could not be started in the node.
    #[error("starting {program} in the node failed: {reason}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        reason: String,
    },
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Sys { what, source }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The image's layers as directories, top first.
    pub lower_dirs: Vec<PathBuf>,
    /// The image's architecture and OS (from its config), when known.
    pub architecture: Option<String>,
    /// The image's OS.
    pub os: Option<String>,
    /// A fresh private directory on a real filesystem (mount point, links;
    /// the upper dir itself is a tmpfs mounted inside it).
    pub session_dir: PathBuf,
    /// The node's hostname.
    pub hostname: String,
    /// Host directory bound on `/persist` (persistent storage of the node).
    pub persist: Option<PathBuf>,
    /// Init when the image has WalT's scripts (auto), or force one mode.
    pub mode: ModeChoice,
    /// How long the shutdown script, then init, may take on shutdown.
    pub shutdown_timeout: Duration,
}

/// A node booted by [`boot`], seen from the process that booted it (before
/// its async runtime starts). Hand it to [`NodeExec::start`].
#[derive(Debug)]
pub struct BootedNode {
    /// The supervisor's PID (a child of the caller: wait for it at the end).
    pub supervisor: Pid,
    /// PID 1 of the node, as the caller sees it.
    pub init: Pid,
    /// What the checks found (mode, shell, architecture, emulation).
    pub inspection: Inspection,
    socket: OwnedFd,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessEnd {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl ProcessEnd {
    fn from_status(status: WaitStatus) -> Option<Self> {
        match status {
            WaitStatus::Exited(_, code) => Some(Self::Exited(code)),
            WaitStatus::Signaled(_, signal, core_dumped) => Some(Self::Signaled {
                signal: signal as i32,
                core_dumped,
            }),
            _ => None,
        }
    }
}

impl std::fmt::Display for ProcessEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Exited(code) => write!(f, "exit status {code}"),
            Self::Signaled { signal, .. } => match Signal::try_from(signal) {
                Ok(signal) => write!(f, "killed by {signal}"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
        }
    }
}

/// A terminal size (rows and columns, pixels optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
    /// Width in pixels (0 when unknown).
    pub x_pixels: u16,
    /// Height in pixels (0 when unknown).
    pub y_pixels: u16,
}

impl WindowSize {
    /// The kernel's `winsize`.
    pub fn to_winsize(self) -> libc::winsize {
        libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: self.x_pixels,
            ws_ypixel: self.y_pixels,
        }
    }
}

/// Sets the window size of a PTY (through its master).
pub fn set_window_size(master: &impl AsFd, size: WindowSize) -> nix::Result<()> {
    sys::set_window_size(master.as_fd(), &size.to_winsize())
}

/// A process to start in the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Absolute path of the program inside the node.
    pub program: String,
    /// `argv`, including `argv[0]`.
    pub args: Vec<String>,
    /// The whole environment (`KEY=value`).
    pub env: Vec<String>,
    /// Working directory (falls back to `/`).
    pub cwd: String,
    /// A PTY of this size (stdin, stdout and stderr on it), or pipes.
    pub pty: Option<WindowSize>,
}

/// Requests to the supervisor.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// Start a process; three descriptors (stdin, stdout, stderr) come with it
    /// unless a PTY is asked.
    Exec { id: u64, request: ExecRequest },
    /// Send a signal to a process the supervisor started (and did not reap yet).
    Signal { pid: i32, signal: i32 },
    /// Shut the node down.
    Shutdown,
}

/// Reports of the supervisor.
#[derive(Debug, Serialize, Deserialize)]
enum Report {
    Booted {
        init: i32,
    },
    BootFailed {
        error: String,
    },
    /// The PTY master comes with it when one was asked.
    Started {
        id: u64,
        pid: i32,
    },
    ExecFailed {
        id: u64,
        error: String,
    },
    Ended {
        pid: i32,
        end: ProcessEnd,
    },
    InitEnded {
        end: ProcessEnd,
    },
    Stopped,
}

fn send_message<T: Serialize>(socket: RawFd, message: &T, fds: &[RawFd]) -> nix::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(|_| nix::errno::Errno::EINVAL)?;
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        socket,
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(drop)
}

/// Receives one message and its descriptors; `None` at end of stream.
fn receive_message<T: for<'de> Deserialize<'de>>(
    socket: RawFd,
    flags: MsgFlags,
) -> nix::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 3]);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let message = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut cmsg_space),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = message.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                fds.extend(received.into_iter().map(sys::owned_fd));
            }
        }
    }
    let length = message.bytes;
    if length == 0 {
        return Ok(None);
    }
    serde_json::from_slice(&buffer[..length])
        .map(|parsed| Some((parsed, fds)))
        .map_err(|_| nix::errno::Errno::EBADMSG)
}

/// Checks the image (like an image shell: layers, OS, capabilities, shell,
/// mode, architecture and emulation), then forks the node supervisor, which
/// boots the node. Returns once the node is booted and `/run/uptime-ready`
/// written. Must be called from a single-threaded process (before any async
/// runtime starts).
pub fn boot(spec: &NodeSpec) -> Result<BootedNode, NodeError> {
    let request = ShellRequest {
        lower_dirs: spec.lower_dirs.clone(),
        session_dir: spec.session_dir.clone(),
        mode: spec.mode,
        architecture: spec.architecture.clone(),
        os: spec.os.clone(),
        network: Network::Host,
        console_log: None,
        shutdown_timeout: spec.shutdown_timeout,
    };
    let inspection = session::inspect(&request)?;
    if sys::thread_count() != 1 {
        return Err(NodeError::Boot(
            "cannot fork the node supervisor safely: this process already runs threads".into(),
        ));
    }
    let (parent_socket, child_socket) =
        super::root::seqpacket_pair().map_err(|error| NodeError::Boot(error.to_string()))?;
    match sys::fork().map_err(sys_err("fork the node supervisor"))? {
        Forked::Child => {
            drop(parent_socket);
            let code = supervise(spec, &inspection, &child_socket);
            sys::exit_child(code);
        }
        Forked::Parent(supervisor) => {
            drop(child_socket);
            let reply = loop {
                match receive_message::<Report>(parent_socket.as_raw_fd(), MsgFlags::empty()) {
                    Err(nix::errno::Errno::EINTR) => {}
                    other => break other,
                }
            };
            let fail = |error: String| {
                let _ = nix::sys::signal::kill(supervisor, Signal::SIGKILL);
                let _ = waitpid(supervisor, None);
                Err(NodeError::Boot(error))
            };
            match reply {
                Ok(Some((Report::Booted { init }, _))) => Ok(BootedNode {
                    supervisor,
                    init: Pid::from_raw(init),
                    inspection,
                    socket: parent_socket,
                }),
                Ok(Some((Report::BootFailed { error }, _))) => fail(error),
                Ok(Some((other, _))) => {
                    fail(format!("unexpected report from the node supervisor: {other:?}"))
                }
                Ok(None) => fail("the node supervisor exited during boot".into()),
                Err(error) => fail(format!("reading the node supervisor's report: {error}")),
            }
        }
    }
}

/// The root of a node: the image shell's root, with the upper dir on a
/// tmpfs, exposed at [`UPPER_DIR_PATH`], and `/persist`.
fn root_spec(spec: &NodeSpec, inspection: &Inspection) -> RootSpec {
    let mut root = RootSpec::new(spec.lower_dirs.clone(), &spec.session_dir);
    let ram = spec.session_dir.join("ram");
    root.upper_dir = ram.join("upper");
    root.work_dir = ram.join("work");
    root.ram_dir = Some(ram);
    root.hostname.clone_from(&spec.hostname);
    root.network = Network::Host;
    root.init_conventions = inspection.mode == Mode::Init;
    root.binds.push(BindMount {
        source: root.upper_dir.clone(),
        target: PathBuf::from(UPPER_DIR_PATH),
        read_only: false,
    });
    if let Some(persist) = &spec.persist {
        root.binds.push(BindMount {
            source: persist.clone(),
            target: PathBuf::from(PERSIST_PATH),
            read_only: false,
        });
    }
    root
}

/// PID 1: WalT's start script in init mode, else the keep-alive shell.
fn init_command(inspection: &Inspection) -> Command {
    match inspection.mode {
        Mode::Init => {
            let mut init = Command::new(session::START_SCRIPT, Stdio::Pty(None));
            init.env.push(format!("container={}", session::CONTAINER_NAME));
            init.cwd = "/".into();
            init
        }
        Mode::Basic => {
            let mut init = Command::new(&inspection.shell, Stdio::Null);
            init.args = vec![inspection.shell.clone(), "-c".into(), KEEP_ALIVE_SCRIPT.into()];
            init.cwd = "/".into();
            init
        }
    }
}

/// The supervisor's main loop (runs in the forked, single-threaded child).
/// Returns its exit code.
fn supervise(spec: &NodeSpec, inspection: &Inspection, socket: &OwnedFd) -> i32 {
    let report = |message: &Report, fds: &[RawFd]| {
        let _ = send_message(socket.as_raw_fd(), message, fds);
    };
    let signals = match terminal::signal_fd() {
        Ok(signals) => signals,
        Err(error) => {
            report(
                &Report::BootFailed {
                    error: format!("block signals: {error}"),
                },
                &[],
            );
            return 1;
        }
    };
    // Shut down when the SSH server's process dies, whatever killed it.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        report(
            &Report::BootFailed {
                error: format!("become a child subreaper: {error}"),
            },
            &[],
        );
        return 1;
    }
    let root = root_spec(spec, inspection);
    let mut container = match Container::start(&root, &init_command(inspection)) {
        Ok(container) => container,
        Err(error) => {
            report(
                &Report::BootFailed {
                    error: error.to_string(),
                },
                &[],
            );
            return 1;
        }
    };
    let init = container.init.pid;
    // The ready marker, in the node's own /run (reached through PID 1's root).
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    if let Err(error) = write_ready_marker(Path::new(&format!("/proc/{init}/root")), &uptime) {
        report(
            &Report::BootFailed {
                error: format!("write {READY_MARKER} in the node: {error}"),
            },
            &[],
        );
        return 1;
    }
    report(&Report::Booted { init: init.as_raw() }, &[]);

    let console = container.init.pty.take();
    let mut started: HashSet<i32> = HashSet::new();
    let mut buffer = vec![0u8; 16384];
    let mut init_ended = false;
    'serve: loop {
        let mut fds = vec![
            PollFd::new(socket.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(console) = &console {
            fds.push(PollFd::new(console.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
        let ready = |index: usize| {
            fds.get(index)
                .and_then(PollFd::revents)
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR))
        };
        let (socket_ready, signals_ready, console_ready) = (ready(0), ready(1), ready(2));
        drop(fds);
        if console_ready && let Some(console) = &console {
            // PID 1's console goes to the runtime's stderr (the pod's log).
            match nix::unistd::read(console, &mut buffer) {
                Ok(n) if n > 0 => {
                    let _ = std::io::stderr().write_all(&buffer[..n]);
                }
                _ => {}
            }
        }
        if signals_ready {
            while let Ok(Some(info)) = signals.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD | Signal::SIGWINCH) | Err(_) => {}
                    Ok(_) => break 'serve,
                }
            }
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(status) => {
                        let Some(pid) = status.pid() else { continue };
                        let Some(end) = ProcessEnd::from_status(status) else {
                            continue;
                        };
                        if pid == init {
                            container.set_init_status(status);
                            report(&Report::InitEnded { end }, &[]);
                            init_ended = true;
                        } else if started.remove(&pid.as_raw()) {
                            report(
                                &Report::Ended {
                                    pid: pid.as_raw(),
                                    end,
                                },
                                &[],
                            );
                        }
                    }
                }
            }
            if init_ended {
                break;
            }
        }
        if socket_ready {
            let received = receive_message::<Request>(socket.as_raw_fd(), MsgFlags::MSG_DONTWAIT);
            match received {
                Ok(Some((Request::Exec { id, request }, fds))) => match exec(&container, request, fds) {
                    Ok(process) => {
                        started.insert(process.pid.as_raw());
                        let pty: Vec<RawFd> = process.pty.iter().map(AsRawFd::as_raw_fd).collect();
                        report(
                            &Report::Started {
                                id,
                                pid: process.pid.as_raw(),
                            },
                            &pty,
                        );
                    }
                    Err(error) => report(&Report::ExecFailed { id, error }, &[]),
                },
                Ok(Some((Request::Signal { pid, signal }, _))) => {
                    if started.contains(&pid)
                        && let Ok(signal) = Signal::try_from(signal)
                    {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Ok(Some((Request::Shutdown, _)) | None) | Err(_) => break,
            }
        }
    }
    if !init_ended {
        shut_down(&mut container, inspection.mode, spec.shutdown_timeout);
    }
    container.finish();
    report(&Report::Stopped, &[]);
    0
}

/// Writes `text` as [`READY_MARKER`] in the node whose root is `root` (`/proc/PID/root` of its
/// PID 1). The supervisor writes from outside the node with every privilege of the pod, while the
/// image already runs: nothing the image made may redirect the write. `/run` is the runtime's own
/// tmpfs mount (the image cannot replace a mount point without `CAP_SYS_ADMIN`) and is opened
/// without following a link; the marker is opened there without following a link either (a
/// symbolic link planted by the image fails with `ELOOP` instead of sending the write to a host
/// file; a hard link cannot cross into that tmpfs), without blocking (a FIFO fails with `ENXIO`),
/// and must be a regular file.
fn write_ready_marker(root: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let (dir, name) = READY_MARKER
        .trim_start_matches('/')
        .rsplit_once('/')
        .unwrap_or(("", READY_MARKER));
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(root.join(dir))?;
    let file = nix::fcntl::openat(
        &dir,
        name,
        OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_TRUNC
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )?;
    let mut file = std::fs::File::from(file);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    file.write_all(text.as_bytes())
}

/// Stops the node: WalT's shutdown script first in init mode (up to
/// `timeout` for it, then for init to end), then `SIGKILL` to PID 1. Reaps
/// every child meanwhile: a dying PID 1 waits until the other processes of its
/// namespace are reaped, and the sessions are our children, so waiting for
/// PID 1 alone would never end.
fn shut_down(container: &mut Container, mode: Mode, timeout: Duration) {
    let init = container.init.pid;
    if mode == Mode::Init {
        let mut command = Command::new(session::SHUTDOWN_SCRIPT, Stdio::Null);
        command.env.push(format!("container={}", session::CONTAINER_NAME));
        command.cwd = "/".into();
        if let Ok(script) = container.exec(&command)
            && super::root::wait_timeout(script.pid, timeout, &mut || {}).is_none()
        {
            let _ = nix::sys::signal::kill(script.pid, Signal::SIGKILL);
        }
        if let Some(status) = reap_until(init, Some(std::time::Instant::now() + timeout)) {
            container.set_init_status(status);
            return;
        }
    }
    let _ = nix::sys::signal::kill(init, Signal::SIGKILL);
    if let Some(status) = reap_until(init, None) {
        container.set_init_status(status);
    }
}

/// Reaps every child until `init` is reaped (its status), or `deadline`
/// (`None`: no deadline) passes, or no child is left.
fn reap_until(init: Pid, deadline: Option<std::time::Instant>) -> Option<WaitStatus> {
    loop {
        let flags = deadline.map(|_| WaitPidFlag::WNOHANG);
        match waitpid(Pid::from_raw(-1), flags) {
            Ok(WaitStatus::StillAlive) => {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(status) if status.pid() == Some(init) => return Some(status),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
}

/// Starts one requested process in the container.
fn exec(
    container: &Container,
    request: ExecRequest,
    fds: Vec<OwnedFd>,
) -> Result<super::root::Process, String> {
    let stdio = if let Some(size) = request.pty {
        Stdio::Pty(Some(size.to_winsize()))
    } else {
        let fds: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|_| "expected three descriptors (stdin, stdout, stderr)".to_owned())?;
        Stdio::Fds(Arc::new(fds))
    };
    let command = Command {
        program: request.program,
        args: request.args,
        env: request.env,
        cwd: request.cwd,
        stdio,
        identity: None,
    };
    // The received descriptors are closed when `command` drops: only the
    // started process keeps them, so its pipes end when it does.
    container.exec(&command).map_err(|error| error.to_string())
}

// ---------------------------------------------------------------------------
// The async side: what the SSH server uses.

/// A process started by [`NodeExec::exec`].
#[derive(Debug)]
pub struct Started {
    /// Its PID (as the SSH server's process sees it).
    pub pid: i32,
    /// Its standard streams.
    pub io: StartedIo,
    /// Resolves when it ends (an error: the node stopped first).
    pub end: oneshot::Receiver<ProcessEnd>,
}

/// The caller's side of a started process's standard streams.
#[derive(Debug)]
pub enum StartedIo {
    /// The PTY master (stdin, stdout and stderr are its slave).
    Pty(OwnedFd),
    /// Pipes: write to `stdin`, read `stdout` and `stderr`.
    Pipes {
        /// Write end of its stdin.
        stdin: OwnedFd,
        /// Read end of its stdout.
        stdout: OwnedFd,
        /// Read end of its stderr.
        stderr: OwnedFd,
    },
}

/// The supervisor's answer to a start request.
#[derive(Debug)]
struct StartReply {
    pid: i32,
    pty: Option<OwnedFd>,
    end: oneshot::Receiver<ProcessEnd>,
}

type PendingStarts = HashMap<u64, oneshot::Sender<Result<StartReply, String>>>;

#[derive(Debug)]
struct ExecInner {
    socket: AsyncFd<OwnedFd>,
    next_id: AtomicU64,
    pending: Mutex<PendingStarts>,
    ends: Mutex<HashMap<i32, oneshot::Sender<ProcessEnd>>>,
    /// Why the node stopped, once it did.
    stopped: watch::Sender<Option<String>>,
}

/// Starts processes in a booted node, from async code. Clone it freely.
#[derive(Debug, Clone)]
pub struct NodeExec {
    inner: Arc<ExecInner>,
}

impl NodeExec {
    /// Takes over `node`'s supervisor connection (call it inside a Tokio
    /// runtime) and starts the task reading its reports.
    pub fn start(node: BootedNode) -> Result<Self, NodeError> {
        let socket = async_fd(node.socket).map_err(|error| {
            NodeError::Boot(format!(
                "registering the supervisor socket with the async runtime: {error}"
            ))
        })?;
        let (stopped, _) = watch::channel(None);
        let inner = Arc::new(ExecInner {
            socket,
            next_id: AtomicU64::new(1),
            pending: Mutex::default(),
            ends: Mutex::default(),
            stopped,
        });
        tokio::spawn(read_reports(inner.clone()));
        Ok(Self { inner })
    }

    /// Starts `request` in the node.
    pub async fn exec(&self, request: ExecRequest) -> Result<Started, NodeError> {
        let program = request.program.clone();
        let failed = |reason: String| NodeError::Exec {
            program: program.clone(),
            reason,
        };
        if let Some(reason) = self.inner.stopped.borrow().clone() {
            return Err(NodeError::Gone(reason));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        if let Ok(mut pending) = self.inner.pending.lock() {
            pending.insert(id, sender);
        }
        let pipes = if request.pty.is_none() {
            let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys_err("create a pipe"));
            let (stdin_read, stdin_write) = pipe()?;
            let (stdout_read, stdout_write) = pipe()?;
            let (stderr_read, stderr_write) = pipe()?;
            Some((
                [stdin_read, stdout_write, stderr_write],
                (stdin_write, stdout_read, stderr_read),
            ))
        } else {
            None
        };
        let theirs: Vec<RawFd> = pipes
            .as_ref()
            .map(|(theirs, _)| theirs.iter().map(AsRawFd::as_raw_fd).collect())
            .unwrap_or_default();
        let sent = self.send(&Request::Exec { id, request }, &theirs).await;
        if let Err(error) = sent {
            if let Ok(mut pending) = self.inner.pending.lock() {
                pending.remove(&id);
            }
            return Err(NodeError::Gone(format!("sending the request: {error}")));
        }
        // Only the started process keeps the child ends (the supervisor
        // closes its copies too).
        let ours = pipes.map(|(theirs, ours)| {
            drop(theirs);
            ours
        });
        let reply = receiver
            .await
            .map_err(|_| NodeError::Gone("it stopped before answering".into()))?
            .map_err(failed)?;
        let io = match (reply.pty, ours) {
            (Some(master), _) => StartedIo::Pty(master),
            (None, Some((stdin, stdout, stderr))) => StartedIo::Pipes {
                stdin,
                stdout,
                stderr,
            },
            (None, None) => {
                return Err(NodeError::Exec {
                    program,
                    reason: "the node sent no PTY".into(),
                });
            }
        };
        Ok(Started {
            pid: reply.pid,
            io,
            end: reply.end,
        })
    }

    /// Sends `signal` to a process started by [`Self::exec`] (ignored once it ended).
    pub async fn signal(&self, pid: i32, signal: Signal) {
        let _ = self
            .send(
                &Request::Signal {
                    pid,
                    signal: signal as i32,
                },
                &[],
            )
            .await;
    }

    /// Shuts the node down (WalT's shutdown script in init mode, then
    /// everything is killed) and waits up to `timeout` for it to stop.
    pub async fn shutdown(&self, timeout: Duration) {
        let _ = self.send(&Request::Shutdown, &[]).await;
        let mut stopped = self.inner.stopped.subscribe();
        let _ = tokio::time::timeout(timeout, stopped.wait_for(Option::is_some)).await;
    }

    /// Resolves when the node stops (its init ended, or the supervisor is
    /// gone), with the reason.
    pub async fn stopped(&self) -> String {
        let mut stopped = self.inner.stopped.subscribe();
        match stopped.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the node supervisor is gone".into(),
        }
    }

    async fn send(&self, request: &Request, fds: &[RawFd]) -> std::io::Result<()> {
        loop {
            let mut guard = self.inner.socket.writable().await?;
            match guard.try_io(|socket| {
                send_message(socket.get_ref().as_raw_fd(), request, fds).map_err(std::io::Error::from)
            }) {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }
}

/// Reads the supervisor's reports until it is gone; completes the waiting
/// starts and ends.
async fn read_reports(inner: Arc<ExecInner>) {
    let reason = loop {
        let Ok(mut guard) = inner.socket.readable().await else {
            break "the supervisor socket failed".to_owned();
        };
        let received = guard.try_io(|socket| {
            receive_message::<Report>(socket.get_ref().as_raw_fd(), MsgFlags::MSG_DONTWAIT)
                .map_err(std::io::Error::from)
        });
        let (report, fds) = match received {
            Err(_would_block) => continue,
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => break "the node supervisor exited".to_owned(),
            Ok(Err(error)) => break format!("reading the node supervisor's reports: {error}"),
        };
        match report {
            Report::Started { id, pid } => {
                let (end_sender, end) = oneshot::channel();
                if let Ok(mut ends) = inner.ends.lock() {
                    ends.insert(pid, end_sender);
                }
                let pty = fds.into_iter().next();
                let waiter = inner.pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(StartReply { pid, pty, end }));
                }
            }
            Report::ExecFailed { id, error } => {
                let waiter = inner.pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Err(error));
                }
            }
            Report::Ended { pid, end } => {
                let waiter = inner.ends.lock().ok().and_then(|mut e| e.remove(&pid));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(end);
                }
            }
            Report::InitEnded { end } => {
                inner
                    .stopped
                    .send_replace(Some(format!("the node's PID 1 ended ({end})")));
            }
            Report::Stopped => {
                inner.stopped.send_replace(Some("the node was shut down".into()));
            }
            Report::Booted { .. } | Report::BootFailed { .. } => {}
        }
    };
    inner.stopped.send_if_modified(|stopped| {
        if stopped.is_none() {
            *stopped = Some(reason);
            true
        } else {
            false
        }
    });
    // Whoever still waits learns that the node is gone.
    if let Ok(mut pending) = inner.pending.lock() {
        pending.clear();
    }
    if let Ok(mut ends) = inner.ends.lock() {
        ends.clear();
    }
}

/// Makes `fd` non-blocking and registers it with the Tokio runtime (a PTY
/// master, the supervisor socket), for async reads and writes.
pub fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    let flags = fcntl(&fd, FcntlArg::F_GETFL)?;
    fcntl(
        &fd,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    sys::register_async_fd(fd)
}

/// Waits for the supervisor (a child of the caller) to exit, up to `timeout`;
/// kills it after that.
pub fn wait_supervisor(supervisor: Pid, timeout: Duration) {
    if super::root::wait_timeout(supervisor, timeout, &mut || {}).is_none() {
        let _ = nix::sys::signal::kill(supervisor, Signal::SIGKILL);
        let _ = waitpid(supervisor, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_marker_is_written_in_the_node_and_never_through_a_link_it_planted() {
        let node = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir(node.path().join("run")).unwrap();
        write_ready_marker(node.path(), "12.5 3.0\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(node.path().join("run/uptime-ready")).unwrap(),
            "12.5 3.0\n"
        );
        // A link to a host file: refused, the host file untouched.
        let victim = host.path().join("passwd");
        std::fs::write(&victim, "root:x:0:0\n").unwrap();
        std::fs::remove_file(node.path().join("run/uptime-ready")).unwrap();
        std::os::unix::fs::symlink(&victim, node.path().join("run/uptime-ready")).unwrap();
        assert!(write_ready_marker(node.path(), "x").is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root:x:0:0\n");
        // /run itself a link: refused too.
        let other = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(host.path(), other.path().join("run")).unwrap();
        assert!(write_ready_marker(other.path(), "x").is_err());
        assert!(!host.path().join("uptime-ready").exists());
        // A FIFO: refused at once, not a hung supervisor.
        std::fs::remove_file(node.path().join("run/uptime-ready")).unwrap();
        nix::unistd::mkfifo(
            &node.path().join("run/uptime-ready"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert!(write_ready_marker(node.path(), "x").is_err());
    }
}
