//! An image shell session: checks, mode choice (WalT's init/basic contract),
//! the shell on a PTY, the shutdown, and the change summary.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::changes::{self, ChangeSummary};
use super::emulation::{self, EmulationError};
use super::privileges;
use super::root::{self, Command, Container, Network, RootError, RootSpec, Stdio};
use super::terminal;

/// WalT's start script: runs as PID 1 and execs the OS init.
pub const START_SCRIPT: &str = "/bin/walt-image-shell-start";
/// WalT's shutdown script: undoes the start script's tuning and halts init.
pub const SHUTDOWN_SCRIPT: &str = "/bin/walt-image-shell-shutdown";
/// The most layers an image may have to be opened (overlay's practical limit; the API's
/// [`walt_crds::image::MAX_SHELL_LAYERS`] is the first count refused).
pub const MAX_LAYERS: usize = walt_crds::image::MAX_SHELL_LAYERS as usize - 1;
/// What `container=` says to systemd and friends inside the shell.
pub const CONTAINER_NAME: &str = "walt";

/// The note printed when the OS init runs (WalT's wording).
pub const INIT_NOTE: &str =
    "Note: the OS was started in a virtual environment.\nRun 'walt help show shells' for more info.\n";
/// The note printed for a shell alone (WalT's wording).
pub const BASIC_NOTE: &str = "Note: this is a limited virtual environment (with just the shell process).\nRun 'walt help show shells' for more info.\n";

/// Errors of a shell session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Too many layers for overlay.
    #[error(
        "the image has {0} layers; an image shell needs fewer than 128. Squash the image first (walt image squash, or rebuild it with fewer layers)"
    )]
    TooManyLayers(usize),
    /// The image is not a Linux image.
    #[error("the image is for the {0} operating system; an image shell runs Linux images only")]
    NotLinux(String),
    /// A capability is missing.
    #[error(
        "missing capability {0}: the shell runtime needs CAP_SYS_ADMIN (mounts, namespaces) and CAP_SYS_CHROOT (entering the root). Run it as root, or in a pod with these capabilities (a hostUsers: false pod gives them inside its user namespace)"
    )]
    MissingCapability(&'static str),
    /// No shell in the image.
    #[error("the image has no shell: neither /bin/bash nor /bin/sh is an executable file in it")]
    NoShell,
    /// Init mode asked but the scripts are missing.
    #[error(
        "init mode needs executable {START_SCRIPT} and {SHUTDOWN_SCRIPT} in the image; this image lacks {0}. Use --mode basic (or auto)"
    )]
    NoInitScripts(&'static str),
    /// The architecture could not be told.
    #[error("cannot tell the image's CPU architecture (no ELF /bin/sh); pass it with --arch")]
    UnknownArchitecture,
    /// The session directory is on an overlay.
    #[error(
        "{0} is on an overlay filesystem; overlay cannot stack on overlay: put the cache and session directories on a real filesystem (a volume: emptyDir or hostPath)"
    )]
    UpperOnOverlay(PathBuf),
    /// Emulation is not possible.
    #[error(transparent)]
    Emulation(#[from] EmulationError),
    /// Preparing or running the container failed.
    #[error(transparent)]
    Root(#[from] RootError),
    /// A system call failed.
    #[error("{0}: {1}")]
    Sys(&'static str, nix::Error),
    /// Reading the upper dir failed.
    #[error("summarizing the changes in {0}: {1}")]
    Summary(PathBuf, std::io::Error),
}

/// Which kind of shell the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeChoice {
    /// Init when the image has WalT's two scripts, else basic.
    #[default]
    Auto,
    /// The OS init as PID 1, the shell inside it.
    Init,
    /// The shell alone.
    Basic,
}

/// The kind of shell the user got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The OS init ran as PID 1 (WalT's "advanced" shell).
    Init,
    /// Just the shell process.
    Basic,
}

/// What to open.
#[derive(Debug, Clone)]
pub struct ShellRequest {
    /// Layer directories, top first.
    pub lower_dirs: Vec<PathBuf>,
    /// A fresh directory on a real filesystem for upper, work and state.
    pub session_dir: PathBuf,
    /// Mode asked.
    pub mode: ModeChoice,
    /// The image's architecture (OCI name), when known from its config.
    pub architecture: Option<String>,
    /// The image's OS (from its config), when known.
    pub os: Option<String>,
    /// Network of the shell.
    pub network: Network,
    /// Where to write PID 1's console output in init mode (else discarded).
    pub console_log: Option<PathBuf>,
    /// How long the shutdown script and then init may take before being killed.
    pub shutdown_timeout: Duration,
}

