//! Prepare an image root and run processes in it: the reusable core of the
//! image shell and of the virtual node.
//!
//! [`Container::start`] clones a process into new mount, pid, uts and ipc
//! namespaces (and a network namespace with [`Network::None`]), mounts an
//! overlay of [`RootSpec::lower_dirs`] under a fresh upper dir, sets up
//! `/proc`, a minimal `/dev`, a read-only `/sys`, tmpfs `/tmp` and `/run`,
//! `/etc/resolv.conf`, the hostname, pivots into it and `execve`s the init
//! [`Command`], which becomes PID 1. [`Container::exec`] runs more processes
//! in the same namespaces (like `podman exec`). Dropping the [`Container`]
//! kills its PID 1, which ends every process of the pid namespace; the mounts
//! live only in the container's mount namespace, so they disappear with it.
//! PID 1 also gets `SIGKILL` when the process that started it dies, so nothing
//! outlives a killed runtime.
//!
//! **Threads:** `start` and `exec` fork; call them from a single-threaded
//! process (start async runtimes after, or drop them before). They fail with
//! [`RootError::Threaded`] otherwise.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg,
    socketpair,
};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, chdir, dup2_stderr, dup2_stdin, dup2_stdout, execve, setsid};

use super::privileges;
use super::sys::{self, Forked};

/// Errors of root preparation and of running processes in a container.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The calling process has more than one thread (see the module docs).
    #[error(
        "cannot fork safely: this process has {0} threads; start containers before any thread (async runtime) is started"
    )]
    Threaded(usize),
    /// A system call of the parent side failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        source: nix::Error,
    },
    /// Preparing the state directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The container side reported an error before it could run the command.
    #[error("setting up the container failed: {0}")]
    Setup(String),
    /// A value cannot be passed to the kernel (it contains a NUL byte).
    #[error("{0} contains a NUL byte")]
    Nul(String),
}

type Result<T> = std::result::Result<T, RootError>;

fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> RootError {
    let what = what.into();
    move |source| RootError::Sys { what, source }
}

/// Which network the container sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// The network of the caller (the pod's network in a cluster).
    #[default]
    Host,
    /// A new, empty network namespace (loopback only, brought up).
    None,
}

/// A bind mount from the host into the container.
#[derive(Debug, Clone)]
pub struct BindMount {
    /// Host path (file or directory).
    pub source: PathBuf,
    /// Absolute path inside the image; created (and removed from the upper
    /// dir afterwards) when the image lacks it.
    pub target: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
}

/// Everything needed to build the root of a container.
#[derive(Debug, Clone)]
pub struct RootSpec {
    /// The image's layers as directories, **top layer first** (overlay order).
    /// Empty means: only the upper dir (a plain directory root).
    pub lower_dirs: Vec<PathBuf>,
    /// The overlay upper dir (where changes go). Must be on a real filesystem
    /// (not an overlay), like `work_dir` and `state_dir`.
    pub upper_dir: PathBuf,
    /// The overlay work dir (same filesystem as `upper_dir`, empty).
    pub work_dir: PathBuf,
    /// A private directory for the mount point and short lower-dir links.
    pub state_dir: PathBuf,
    /// Hostname inside the container.
    pub hostname: String,
    /// Mount the overlay with `userxattr` (needed inside a user namespace).
    pub user_xattr: bool,
    /// Network of the container.
    pub network: Network,
    /// Container conventions for an init system such as systemd: a tmpfs
    /// `/sys/fs/cgroup` carrying the cgroup v1 `name=systemd` hierarchy (in a
    /// cgroup namespace of its own), a transient `/etc/machine-id`, and the
    /// init's stdio on a console PTY bound at `/dev/console`.
    pub init_conventions: bool,
    /// Show the image's `/etc/cpuinfo` as `/proc/cpuinfo` when it has one.
    pub bind_cpuinfo: bool,
    /// Host file bound (read-only) on `/etc/resolv.conf`, when it exists.
    pub resolv_conf: Option<PathBuf>,
    /// More bind mounts (e.g. a `/persist` volume). Made after the overlay,
    /// `/run` and `/tmp` are mounted, so a source may be the upper dir itself.
    pub binds: Vec<BindMount>,
    /// A directory on which a tmpfs is mounted, in the container's mount
    /// namespace only, before the overlay; `upper_dir` and `work_dir` (which
    /// must be inside it) are made there. The changes then live in RAM, like
    /// a WalT node's, and vanish with the container.
    pub ram_dir: Option<PathBuf>,
    /// Mount fresh tmpfs on `/tmp` and `/run` (an interactive shell's
    /// scratch space). Off for image builds, where what a step writes there
    /// belongs to the image, as with Docker.
    pub scratch_tmpfs: bool,
}

impl RootSpec {
    /// A spec with the defaults of an image shell: hostname `image-shell`,
    /// host network, `/etc/resolv.conf` from the host, cpuinfo binding, and
    /// `userxattr` when running inside a user namespace.
    pub fn new(lower_dirs: Vec<PathBuf>, session_dir: &Path) -> Self {
        Self {
            lower_dirs,
            upper_dir: session_dir.join("upper"),
            work_dir: session_dir.join("work"),
            state_dir: session_dir.join("state"),
            hostname: "image-shell".into(),
            user_xattr: in_user_namespace(),
            network: Network::Host,
            init_conventions: false,
            bind_cpuinfo: true,
            resolv_conf: Some(PathBuf::from("/etc/resolv.conf")),
            binds: Vec::new(),
            ram_dir: None,
            scratch_tmpfs: true,
        }
    }
}

/// Whether this process runs in a user namespace other than the initial one
/// (where overlay needs the `userxattr` option).
pub fn in_user_namespace() -> bool {
    fs::read_to_string("/proc/self/uid_map").is_ok_and(|map| {
        let fields: Vec<&str> = map.split_whitespace().collect();
        fields != ["0", "0", "4294967295"]
    })
}

/// How a process's standard streams are connected.
#[derive(Debug, Clone)]
pub enum Stdio {
    /// A new PTY from the container's own devpts; the process gets the slave
    /// as stdin/stdout/stderr and controlling terminal, the caller gets the
    /// master in [`Process::pty`]. The size is applied before `execve`.
    Pty(Option<libc::winsize>),
    /// `/dev/null` for all three.
    Null,
    /// The caller's own stdin, stdout and stderr.
    Inherit,
    /// These descriptors as stdin, stdout and stderr (pipes of an SSH
    /// session, for instance), in a new session without a terminal.
    Fds(std::sync::Arc<[OwnedFd; 3]>),
}

