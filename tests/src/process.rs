//! Long-running helper processes (etcd, kube-apiserver, containerd, registries…) owned by a test.
//!
//! A [`Daemon`] is stopped when it is dropped: `SIGTERM` to its PID, then `SIGKILL` after a grace
//! period. Processes started with [`Lifetime::Test`] also die with the test process (Linux
//! `PR_SET_PDEATHSIG`), even when the test binary is killed: they are spawned from one dedicated
//! thread that lives as long as the process, because the kernel delivers that signal when the
//! *thread* that forked them exits. Processes started with [`Lifetime::Detached`] (for
//! `cargo xtask cluster up`) get their own session and outlive the caller; they are stopped later
//! by PID with [`stop_pid`].
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::wait::Wait;

/// How long a started process may outlive the code that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Stopped on drop, and killed by the kernel if the test process dies.
    Test,
    /// Its own session, survives the caller (stopped later by PID).
    Detached,
}

/// Errors starting or stopping a helper process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started at all.
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        /// Short name of the daemon.
        name: String,
        /// Program path.
        program: String,
        /// Underlying error.
        source: io::Error,
    },
    /// The log file could not be created.
    #[error("cannot create log file {path}: {source}")]
    Log {
        /// The log file path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
}

/// A started helper process, stopped (by PID) when dropped.
pub struct Daemon {
    name: String,
    pid: u32,
    child: Option<Child>,
    log: PathBuf,
    stop_on_drop: bool,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// The process-lifetime thread that forks every [`Lifetime::Test`] process (see module docs).
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("walt-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // The channel lives in a static and is never closed: park so that the children
                // keep a living parent thread until the process exits.
                loop {
                    thread::park();
                }
            })
            .expect("cannot start the walt-spawner thread");
        Mutex::new(tx)
    })
}

impl Daemon {
    /// Starts `command` (stdout and stderr appended to `log`) under the given lifetime.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log: &Path,
        lifetime: Lifetime,
    ) -> Result<Daemon, ProcessError> {
        let program = command.get_program().to_string_lossy().into_owned();
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcessError::Log {
                path: log.to_path_buf(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| ProcessError::Log {
            path: log.to_path_buf(),
            source,
        })?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let spawn_error = |source| ProcessError::Spawn {
            name: name.to_string(),
            program: program.clone(),
            source,
        };
        let child = match lifetime {
            Lifetime::Detached => {
                command.process_group(0);
                command.spawn().map_err(spawn_error)?
            }
            Lifetime::Test => {
                // SAFETY: the closure runs between fork and exec; it only calls prctl(2), which is
                // async-signal-safe, and touches no memory shared with other threads.
                unsafe {
                    command.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let (tx, rx) = mpsc::channel();
                spawner()
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send((command, tx))
                    .map_err(|_| spawn_error(io::Error::other("spawner thread is gone")))?;
                rx.recv()
                    .map_err(|_| spawn_error(io::Error::other("spawner thread is gone")))?
                    .map_err(spawn_error)?
            }
        };
        Ok(Daemon {
            name: name.to_string(),
            pid: child.id(),
            child: Some(child),
            log: log.to_path_buf(),
            stop_on_drop: true,
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The short name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file (stdout and stderr).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// `Some(status text)` if the process has already exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(format!("cannot wait: {e}")),
            Some(Ok(None)) => None,
            None => (!pid_alive(self.pid)).then(|| "exited".to_string()),
        }
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Leaves the process running when this handle is dropped (used by `cargo xtask cluster up`).
    pub fn keep_running(mut self) -> u32 {
        self.stop_on_drop = false;
        self.pid
    }

    /// Kills the process at once (`SIGKILL`: it cleans up nothing) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process now: `SIGTERM`, then `SIGKILL` after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            let exited = Wait::new(&format!("{} to exit after SIGTERM", self.name), grace)
                .every(Duration::from_millis(20))
                .until(|| !matches!(child.try_wait(), Ok(None)));
            if exited.is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.stop_on_drop {
            self.stop(Duration::from_secs(10));
        }
    }
}

/// Whether a process with this PID exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Stops a process that is not our child (started detached earlier): `SIGTERM`, waits up to
/// `grace` for it to disappear, then `SIGKILL`.
pub fn stop_pid(pid: u32, grace: Duration) {
    if !pid_alive(pid) {
        return;
    }
    let target = Pid::from_raw(pid as i32);
    let _ = kill(target, Signal::SIGTERM);
    let gone = |signal: &str, within: Duration| {
        Wait::new(&format!("process {pid} to exit after {signal}"), within)
            .every(Duration::from_millis(20))
            .until(|| !pid_alive(pid))
    };
    if gone("SIGTERM", grace).is_err() {
        let _ = kill(target, Signal::SIGKILL);
        let _ = gone("SIGKILL", Duration::from_secs(5));
    }
}

type ExitHook = Box<dyn Fn() + Send>;

fn exit_hooks() -> &'static Mutex<Vec<ExitHook>> {
    static HOOKS: OnceLock<Mutex<Vec<ExitHook>>> = OnceLock::new();
    HOOKS.get_or_init(|| Mutex::new(Vec::new()))
}

extern "C" fn run_exit_hooks() {
    let hooks = std::mem::take(
        &mut *exit_hooks()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for hook in hooks.into_iter().rev() {
        hook();
    }
}

/// Runs `hook` when the process exits normally (the test harness returns from `main` after the
/// last test, even when some panicked). Used to stop process-wide fixtures that live in statics,
/// which Rust never drops.
pub fn at_exit(hook: impl Fn() + Send + 'static) {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        // SAFETY: atexit(3) only stores the function pointer; `run_exit_hooks` is a plain
        // `extern "C"` function that does not unwind (hooks only stop processes and remove
        // files, and a poisoned lock is recovered).
        unsafe {
            libc::atexit(run_exit_hooks);
        }
    });
    exit_hooks()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Box::new(hook));
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Gives the process `command` starts SIGINT's default action, as a foreground program on a
/// terminal has: a test may itself run with SIGINT ignored (a background job of a script, as a CI
/// runner may start it), and an ignored signal survives `exec`, so a test of Ctrl-C would
/// otherwise prove nothing.
pub fn default_sigint_in_child(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls signal(2), which is
    // async-signal-safe, and touches no memory shared with other threads.
    unsafe {
        command.pre_exec(|| {
            if libc::signal(libc::SIGINT, libc::SIG_DFL) == libc::SIG_ERR {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `command` to its end like [`Command::output`], but kills it after `limit`: a program that
/// should exit (a startup error, a `--help`) and instead keeps running fails the test with what it
/// printed, instead of hanging the test run.
///
/// # Errors
/// It could not be started, or it was still running at `limit` (the message holds its output).
pub fn output_within(command: &mut Command, limit: Duration) -> Result<std::process::Output, String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let pid = child.id();
    let (done, finished) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if finished.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
            stop_pid(pid, Duration::from_secs(2));
            true
        } else {
            false
        }
    });
    let output = child.wait_with_output();
    let _ = done.send(());
    let killed = watchdog.join().unwrap_or(false);
    let output = output.map_err(|e| format!("waiting for {program}: {e}"))?;
    if killed {
        return Err(format!(
            "{program} was still running after {} s and was stopped; it printed:\n{}{}",
            limit.as_secs(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output)
}