/// What a session gave.
#[derive(Debug, Clone)]
pub struct ShellOutcome {
    /// The shell's exit code.
    pub exit_code: i32,
    /// The mode used.
    pub mode: Mode,
    /// Whether the image ran through qemu-user.
    pub emulated: bool,
    /// The image's architecture.
    pub architecture: String,
    /// The changes left in the upper dir.
    pub summary: ChangeSummary,
    /// The upper dir (the changes), for committing.
    pub upper_dir: PathBuf,
    /// Whether the overlay used `userxattr` (tells which opaque attribute
    /// the upper dir carries).
    pub user_xattr: bool,
    /// The privileges the shell ran with (read from its `/proc/PID/status` once started).
    pub bounds: Option<privileges::Bounds>,
    /// The shell was hung up because the runtime was told to stop (see [`terminal::RelayEnd::hung_up`]).
    pub hung_up: bool,
}

/// What the checks found out about an image before it is opened.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Mode to use.
    pub mode: Mode,
    /// The user's shell inside the image.
    pub shell: String,
    /// Image architecture.
    pub architecture: String,
    /// Through qemu-user?
    pub emulated: bool,
}

/// Runs every refusal check, chooses the mode and the shell.
pub fn inspect(request: &ShellRequest) -> Result<Inspection, SessionError> {
    if request.lower_dirs.len() > MAX_LAYERS {
        return Err(SessionError::TooManyLayers(request.lower_dirs.len()));
    }
    if let Some(os) = request
        .os
        .as_deref()
        .filter(|os| !os.is_empty() && *os != "linux")
    {
        return Err(SessionError::NotLinux(os.to_string()));
    }
    check_capabilities()?;
    let layers = &request.lower_dirs;
    let executable = |path: &str| is_executable(layers, path);
    let shell = if executable("/bin/bash") {
        "/bin/bash"
    } else if executable("/bin/sh") {
        "/bin/sh"
    } else {
        return Err(SessionError::NoShell);
    };
    let has_start = executable(START_SCRIPT);
    let has_shutdown = executable(SHUTDOWN_SCRIPT);
    let mode = match request.mode {
        ModeChoice::Auto if has_start && has_shutdown => Mode::Init,
        ModeChoice::Basic | ModeChoice::Auto => Mode::Basic,
        ModeChoice::Init if !has_start => return Err(SessionError::NoInitScripts(START_SCRIPT)),
        ModeChoice::Init if !has_shutdown => return Err(SessionError::NoInitScripts(SHUTDOWN_SCRIPT)),
        ModeChoice::Init => Mode::Init,
    };
    let architecture = match &request.architecture {
        Some(arch) => arch.clone(),
        None => emulation::root_architecture(layers).ok_or(SessionError::UnknownArchitecture)?,
    };
    let emulated = emulation::check(&architecture)?;
    Ok(Inspection {
        mode,
        shell: shell.into(),
        architecture,
        emulated,
    })
}

/// Whether `path` is an executable file in the image made of `layers`.
pub fn is_executable(layers: &[PathBuf], path: &str) -> bool {
    let Some(resolved) = root::resolve_in_root(layers, Path::new(path)) else {
        return false;
    };
    let Ok(relative) = resolved.strip_prefix("/") else {
        return false;
    };
    layers
        .iter()
        .find_map(|layer| fs::metadata(layer.join(relative)).ok())
        .is_some_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

fn check_capabilities() -> Result<(), SessionError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    for (bit, name) in [(21, "CAP_SYS_ADMIN"), (18, "CAP_SYS_CHROOT")] {
        if effective & (1 << bit) == 0 {
            return Err(SessionError::MissingCapability(name));
        }
    }
    Ok(())
}

fn check_real_filesystem(dir: &Path) -> Result<(), SessionError> {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    if let Ok(stat) = nix::sys::statfs::statfs(dir)
        && i128::from(stat.filesystem_type().0) == i128::from(OVERLAYFS_SUPER_MAGIC)
    {
        return Err(SessionError::UpperOnOverlay(dir.to_path_buf()));
    }
    Ok(())
}