/// A process to run in the container.
#[derive(Debug, Clone)]
pub struct Command {
    /// Absolute path of the program inside the container.
    pub program: String,
    /// `argv`, including `argv[0]`.
    pub args: Vec<String>,
    /// The whole environment (`KEY=value`).
    pub env: Vec<String>,
    /// Working directory inside the container (falls back to `/`).
    pub cwd: String,
    /// Standard streams.
    pub stdio: Stdio,
    /// Run as this user instead of root.
    pub identity: Option<Identity>,
}

/// A user to run a process as (from the image's `/etc/passwd` and `/etc/group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
}

impl Command {
    /// `program` with `argv[0] = program`, a basic environment (`PATH`,
    /// `HOME=/root`, `TERM` from the caller or `xterm`), in `/root`.
    pub fn new(program: &str, stdio: Stdio) -> Self {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        Self {
            program: program.into(),
            args: vec![program.into()],
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                "HOME=/root".into(),
                format!("TERM={term}"),
            ],
            cwd: "/root".into(),
            stdio,
            identity: None,
        }
    }
}

/// A process started in a container.
#[derive(Debug)]
pub struct Process {
    /// Its PID as the caller sees it.
    pub pid: Pid,
    /// The PTY master when started with [`Stdio::Pty`].
    pub pty: Option<OwnedFd>,
}

/// A running container: its PID 1 and its namespaces.
#[derive(Debug)]
pub struct Container {
    /// PID 1 of the container (started from the init [`Command`]).
    pub init: Process,
    /// Paths (inside the image) that were created as mount points and must be
    /// removed from the upper dir once the container is gone.
    pub created_mount_points: Vec<PathBuf>,
    network: Network,
    upper_dir: PathBuf,
    cgroup_name: Option<String>,
    init_status: Option<WaitStatus>,
}

/// The devices bound from the host into the container's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Mount points made when the image lacks them.
const BASE_DIRS: [&str; 5] = ["proc", "dev", "sys", "tmp", "run"];

/// Everything the child needs, computed before forking.
struct Plan {
    root: PathBuf,
    links_dir: PathBuf,
    overlay_options: String,
    cgroup: Option<(PathBuf, String)>,
}

impl Container {
    /// Prepares the root described by `spec` in new namespaces and runs
    /// `init` as its PID 1.
    pub fn start(spec: &RootSpec, init: &Command) -> Result<Self> {
        check_single_threaded()?;
        let plan = plan(spec)?;
        let argv = cstrings(&init.args, "argument")?;
        let envp = cstrings(&init.env, "environment")?;
        let program = cstring(&init.program, "program path")?;
        let (parent_sock, child_sock) = seqpacket_pair()?;
        let mut flags = CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC;
        if spec.network == Network::None {
            flags |= CloneFlags::CLONE_NEWNET;
        }
        let parent_pid = nix::unistd::getpid();
        match sys::clone_into_namespaces(flags).map_err(sys_err("clone into new namespaces"))? {
            Forked::Child => {
                drop(parent_sock);
                let mut created = Vec::new();
                let result = child_setup(spec, &plan, init, parent_pid, &mut created).and_then(|console| {
                    report(&child_sock, "created", Some(&encode_paths(&created)), None);
                    let master = console.as_ref().map(|(master, _)| master.as_raw_fd());
                    report(&child_sock, "ok", None, master);
                    drop(console);
                    exec(&program, &argv, &envp, &init.cwd, init.identity.as_ref())
                });
                if let Err(message) = result {
                    report(&child_sock, "error", Some(&message), None);
                }
                sys::exit_child(127);
            }
            Forked::Parent(pid) => {
                drop(child_sock);
                let mut container = Self {
                    init: Process { pid, pty: None },
                    created_mount_points: Vec::new(),
                    network: spec.network,
                    upper_dir: spec.upper_dir.clone(),
                    cgroup_name: plan.cgroup.as_ref().map(|(_, name)| name.clone()),
                    init_status: None,
                };
                let reply = collect_replies(&parent_sock)?;
                container.created_mount_points = reply.created;
                container.init.pty = reply.fd;
                if let Some(error) = reply.error {
                    return Err(RootError::Setup(error));
                }
                Ok(container)
            }
        }
    }

