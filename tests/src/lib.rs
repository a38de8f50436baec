//! Test support for walt: the real-Kubernetes harness (`cargo xtask cluster …`),
//! real registries and real SSH nodes, shared by the end-to-end tests.
//!
//! - [`k8s`]: a real control plane (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler) or a single-node cluster (plus containerd, runc, CNI, kubelet in a network
//!   namespace), started by a test and stopped when it ends. Read its module docs first.
//! - [`process`]: helper processes stopped by PID on drop, even when a test panics.
//! - [`wait`]: the one polling loop ([`wait::wait_for`], [`wait::wait_for_async`]): every wait
//!   for a condition, with a timeout that says what it waited for and what it saw last.
//! - [`sshnode`]: real OpenSSH `sshd` nodes in network namespaces, with a WalT overlay root.
//! - [`operator`]: `walt-operator run` as a test process (also inside the cluster tier's node
//!   namespace), and the product binaries; [`pty`]: driving interactive programs through a PTY.
//!
//! Fixtures for OCI work (all real parts, no code from `walt-operator`):
//! - [`registry::Registry`]: a real `docker-registry` on 127.0.0.1 (optionally with basic auth), stopped on drop.
//! - [`images`]: busybox root filesystems (amd64, arm64) from Debian's `busybox-static`, images built with
//!   `umoci` and pushed with `skopeo` ([`images::OciLayout`]), WalT init scripts, labels, multi-arch indexes,
//!   hand-made (even malicious) layers, and the independent checkers [`images::skopeo_umoci_unpack`],
//!   [`images::skopeo_inspect_raw`], [`images::skopeo_inspect_config`].
//! - [`tree`]: snapshot a directory tree (content, modes, owners, xattrs, hard links, devices) and compare two.
//! - [`registry_auth`]: how skopeo authenticates to a registry from this machine, including a bearer token
//!   fetched here from a token realm that only cluster DNS names (the lab's embedded registry).

pub mod images;
pub mod k8s;
pub mod process;

pub mod bench;
pub mod bounds;
pub mod build_bench;
pub mod deploy;
pub mod dist;
pub mod fuzz;
pub mod image_build;
pub mod lab;
pub mod machine;
pub mod monitoring;
pub mod netboot;
pub mod nfs_client;
pub mod operator;
pub mod operator_lab;
pub mod pty;
pub mod registry;
pub mod registry_auth;
pub mod ship;
pub mod sshnode;
pub mod tmpfs;
pub mod tree;
pub mod wait;

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::Duration;

/// What went wrong in a fixture: always says what was being done, and what to install when a tool is missing.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A tool the fixture needs is not installed.
    #[error(
        "`{tool}` is not installed: run `apt-get install -y --no-install-recommends {package}` (see .ci/install-deps)"
    )]
    MissingTool {
        /// The command that was looked for.
        tool: String,
        /// The Debian package that provides it.
        package: String,
    },
    /// An I/O error while doing `what`.
    #[error("{what}: {source}")]
    Io {
        /// What the fixture was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (and stdout).
        stderr: String,
    },
    /// Anything else, with its explanation.
    #[error("{0}")]
    Failed(String),
}

impl FixtureError {
    pub(crate) fn io(what: &str, source: std::io::Error) -> Self {
        FixtureError::Io {
            what: what.to_owned(),
            source,
        }
    }
}

/// Fails with [`FixtureError::MissingTool`] unless `tool` is on `PATH`.
pub fn require_tool(tool: &str, package: &str) -> Result<(), FixtureError> {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    if found {
        Ok(())
    } else {
        Err(FixtureError::MissingTool {
            tool: tool.to_owned(),
            package: package.to_owned(),
        })
    }
}

/// Runs a command to completion; fails with its stderr if it does not exit 0.
pub fn run(command: &mut Command) -> Result<Output, FixtureError> {
    let line = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| FixtureError::io(&format!("running {line}"), e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(FixtureError::Command {
            command: line,
            status: output.status.to_string(),
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            ),
        })
    }
}

/// Runs a command and returns its stdout as a string (trailing newline removed).
pub fn run_stdout(command: &mut Command) -> Result<String, FixtureError> {
    let output = run(command)?;
    Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_owned())
}

/// Stops a child process by PID: SIGTERM, up to 5 s, then SIGKILL; always reaps it.
pub fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    let exited = wait::Wait::new("the child to exit after SIGTERM", Duration::from_secs(5))
        .every(Duration::from_millis(20))
        .until(|| matches!(child.try_wait(), Ok(Some(_))));
    if exited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Fails unless the tests run as root (needed for owners, devices, xattrs in `trusted.*`, `umoci unpack`).
pub fn require_root() -> Result<(), FixtureError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(FixtureError::Failed(
            "these tests need root (device nodes, owners, trusted.* xattrs): run them as root".to_owned(),
        ))
    }
}

/// Copies a tree with `cp -a` (keeps owners, modes, xattrs, hard links, devices).
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), FixtureError> {
    std::fs::create_dir_all(to).map_err(|e| FixtureError::io(&format!("creating {}", to.display()), e))?;
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to))?;
    Ok(())
}
