//! `walt-operator run` as a test process (outside the cluster, or inside the cluster tier's node
//! network namespace so that it reaches what pods reach), and the product binaries tests drive.
//!
//! `walt-tests` never depends on `walt-operator`: the binary is `$WALT_OPERATOR_BIN` when set (a
//! private copy, for developers sharing one machine), else built with `cargo build`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Daemon, Lifetime};
use crate::{FixtureError, deploy};

/// A binary of this workspace: `$ENV` when set, else `cargo build -p PACKAGE` and the built file.
///
/// # Panics
/// When cargo fails (test helper).
pub fn workspace_binary(env: &str, package: &str, binary: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| deploy::repo_root().join("target"), PathBuf::from);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", package, "--bin", binary])
        .current_dir(deploy::repo_root())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    target.join("debug").join(binary)
}

/// The operator binary (`$WALT_OPERATOR_BIN`, else built).
pub fn operator_binary() -> PathBuf {
    workspace_binary("WALT_OPERATOR_BIN", "walt-operator", "walt-operator")
}

/// The plugin binary (`$KUBECTL_WALT_BIN`, else built).
pub fn plugin_binary() -> PathBuf {
    workspace_binary("KUBECTL_WALT_BIN", "kubectl-walt", "kubectl-walt")
}

/// A running `walt-operator run`, stopped when dropped.
#[derive(Debug)]
pub struct OperatorProcess {
    _daemon: Daemon,
    log: PathBuf,
    /// Its SSH gateway (loopback, or the node namespace's loopback).
    pub gateway: SocketAddr,
    /// Its `/metrics` `/healthz` `/readyz` port.
    pub http: u16,
}

impl OperatorProcess {
    /// Starts `walt-operator run ARGS` with `kubeconfig`, on free loopback ports for the gateway
    /// and HTTP (added to `args`), inside network namespace `netns` when given (`nsenter`), logging
    /// to `log`.
    ///
    /// # Errors
    /// When no free port is found or the process cannot start.
    pub fn start(
        kubeconfig: &Path,
        netns: Option<&str>,
        args: &[String],
        log: &Path,
    ) -> Result<Self, FixtureError> {
        let port = || crate::k8s::free_port().map_err(|e| FixtureError::Failed(format!("no free port: {e}")));
        let (http, gateway) = (port()?, port()?);
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg("--")
                    .arg(operator_binary());
                command
            }
            None => Command::new(operator_binary()),
        };
        command
            .arg("run")
            .args(args)
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--gateway-addr", &format!("127.0.0.1:{gateway}")])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,walt_operator=debug");
        let daemon = Daemon::spawn("walt-operator", command, log, Lifetime::Test)
            .map_err(|e| FixtureError::Failed(format!("cannot start walt-operator: {e}")))?;
        Ok(Self {
            _daemon: daemon,
            log: log.to_owned(),
            gateway: SocketAddr::from(([127, 0, 0, 1], gateway)),
            http,
        })
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its gateway listens (its configuration was accepted; with
    /// `--leader-election false` its controllers run from then on), at most `within`.
    ///
    /// # Panics
    /// When it does not, with its log.
    pub fn wait_started(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().contains("SSH gateway ready") {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "walt-operator did not start within {within:?}; log:
{}",
            self.log()
        );
    }
}