    /// Runs `command` in the container's namespaces (like `podman exec`).
    /// The caller should be a child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`)
    /// to be able to wait for it: it is forked by a short-lived helper.
    pub fn exec(&self, command: &Command) -> Result<Process> {
        check_single_threaded()?;
        let argv = cstrings(&command.args, "argument")?;
        let envp = cstrings(&command.env, "environment")?;
        let program = cstring(&command.program, "program path")?;
        let mut kinds = vec![
            ("ipc", CloneFlags::CLONE_NEWIPC),
            ("uts", CloneFlags::CLONE_NEWUTS),
        ];
        if self.network == Network::None {
            kinds.push(("net", CloneFlags::CLONE_NEWNET));
        }
        if self.cgroup_name.is_some() {
            kinds.push(("cgroup", CloneFlags::CLONE_NEWCGROUP));
        }
        kinds.push(("pid", CloneFlags::CLONE_NEWPID));
        kinds.push(("mnt", CloneFlags::CLONE_NEWNS));
        let mut namespaces = Vec::new();
        for (name, flag) in kinds {
            let path = format!("/proc/{}/ns/{name}", self.init.pid);
            let fd = open(path.as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(sys_err(format!("open {path} (is the container still running?)")))?;
            namespaces.push((name, flag, fd));
        }
        let (parent_sock, child_sock) = seqpacket_pair()?;
        match sys::fork().map_err(sys_err("fork"))? {
            Forked::Child => {
                drop(parent_sock);
                let result = (|| -> std::result::Result<(), String> {
                    unblock_signals()?;
                    for (name, flag, fd) in &namespaces {
                        setns(fd, *flag).map_err(|e| format!("setns into the {name} namespace: {e}"))?;
                    }
                    match sys::fork().map_err(|e| format!("fork: {e}"))? {
                        Forked::Parent(child) => {
                            report(&child_sock, "pid", Some(&child.as_raw().to_string()), None);
                            sys::exit_child(0);
                        }
                        Forked::Child => {
                            let pty = setup_stdio(&command.stdio, Path::new("/dev/ptmx"))?;
                            let master = pty.as_ref().map(|(master, _)| master.as_raw_fd());
                            report(&child_sock, "ok", None, master);
                            drop(pty);
                            exec(&program, &argv, &envp, &command.cwd, command.identity.as_ref())
                        }
                    }
                })();
                if let Err(message) = result {
                    report(&child_sock, "error", Some(&message), None);
                }
                sys::exit_child(127);
            }
            Forked::Parent(helper) => {
                drop(child_sock);
                drop(namespaces);
                let reply = collect_replies(&parent_sock);
                // The helper exits right after forking; reap it.
                let _ = waitpid(helper, None);
                let reply = reply?;
                if let Some(error) = reply.error {
                    if let Some(pid) = reply.pid {
                        let _ = kill(pid, Signal::SIGKILL);
                        let _ = waitpid(pid, None);
                    }
                    return Err(RootError::Setup(error));
                }
                let pid = reply
                    .pid
                    .ok_or_else(|| RootError::Setup("the exec helper did not report a PID".into()))?;
                Ok(Process { pid, pty: reply.fd })
            }
        }
    }

    /// Waits up to `timeout` for PID 1 to end; returns its status, or `None`
    /// on timeout. `pump` is called every few milliseconds while waiting (to
    /// drain a console, for instance).
    pub fn wait_init(&mut self, timeout: Duration, mut pump: impl FnMut()) -> Option<WaitStatus> {
        if self.init_status.is_some() {
            return self.init_status;
        }
        self.init_status = wait_timeout(self.init.pid, timeout, &mut pump);
        self.init_status
    }

    /// Records PID 1's status when the caller reaped it itself.
    pub fn set_init_status(&mut self, status: WaitStatus) {
        self.init_status = Some(status);
    }

    /// Kills every process of the container (`SIGKILL` to PID 1) and waits.
    pub fn kill(&mut self) {
        if self.init_status.is_none() {
            let _ = kill(self.init.pid, Signal::SIGKILL);
            self.init_status = waitpid(self.init.pid, None).ok();
        }
    }

    /// Kills the container if still running, then removes the mount points
    /// it had to create from the upper dir (so they are not seen as changes)
    /// and its cgroup.
    pub fn finish(mut self) {
        self.kill();
        self.cleanup();
    }

    fn cleanup(&mut self) {
        remove_mount_points(&self.upper_dir, self.created_mount_points.drain(..).rev());
        if let Some(name) = self.cgroup_name.take() {
            remove_cgroup(&name);
        }
    }
}

/// Removes the mount points the runtime created (absolute paths inside the image) from the upper
/// dir, when still an empty file or directory. The image ran as root in between and may have
/// replaced a directory on the way by a symbolic link (`/etc` → a host directory): such a path is
/// left alone, since the runtime, privileged on the host, would follow the link out of the upper
/// dir.
fn remove_mount_points(upper_dir: &Path, paths: impl Iterator<Item = PathBuf>) {
    for path in paths {
        let relative = path.strip_prefix("/").unwrap_or(&path);
        if !parents_are_directories(upper_dir, relative) {
            continue;
        }
        let in_upper = upper_dir.join(relative);
        match fs::symlink_metadata(&in_upper) {
            Ok(meta) if meta.is_dir() => {
                let _ = fs::remove_dir(&in_upper);
            }
            Ok(meta) if meta.is_file() && meta.len() == 0 => {
                let _ = fs::remove_file(&in_upper);
            }
            _ => {}
        }
    }
}

/// Whether every parent of `relative` under `base` is a real directory (not a symbolic link).
fn parents_are_directories(base: &Path, relative: &Path) -> bool {
    relative
        .ancestors()
        .skip(1)
        .filter(|parent| !parent.as_os_str().is_empty())
        .all(|parent| fs::symlink_metadata(base.join(parent)).is_ok_and(|meta| meta.is_dir()))
}

impl Drop for Container {
    fn drop(&mut self) {
        self.kill();
        self.cleanup();
    }
}

/// Mounts the overlay of `spec` (no namespaces other than a private mount
/// namespace, nothing else mounted in it) in a short-lived child process and
/// runs `work` there with the merged root's path; the changes land in
/// `spec.upper_dir`. Used by image builds to copy files in with the kernel's
/// own copy-up, whiteout and opaque-directory rules.
pub fn with_mounted_root(spec: &RootSpec, work: impl FnOnce(&Path) -> ChildResult<()>) -> Result<()> {
    check_single_threaded()?;
    let plan = plan(spec)?;
    let (parent_sock, child_sock) = seqpacket_pair()?;
    let parent_pid = nix::unistd::getpid();
    match sys::fork().map_err(sys_err("fork"))? {
        Forked::Child => {
            drop(parent_sock);
            let result = (|| -> ChildResult<()> {
                prepare_process(parent_pid)?;
                unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("create a mount namespace: {e}"))?;
                private_mount_tree(spec, &plan)?;
                mount_overlay(&plan)?;
                work(&plan.root)
            })();
            let code = match result {
                Ok(()) => 0,
                Err(message) => {
                    report(&child_sock, "error", Some(&message), None);
                    1
                }
            };
            sys::exit_child(code);
        }
        Forked::Parent(pid) => {
            drop(child_sock);
            let reply = collect_replies(&parent_sock);
            let status = waitpid(pid, None).map_err(sys_err("wait for the copy process"))?;
            if let Some(error) = reply?.error {
                return Err(RootError::Setup(error));
            }
            match status {
                WaitStatus::Exited(_, 0) => Ok(()),
                other => Err(RootError::Setup(format!("the copy process ended with {other:?}"))),
            }
        }
    }
}

/// Waits for `pid` up to `timeout`, calling `pump` in between.
pub fn wait_timeout(pid: Pid, timeout: Duration, pump: &mut dyn FnMut()) -> Option<WaitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => return Some(status),
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        pump();
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn check_single_threaded() -> Result<()> {
    match sys::thread_count() {
        1 => Ok(()),
        n => Err(RootError::Threaded(n)),
    }
}

fn cstring(value: &str, what: &str) -> Result<CString> {
    CString::new(value).map_err(|_| RootError::Nul(format!("{what} {value:?}")))
}

fn cstrings(values: &[String], what: &str) -> Result<Vec<CString>> {
    values.iter().map(|value| cstring(value, what)).collect()
}

/// A close-on-exec `SOCK_SEQPACKET` socket pair (also the node supervisor's channel).
pub(super) fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(sys_err("socketpair"))
}