/// Opens the shell: prints the mode note, runs the shell (inside init in init
/// mode) on a PTY sized like the caller's terminal, relays until it exits,
/// shuts down, and summarizes the changes. Must be called from a
/// single-threaded process.
pub fn run(request: &ShellRequest, inspection: &Inspection) -> Result<ShellOutcome, SessionError> {
    fs::create_dir_all(&request.session_dir)
        .map_err(|e| SessionError::Summary(request.session_dir.clone(), e))?;
    check_real_filesystem(&request.session_dir)?;
    let mut spec = RootSpec::new(request.lower_dirs.clone(), &request.session_dir);
    spec.network = request.network;
    spec.init_conventions = inspection.mode == Mode::Init;
    let signals = terminal::signal_fd().map_err(|e| SessionError::Sys("block signals", e))?;
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| SessionError::Sys("become a child subreaper", e))?;
    let size = terminal::caller_window_size();
    let mut stdout = std::io::stdout();
    let mut console_sink: Box<dyn Write> = match &request.console_log {
        Some(path) => Box::new(fs::File::create(path).map_err(|e| SessionError::Summary(path.clone(), e))?),
        None => Box::new(std::io::sink()),
    };
    let mut shell_command = Command::new(&inspection.shell, Stdio::Pty(size));
    let bounds;
    let (mut container, shell, end) = match inspection.mode {
        Mode::Basic => {
            let container = Container::start(&spec, &shell_command)?;
            bounds = privileges::observe(container.init.pid);
            let _ = stdout.write_all(BASIC_NOTE.as_bytes());
            let _ = stdout.write_all(b"\n");
            let _ = stdout.flush();
            let pid = container.init.pid;
            let raw = terminal::RawMode::enable();
            let master = container
                .init
                .pty
                .as_ref()
                .ok_or_else(|| RootError::Setup("the shell's PTY was not received".into()))?;
            let end = terminal::relay(master, pid, pid, None, &mut console_sink, &signals);
            drop(raw);
            (container, pid, end)
        }
        Mode::Init => {
            let mut init = Command::new(START_SCRIPT, Stdio::Pty(size));
            init.env.push(format!("container={CONTAINER_NAME}"));
            init.cwd = "/".into();
            let mut container = Container::start(&spec, &init)?;
            shell_command.env.push(format!("container={CONTAINER_NAME}"));
            let shell = container.exec(&shell_command)?;
            bounds = privileges::observe(shell.pid);
            let _ = stdout.write_all(INIT_NOTE.as_bytes());
            let _ = stdout.write_all(b"\n");
            let _ = stdout.flush();
            let raw = terminal::RawMode::enable();
            let master = shell
                .pty
                .as_ref()
                .ok_or_else(|| RootError::Setup("the shell's PTY was not received".into()))?;
            let end = terminal::relay(
                master,
                shell.pid,
                container.init.pid,
                container.init.pty.as_ref(),
                &mut console_sink,
                &signals,
            );
            drop(raw);
            if let Some(status) = end.init_status {
                container.set_init_status(status);
            }
            (container, shell.pid, end)
        }
    };
    let _ = shell;
    if inspection.mode == Mode::Init {
        shut_down(&mut container, request.shutdown_timeout, &mut console_sink);
    }
    container.finish();
    let summary = changes::summarize(&spec.upper_dir, &spec.lower_dirs, spec.user_xattr)
        .map_err(|e| SessionError::Summary(spec.upper_dir.clone(), e))?;
    Ok(ShellOutcome {
        exit_code: end.shell_code,
        mode: inspection.mode,
        emulated: inspection.emulated,
        architecture: inspection.architecture.clone(),
        summary,
        upper_dir: spec.upper_dir.clone(),
        user_xattr: spec.user_xattr,
        bounds,
        hung_up: end.hung_up,
    })
}

/// Runs the shutdown script, then waits for init, killing what overstays.
fn shut_down(container: &mut Container, timeout: Duration, console_sink: &mut dyn Write) {
    let console = container.init.pty.take();
    let mut pump = || {
        if let Some(console) = &console {
            drain(console, console_sink);
        }
    };
    let mut command = Command::new(SHUTDOWN_SCRIPT, Stdio::Null);
    command.env.push(format!("container={CONTAINER_NAME}"));
    command.cwd = "/".into();
    if let Ok(process) = container.exec(&command)
        && root::wait_timeout(process.pid, timeout, &mut pump).is_none()
    {
        let _ = nix::sys::signal::kill(process.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(process.pid, None);
    }
    container.wait_init(timeout, pump);
}

fn drain(console: &std::os::fd::OwnedFd, sink: &mut dyn Write) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut buffer = [0u8; 16384];
    loop {
        let mut fds = [PollFd::new(console.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            return;
        }
        match nix::unistd::read(console, &mut buffer) {
            Ok(n) if n > 0 => {
                let _ = sink.write_all(&buffer[..n]);
            }
            _ => return,
        }
    }
}