/// Computes paths, options and the short lower-dir links, in the parent.
fn plan(spec: &RootSpec) -> Result<Plan> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| RootError::Io { what, path, source }
    };
    for dir in [&spec.upper_dir, &spec.work_dir, &spec.state_dir] {
        fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let root = spec.state_dir.join("root");
    fs::create_dir_all(&root).map_err(io("create", &root))?;
    // Overlay options must fit in one page: link each layer under a short name
    // and mount from inside the links directory.
    let links_dir = spec.state_dir.join("l");
    if links_dir.exists() {
        fs::remove_dir_all(&links_dir).map_err(io("clean", &links_dir))?;
    }
    fs::create_dir_all(&links_dir).map_err(io("create", &links_dir))?;
    let mut lower = Vec::new();
    for (index, dir) in spec.lower_dirs.iter().enumerate() {
        let absolute = fs::canonicalize(dir).map_err(io("resolve lower dir", dir))?;
        symlink(&absolute, links_dir.join(index.to_string())).map_err(io("link", dir))?;
        lower.push(index.to_string());
    }
    if lower.is_empty() {
        // An overlay needs one lower dir: an empty one.
        let empty = spec.state_dir.join("empty");
        fs::create_dir_all(&empty).map_err(io("create", &empty))?;
        symlink(&empty, links_dir.join("0")).map_err(io("link", &empty))?;
        lower.push("0".into());
    }
    let upper = fs::canonicalize(&spec.upper_dir).map_err(io("resolve", &spec.upper_dir))?;
    let work = fs::canonicalize(&spec.work_dir).map_err(io("resolve", &spec.work_dir))?;
    let mut overlay_options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    if spec.user_xattr {
        overlay_options.push_str(",userxattr");
    }
    let cgroup = if spec.init_conventions {
        let name = format!(
            "walt-{}-{}",
            std::process::id(),
            spec.state_dir
                .parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mount_dir = spec.state_dir.join("cgroup");
        fs::create_dir_all(&mount_dir).map_err(io("create", &mount_dir))?;
        Some((mount_dir, name))
    } else {
        None
    };
    Ok(Plan {
        root,
        links_dir,
        overlay_options,
        cgroup,
    })
}

// ---------------------------------------------------------------------------
// Child side. Errors are strings sent back to the parent.

/// Results of the child side: errors are messages for the parent.
pub type ChildResult<T> = std::result::Result<T, String>;

fn report(sock: &OwnedFd, kind: &str, text: Option<&str>, fd: Option<RawFd>) {
    let message = match text {
        Some(text) => format!("{kind}:{text}"),
        None => kind.to_string(),
    };
    let fds;
    let cmsgs: &[ControlMessage<'_>] = match fd {
        Some(fd) => {
            fds = [fd];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    let _ = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(message.as_bytes())],
        cmsgs,
        MsgFlags::empty(),
        None,
    );
}

fn encode_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Default)]
struct Replies {
    fd: Option<OwnedFd>,
    pid: Option<Pid>,
    error: Option<String>,
    created: Vec<PathBuf>,
}

/// Reads the child's messages until the socket closes (the child exec'd or
/// exited).
fn collect_replies(sock: &OwnedFd) -> Result<Replies> {
    let mut replies = Replies::default();
    let mut buffer = vec![0u8; 65536];
    loop {
        let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
        let (bytes, fds) = {
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let message = match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(message) => message,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(sys_err("read the container's setup report")(e)),
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = message.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        fds.extend(received);
                    }
                }
            }
            (message.bytes, fds)
        };
        for fd in fds {
            replies.fd = Some(sys::owned_fd(fd));
        }
        if bytes == 0 {
            return Ok(replies);
        }
        let text = String::from_utf8_lossy(&buffer[..bytes]).into_owned();
        let (kind, rest) = text.split_once(':').unwrap_or((text.as_str(), ""));
        match kind {
            "pid" => replies.pid = rest.parse().ok().map(Pid::from_raw),
            "error" => replies.error = Some(rest.to_string()),
            "created" => {
                replies.created = rest
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(PathBuf::from)
                    .collect();
            }
            _ => {}
        }
    }
}

/// A clean signal state for the image's programs: nothing blocked, every action the default.
fn unblock_signals() -> ChildResult<()> {
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| format!("reset the signal mask: {e}"))?;
    sys::default_signal_actions().map_err(|e| format!("reset the signal actions: {e}"))
}

/// Builds the root and returns the console PTY (master, slave) of PID 1 when
/// its stdio is a PTY. Each step is named; they run in this order because each needs the one
/// before (the overlay before what is mounted in it, everything before `pivot_root`).
fn child_setup(
    spec: &RootSpec,
    plan: &Plan,
    init: &Command,
    parent: Pid,
    created: &mut Vec<PathBuf>,
) -> ChildResult<Option<(OwnedFd, OwnedFd)>> {
    prepare_process(parent)?;
    private_mount_tree(spec, plan)?;
    mount_ram_dir(spec)?;
    mount_overlay(plan)?;
    let root = &plan.root;
    for dir in BASE_DIRS {
        ensure_dir(root, Path::new(dir), created)?;
    }
    mount_proc(root)?;
    let pts = mount_dev(root)?;
    mount_sys(root, plan)?;
    if spec.scratch_tmpfs {
        mount_tmp_and_run(root)?;
    }
    if spec.init_conventions {
        mount_for_init(root)?;
    }
    bind_files(spec, root, created)?;
    let console = console_of(init, root, &pts)?;
    enter_root(spec, root)?;
    if let Some((master, slave_path)) = console {
        let inside = Path::new("/dev/pts").join(slave_path.file_name().unwrap_or_default());
        let slave = attach_terminal(&inside)?;
        Ok(Some((master, slave)))
    } else {
        setup_stdio(&init.stdio, Path::new("/dev/ptmx"))?;
        Ok(None)
    }
}

/// The child's process state: clean signals, killed with its parent, and the parent still there.
fn prepare_process(parent: Pid) -> ChildResult<()> {
    unblock_signals()?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| format!("set the parent-death signal: {e}"))?;
    if nix::unistd::getppid() != parent && nix::unistd::getppid().as_raw() != 0 {
        return Err("the runtime exited during setup".into());
    }
    Ok(())
}

/// A private mount tree (nothing propagates to the host), loopback up, the systemd cgroup entered.
fn private_mount_tree(spec: &RootSpec, plan: &Plan) -> ChildResult<()> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(m("make the mount tree private".into()))?;
    if spec.network == Network::None {
        bring_loopback_up();
    }
    if let Some((mount_dir, name)) = &plan.cgroup {
        enter_systemd_cgroup(mount_dir, name)?;
    }

    Ok(())
}

/// The RAM dir holding the upper and work dirs, when asked for.
fn mount_ram_dir(spec: &RootSpec) -> ChildResult<()> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    if let Some(ram) = &spec.ram_dir {
        mount(
            Some("tmpfs"),
            ram,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=755"),
        )
        .map_err(m(format!("mount a tmpfs on {}", ram.display())))?;
        for dir in [&spec.upper_dir, &spec.work_dir] {
            fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
    }

    Ok(())
}

/// The overlay root (mounted from the links dir, so long lower dir lists fit the options).
fn mount_overlay(plan: &Plan) -> ChildResult<()> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    // The overlay.
    let root = &plan.root;
    chdir(&plan.links_dir).map_err(m(format!("chdir {}", plan.links_dir.display())))?;
    // nodev: root keeps CAP_MKNOD (package scripts make device nodes), so a node of the host's
    // disk made anywhere in the image must not open. nosuid: the image's processes run with
    // no_new_privs, which already voids setuid bits and file capabilities; nosuid says the same
    // on the mount (an image's su/sudo/ping for non-root users do not elevate; root shells, the
    // init and the SSH sessions run as root and need none).
    mount(
        Some("overlay"),
        root,
        Some("overlay"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(plan.overlay_options.as_str()),
    )
    .map_err(|e| {
        format!(
            "mount the overlay ({}) on {}: {e}",
            plan.overlay_options,
            root.display()
        )
    })?;
    chdir("/").map_err(m("chdir /".into()))?;

    Ok(())
}

/// `/proc`.
fn mount_proc(root: &Path) -> ChildResult<()> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    let at = |p: &str| root.join(p);
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("proc"),
        &at("proc"),
        Some("proc"),
        nosuid_nodev | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(m("mount /proc".into()))?;
    protect_paths(&at("proc"), &PROC_READ_ONLY, &PROC_MASKED)
}

/// `/proc` entries the image's processes may read but not write: they act on the host's kernel,
/// not on the container's namespaces (a `kernel.core_pattern` or `kernel.modprobe` sysctl names a
/// program the host then runs as root, `sysrq-trigger` reboots the host), and `/proc/sys` checks
/// uid 0, not capabilities, so the bounded capability set alone does not stop a write. As Docker.
const PROC_READ_ONLY: [&str; 5] = ["bus", "fs", "irq", "sys", "sysrq-trigger"];

/// `/proc` entries hidden (an empty read-only tmpfs on directories, `/dev/null` on files): host-wide
/// state that is no business of the image's (kernel memory, timers, keys, hardware). As Docker.
const PROC_MASKED: [&str; 9] = [
    "acpi",
    "asound",
    "kcore",
    "keys",
    "latency_stats",
    "sched_debug",
    "scsi",
    "timer_list",
    "timer_stats",
];

/// `/sys` entries hidden (firmware tables and variables, power counters), as Docker.
const SYS_MASKED: [&str; 2] = ["firmware", "devices/virtual/powercap"];

/// Makes each `read_only` entry under `base` a read-only bind of itself and hides each `masked`
/// one; entries the kernel lacks are skipped. Runs before `pivot_root` (the host's `/dev/null`
/// masks files).
fn protect_paths(base: &Path, read_only: &[&str], masked: &[&str]) -> ChildResult<()> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    for entry in read_only {
        let path = base.join(entry);
        if fs::symlink_metadata(&path).is_err() {
            continue;
        }
        mount(
            Some(&path),
            &path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(m(format!("bind {} on itself", path.display())))?;
        restrict_bind(&path, true).map_err(m(format!("remount {} read-only", path.display())))?;
    }
    for entry in masked {
        let path = base.join(entry);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            mount(
                Some("tmpfs"),
                &path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0"),
            )
        } else {
            mount(
                Some("/dev/null"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        }
        .map_err(m(format!("mask {}", path.display())))?;
    }
    Ok(())
}

/// `/dev`: a tmpfs with the host's harmless devices, a new devpts and `/dev/shm`; returns the
/// devpts mount point.
fn mount_dev(root: &Path) -> ChildResult<PathBuf> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    let at = |p: &str| root.join(p);
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // /dev: a tmpfs with the host's harmless devices bound in. nodev: a node made here with
    // mknod (of the host's disk, say) does not open; the bound devices are mounts of their own
    // that keep the flags of the host's /dev, so they still work, and the devpts below is its own
    // mount too (no mknod there).
    mount(
        Some("tmpfs"),
        &at("dev"),
        Some("tmpfs"),
        nosuid_nodev,
        Some("mode=755,size=65536k"),
    )
    .map_err(m("mount a tmpfs on /dev".into()))?;
    for device in DEVICES {
        let target = at("dev").join(device);
        fs::File::create(&target).map_err(|e| format!("create {}: {e}", target.display()))?;
        let source = Path::new("/dev").join(device);
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(m(format!("bind {}", source.display())))?;
    }
    let pts = at("dev/pts");
    fs::create_dir(&pts).map_err(|e| format!("create /dev/pts: {e}"))?;
    let devpts = mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    );
    if devpts.is_err() {
        // gid 5 may be unmapped in a user namespace.
        mount(
            Some("devpts"),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
        .map_err(m("mount a new devpts instance on /dev/pts".into()))?;
    }
    let shm = at("dev/shm");
    fs::create_dir(&shm).map_err(|e| format!("create /dev/shm: {e}"))?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        nosuid_nodev,
        Some("mode=1777,size=65536k"),
    )
    .map_err(m("mount /dev/shm".into()))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        symlink(target, at("dev").join(link)).map_err(|e| format!("link /dev/{link}: {e}"))?;
    }

    Ok(pts)
}

/// `/sys` read-only, and the systemd cgroup when init runs.
fn mount_sys(root: &Path, plan: &Plan) -> ChildResult<()> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    let at = |p: &str| root.join(p);
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // /sys, read-only.
    let sys_flags = MsFlags::MS_RDONLY | nosuid_nodev | MsFlags::MS_NOEXEC;
    if mount(Some("sysfs"), &at("sys"), Some("sysfs"), sys_flags, None::<&str>).is_err() {
        // A user namespace that does not own the network namespace cannot
        // mount sysfs: bind the caller's, read-only.
        mount(
            Some("/sys"),
            &at("sys"),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(m("bind /sys".into()))?;
        mount(
            None::<&str>,
            &at("sys"),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | sys_flags,
            None::<&str>,
        )
        .map_err(m("remount /sys read-only".into()))?;
        // The caller's mounts under /sys (its cgroups, say) came along: read-only too.
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("read the mount table: {e}"))?;
        for below in submounts(&mountinfo, &at("sys")) {
            restrict_bind(&below, true).map_err(m(format!("remount {} read-only", below.display())))?;
        }
    }
    protect_paths(&at("sys"), &[], &SYS_MASKED)?;
    if let Some((mount_dir, name)) = &plan.cgroup {
        let cgroup = at("sys/fs/cgroup");
        mount(
            Some("tmpfs"),
            &cgroup,
            Some("tmpfs"),
            nosuid_nodev | MsFlags::MS_NOEXEC,
            Some("mode=755"),
        )
        .map_err(m("mount a tmpfs on /sys/fs/cgroup".into()))?;
        let systemd = cgroup.join("systemd");
        fs::create_dir(&systemd).map_err(|e| format!("create /sys/fs/cgroup/systemd: {e}"))?;
        mount(
            Some(&mount_dir.join(name)),
            &systemd,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(m("bind the container's name=systemd cgroup".into()))?;
        umount2(mount_dir, MntFlags::MNT_DETACH).map_err(m("unmount the cgroup staging mount".into()))?;
    }

    Ok(())
}

/// The mount points strictly below `dir` in a `/proc/PID/mountinfo` text (octal escapes decoded),
/// parents first.
fn submounts(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_path(field)))
        .filter(|path| path != dir && path.starts_with(dir))
        .collect()
}

/// A mount point as the kernel writes it in mountinfo (`\040` for a space, and so on), decoded.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let octal = bytes
            .get(index + 1..index + 4)
            .filter(|digits| bytes[index] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        if let Some(byte) = octal {
            out.push(byte);
            index += 4;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Fresh tmpfs on `/tmp` and `/run`.
fn mount_tmp_and_run(root: &Path) -> ChildResult<()> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    let at = |p: &str| root.join(p);
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("tmpfs"),
        &at("tmp"),
        Some("tmpfs"),
        nosuid_nodev,
        Some("mode=1777"),
    )
    .map_err(m("mount a tmpfs on /tmp".into()))?;
    mount(
        Some("tmpfs"),
        &at("run"),
        Some("tmpfs"),
        nosuid_nodev,
        Some("mode=755"),
    )
    .map_err(m("mount a tmpfs on /run".into()))?;

    Ok(())
}

/// What an init such as systemd would mount itself at boot, which it cannot do with the bounded
/// capability set (no `CAP_SYS_ADMIN`): systemd skips what is already a mount point and stops when
/// a mount it calls essential fails. `/proc`, `/sys`, `/dev`, `/dev/shm`, `/dev/pts`, `/run` and the
/// cgroup are mounted for every container; here `/run/lock` (essential since systemd 251, as
/// systemd mounts it: tmpfs, 5 MiB, world-writable with the sticky bit).
fn mount_for_init(root: &Path) -> ChildResult<()> {
    let lock = root.join("run/lock");
    fs::create_dir_all(&lock).map_err(|e| format!("create /run/lock: {e}"))?;
    mount(
        Some("tmpfs"),
        &lock,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=5242880"),
    )
    .map_err(|e| format!("mount a tmpfs on /run/lock: {e}"))
}

/// Files bound in: resolv.conf, `/etc/cpuinfo` as `/proc/cpuinfo`, a transient machine-id, and
/// the caller's binds.
fn bind_files(spec: &RootSpec, root: &Path, created: &mut Vec<PathBuf>) -> ChildResult<()> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    let at = |p: &str| root.join(p);
    if let Some(resolv) = spec.resolv_conf.as_ref().filter(|p| p.exists()) {
        let target = bind_target(root, Path::new("/etc/resolv.conf"), false, created)?;
        mount(
            Some(resolv),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(m("bind /etc/resolv.conf".into()))?;
        // Best effort: a resolv.conf the image may write changes nothing outside it.
        let _ = restrict_bind(&target, true);
    }
    if spec.bind_cpuinfo && at("etc/cpuinfo").is_file() {
        mount(
            Some(&at("etc/cpuinfo")),
            &at("proc/cpuinfo"),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(m("bind /etc/cpuinfo on /proc/cpuinfo".into()))?;
    }
    if spec.init_conventions {
        let id = machine_id();
        let transient = at("run/machine-id");
        fs::write(&transient, format!("{id}\n")).map_err(|e| format!("write /run/machine-id: {e}"))?;
        let target = bind_target(root, Path::new("/etc/machine-id"), false, created)?;
        mount(
            Some(&transient),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(m("bind a transient /etc/machine-id".into()))?;
    }
    for bind in &spec.binds {
        let is_dir = bind.source.is_dir();
        let target = bind_target(root, &bind.target, is_dir, created)?;
        mount(
            Some(&bind.source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(m(format!(
            "bind {} on {}",
            bind.source.display(),
            bind.target.display()
        )))?;
        // A host directory (`/persist`) the image writes: nodev and nosuid like the root.
        restrict_bind(&target, bind.read_only)
            .map_err(|e| format!("remount {} nodev,nosuid: {e}", bind.target.display()))?;
    }

    Ok(())
}

/// Remounts the bind mount at `target` `nodev` and `nosuid` (read-only when asked).
fn restrict_bind(target: &Path, read_only: bool) -> nix::Result<()> {
    let current = nix::sys::statvfs::statvfs(target)?.flags();
    mount(
        None::<&str>,
        target,
        None::<&str>,
        bind_remount_flags(current, read_only),
        None::<&str>,
    )
}

/// The kernel's `ST_RELATIME` statvfs flag (`linux/statfs.h`). nix names it only on glibc; musl's
/// `statvfs` passes the kernel's flags through unchanged, so the static build reads the same bit.
const ST_RELATIME: nix::sys::statvfs::FsFlags = nix::sys::statvfs::FsFlags::from_bits_retain(0x1000);

/// The flags of a bind remount adding `nodev`, `nosuid` (and `ro` when asked) to a mount that has
/// `current`: the flags it has are kept, since in a user namespace those of the source mount are
/// locked and a remount that would clear one fails.
fn bind_remount_flags(current: nix::sys::statvfs::FsFlags, read_only: bool) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    for (has, keep) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(has) {
            flags |= keep;
        }
    }
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    flags
}

/// PID 1's console, from the container's own devpts (when its stdio is a PTY).
fn console_of(init: &Command, root: &Path, pts: &Path) -> ChildResult<Option<(OwnedFd, PathBuf)>> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    let at = |p: &str| root.join(p);
    // PID 1's console, from the container's own devpts.
    let console = match &init.stdio {
        Stdio::Pty(size) => {
            let size = *size;
            let (master, slave_path) = open_pty(&at("dev/pts/ptmx"), pts, size)?;
            let console = at("dev/console");
            fs::File::create(&console).map_err(|e| format!("create /dev/console: {e}"))?;
            mount(
                Some(&slave_path),
                &console,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(m("bind the console PTY on /dev/console".into()))?;
            Some((master, slave_path))
        }
        _ => None,
    };

    Ok(console)
}

/// The hostname, then `pivot_root` into the new root and the old one detached.
fn enter_root(spec: &RootSpec, root: &Path) -> ChildResult<()> {
    let m = |what: String| move |e: nix::Error| format!("{what}: {e}");
    nix::unistd::sethostname(&spec.hostname).map_err(m("set the hostname".into()))?;
    chdir(root).map_err(m(format!("chdir {}", root.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(m("pivot_root".into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(m("detach the old root".into()))?;
    chdir("/").map_err(m("chdir /".into()))?;

    Ok(())
}

/// Connects stdio as asked. For [`Stdio::Pty`], opens a PTY from `ptmx` and
/// returns (master, slave).
fn setup_stdio(stdio: &Stdio, ptmx: &Path) -> ChildResult<Option<(OwnedFd, OwnedFd)>> {
    match stdio {
        Stdio::Fds(fds) => {
            // Move them above 2 first: dup2 onto 0..=2 must not overwrite one
            // of the others.
            let mut moved = Vec::with_capacity(3);
            for fd in fds.iter() {
                let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
                    .map_err(|e| format!("duplicate a standard stream: {e}"))?;
                moved.push(sys::owned_fd(raw));
            }
            dup2_stdin(&moved[0]).map_err(|e| format!("dup2 stdin: {e}"))?;
            dup2_stdout(&moved[1]).map_err(|e| format!("dup2 stdout: {e}"))?;
            dup2_stderr(&moved[2]).map_err(|e| format!("dup2 stderr: {e}"))?;
            setsid().map_err(|e| format!("setsid: {e}"))?;
            Ok(None)
        }
        Stdio::Inherit => Ok(None),
        Stdio::Null => {
            let null = open("/dev/null", OFlag::O_RDWR, Mode::empty())
                .map_err(|e| format!("open /dev/null: {e}"))?;
            dup_stdio(&null)?;
            setsid().map_err(|e| format!("setsid: {e}"))?;
            Ok(None)
        }
        Stdio::Pty(size) => {
            let size = *size;
            let pts = ptmx
                .parent()
                .map_or_else(|| PathBuf::from("/dev/pts"), |p| p.join("pts"));
            let (master, slave_path) = open_pty(ptmx, &pts, size)?;
            let slave = attach_terminal(&slave_path)?;
            Ok(Some((master, slave)))
        }
    }
}

fn dup_stdio(fd: &OwnedFd) -> ChildResult<()> {
    dup2_stdin(fd).map_err(|e| format!("dup2 stdin: {e}"))?;
    dup2_stdout(fd).map_err(|e| format!("dup2 stdout: {e}"))?;
    dup2_stderr(fd).map_err(|e| format!("dup2 stderr: {e}"))?;
    Ok(())
}

/// Opens a PTY master on `ptmx`, returns it with the slave's path (under
/// `pts_dir`), sized as asked.
fn open_pty(ptmx: &Path, pts_dir: &Path, size: Option<libc::winsize>) -> ChildResult<(OwnedFd, PathBuf)> {
    let master = open(
        ptmx,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open {}: {e}", ptmx.display()))?;
    let number = sys::pty_unlock_and_number(master.as_fd()).map_err(|e| format!("unlock the PTY: {e}"))?;
    if let Some(size) = size {
        sys::set_window_size(master.as_fd(), &size).map_err(|e| format!("size the PTY: {e}"))?;
    }
    Ok((master, pts_dir.join(number.to_string())))
}

/// Opens the PTY slave at `path` as stdio and controlling terminal of a new
/// session.
fn attach_terminal(path: &Path) -> ChildResult<OwnedFd> {
    setsid().map_err(|e| format!("setsid: {e}"))?;
    let slave =
        open(path, OFlag::O_RDWR, Mode::empty()).map_err(|e| format!("open {}: {e}", path.display()))?;
    sys::set_controlling_terminal(slave.as_fd()).map_err(|e| format!("set the controlling terminal: {e}"))?;
    dup_stdio(&slave)?;
    Ok(slave)
}

fn exec(
    program: &CString,
    argv: &[CString],
    envp: &[CString],
    cwd: &str,
    identity: Option<&Identity>,
) -> ChildResult<()> {
    // Everything that needs more than the image's set (mounts, pivot_root, setns, the console)
    // is done: from here on the process is the image's, bounded whatever the pod allows.
    privileges::bound_current_process(privileges::default_mask()).map_err(|e| e.to_string())?;
    if let Some(identity) = identity {
        let groups: Vec<nix::unistd::Gid> = identity
            .groups
            .iter()
            .map(|g| nix::unistd::Gid::from_raw(*g))
            .collect();
        nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups {:?}: {e}", identity.groups))?;
        nix::unistd::setgid(nix::unistd::Gid::from_raw(identity.gid))
            .map_err(|e| format!("setgid {}: {e}", identity.gid))?;
        nix::unistd::setuid(nix::unistd::Uid::from_raw(identity.uid))
            .map_err(|e| format!("setuid {}: {e}", identity.uid))?;
    }
    if chdir(cwd).is_err() {
        let _ = chdir("/");
    }
    close_inherited_descriptors()?;
    let error = execve(program, argv, envp).unwrap_err();
    Err(format!("cannot run {}: {error}", program.to_string_lossy()))
}

/// Makes sure the image's program gets standard streams only: every descriptor above 2 is closed
/// at `execve`, whoever opened it (the runtime's caller included: a descriptor of a host
/// directory would let the image `fchdir` out of its root).
fn close_inherited_descriptors() -> ChildResult<()> {
    match sys::cloexec_from(3) {
        Ok(()) => Ok(()),
        // Before Linux 5.11: one by one, from the container's /proc (the caller's process).
        Err(nix::errno::Errno::ENOSYS | nix::errno::Errno::EINVAL) => {
            let entries = fs::read_dir("/proc/self/fd").map_err(|e| format!("list /proc/self/fd: {e}"))?;
            let fds: Vec<RawFd> = entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect();
            for fd in fds {
                // The directory listed is closed by now: EBADF for its descriptor.
                match sys::set_cloexec(fd) {
                    Ok(()) | Err(nix::errno::Errno::EBADF) => {}
                    Err(error) => return Err(format!("mark descriptor {fd} close-on-exec: {error}")),
                }
            }
            Ok(())
        }
        Err(error) => Err(format!("mark the inherited descriptors close-on-exec: {error}")),
    }
}

/// Creates `root/relative` as a directory when missing, recording it.
fn ensure_dir(root: &Path, relative: &Path, created: &mut Vec<PathBuf>) -> ChildResult<()> {
    let path = root.join(relative);
    if fs::symlink_metadata(&path).is_err() {
        fs::create_dir_all(&path).map_err(|e| format!("create /{}: {e}", relative.display()))?;
        created.push(Path::new("/").join(relative));
    }
    Ok(())
}

/// Resolves `path` (absolute, inside the image) to a host path under `root`,
/// following symbolic links inside the root, and creates it (file or
/// directory) when missing so something can be mounted on it.
fn bind_target(
    root: &Path,
    path: &Path,
    directory: bool,
    created: &mut Vec<PathBuf>,
) -> ChildResult<PathBuf> {
    let resolved = resolve_in_root(&[root.to_path_buf()], path).unwrap_or_else(|| path.to_path_buf());
    let host = root.join(resolved.strip_prefix("/").unwrap_or(&resolved));
    if fs::symlink_metadata(&host).is_err() {
        let mut missing_parent = host.parent().map(Path::to_path_buf);
        let mut to_record = Vec::new();
        while let Some(parent) = missing_parent {
            if parent.exists() || parent == *root {
                break;
            }
            to_record.push(parent.clone());
            missing_parent = parent.parent().map(Path::to_path_buf);
        }
        if let Some(parent) = host.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        if directory {
            fs::create_dir(&host).map_err(|e| format!("create {}: {e}", host.display()))?;
        } else {
            fs::File::create(&host).map_err(|e| format!("create {}: {e}", host.display()))?;
        }
        for dir in to_record.iter().rev().chain(std::iter::once(&host)) {
            if let Ok(inside) = dir.strip_prefix(root) {
                created.push(Path::new("/").join(inside));
            }
        }
    }
    Ok(host)
}

/// Resolves `path` (absolute, inside an image made of `layers`, top first)
/// following symbolic links as the image would, without leaving the image.
/// Returns the final path inside the image, or `None` when it (or a link on
/// the way) is missing. Whiteouts are not interpreted.
pub fn resolve_in_root(layers: &[PathBuf], path: &Path) -> Option<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = path.components().rev().filter_map(component_name).collect();
    let mut current = PathBuf::from("/");
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            current.pop();
            continue;
        }
        let candidate = current.join(&name);
        let relative = candidate.strip_prefix("/").ok()?.to_path_buf();
        let meta = layers.iter().find_map(|layer| {
            fs::symlink_metadata(layer.join(&relative))
                .ok()
                .map(|m| (layer, m))
        });
        let (layer, meta) = meta?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(layer.join(&relative)).ok()?;
            if target.is_absolute() {
                current = PathBuf::from("/");
            }
            pending.extend(target.components().rev().filter_map(component_name));
        } else {
            current = candidate;
        }
    }
    Some(current)
}

fn component_name(component: Component<'_>) -> Option<std::ffi::OsString> {
    match component {
        Component::Normal(name) => Some(name.to_os_string()),
        Component::ParentDir => Some(OsStr::new("..").to_os_string()),
        _ => None,
    }
}

/// Moves the calling process into a fresh cgroup of the v1 `name=systemd`
/// hierarchy (mounted at `mount_dir`) and into a new cgroup namespace rooted
/// there, so systemd sees its own cgroup as the root.
fn enter_systemd_cgroup(mount_dir: &Path, name: &str) -> ChildResult<()> {
    mount(
        Some("cgroup"),
        mount_dir,
        Some("cgroup"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("none,name=systemd"),
    )
    .map_err(|e| format!("mount the cgroup v1 name=systemd hierarchy: {e}"))?;
    let group = mount_dir.join(name);
    fs::create_dir_all(&group).map_err(|e| format!("create cgroup {}: {e}", group.display()))?;
    fs::write(group.join("cgroup.procs"), "0")
        .map_err(|e| format!("enter cgroup {}: {e}", group.display()))?;
    unshare(CloneFlags::CLONE_NEWCGROUP).map_err(|e| format!("create a cgroup namespace: {e}"))?;
    Ok(())
}

/// Removes the container's cgroup (and the ones systemd made inside it), from
/// a short-lived child in a mount namespace of its own.
fn remove_cgroup(name: &str) {
    if sys::thread_count() != 1 {
        return;
    }
    let Ok(forked) = sys::fork() else { return };
    match forked {
        Forked::Parent(pid) => {
            let _ = waitpid(pid, None);
        }
        Forked::Child => {
            let dir = std::env::temp_dir().join(format!("walt-cgroup-{}", std::process::id()));
            let ok = unshare(CloneFlags::CLONE_NEWNS).is_ok()
                && mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
                .is_ok()
                && fs::create_dir_all(&dir).is_ok()
                && mount(
                    Some("cgroup"),
                    &dir,
                    Some("cgroup"),
                    MsFlags::empty(),
                    Some("none,name=systemd"),
                )
                .is_ok();
            if ok {
                remove_cgroup_tree(&dir.join(name));
                let _ = umount2(&dir, MntFlags::MNT_DETACH);
            }
            let _ = fs::remove_dir(&dir);
            sys::exit_child(0);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A random machine id (32 hex digits) for the container's lifetime.
fn machine_id() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut random) = fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = random.read_exact(&mut bytes);
    }
    hex::encode(bytes)
}

/// Brings `lo` up in a new network namespace.
fn bring_loopback_up() {
    sys::set_loopback_up();
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::statvfs::FsFlags;

    #[test]
    fn submounts_are_those_strictly_below_with_escapes_decoded() {
        let mountinfo = "22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                         30 22 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro\n\
                         31 30 0:27 / /sys/fs/cgroup/a\\040b rw - cgroup cgroup rw\n\
                         40 1 0:30 / /system rw - tmpfs tmpfs rw\n";
        assert_eq!(
            submounts(mountinfo, Path::new("/sys")),
            [
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/sys/fs/cgroup/a b")
            ]
        );
        assert_eq!(unescape_mount_path("x\\134y\\9"), "x\\y\\9");
    }

    #[test]
    fn mount_point_cleanup_never_follows_a_link_the_image_made() {
        let upper = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        // The runtime created /etc/resolv.conf and /persist; the image then replaced /etc by a link
        // to a host directory holding an empty resolv.conf.
        fs::write(host.path().join("resolv.conf"), "").unwrap();
        symlink(host.path(), upper.path().join("etc")).unwrap();
        fs::create_dir(upper.path().join("persist")).unwrap();
        fs::create_dir_all(upper.path().join("var/lib")).unwrap();
        fs::write(upper.path().join("var/lib/empty"), "").unwrap();
        remove_mount_points(
            upper.path(),
            ["/etc/resolv.conf", "/persist", "/var/lib/empty"]
                .into_iter()
                .map(PathBuf::from),
        );
        assert!(
            host.path().join("resolv.conf").exists(),
            "the host's file was removed"
        );
        assert!(!upper.path().join("persist").exists());
        assert!(!upper.path().join("var/lib/empty").exists());
    }

    #[test]
    fn a_bind_remount_adds_nodev_nosuid_and_keeps_the_locked_flags() {
        let flags = bind_remount_flags(FsFlags::ST_NOEXEC | ST_RELATIME, false);
        assert!(
            flags.contains(MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_BIND | MsFlags::MS_REMOUNT)
        );
        assert!(
            flags.contains(MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME),
            "{flags:?}"
        );
        assert!(!flags.contains(MsFlags::MS_RDONLY));
        assert!(bind_remount_flags(FsFlags::empty(), true).contains(MsFlags::MS_RDONLY));
        assert!(
            bind_remount_flags(FsFlags::ST_RDONLY, false).contains(MsFlags::MS_RDONLY),
            "never made writable"
        );
    }
}
