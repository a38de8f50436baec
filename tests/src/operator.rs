//! `walt-operator run` as a test process (outside the cluster, or inside the cluster tier's node
//! network namespace so that it reaches what pods reach), and the product binaries tests drive.
//!
//! `walt-tests` never depends on `walt-operator`: the binary is `$WALT_OPERATOR_BIN` when set (a
//! private copy, for developers sharing one machine), else built with `cargo build`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{Daemon, Lifetime};
use crate::wait::{Poll, wait_for};
use crate::{FixtureError, deploy};

/// A binary of this workspace: `$ENV` when set, else `cargo build -p PACKAGE` and the built file.
///
/// # Panics
/// When cargo fails (test helper).
pub fn workspace_binary(env: &str, package: &str, binary: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", package, "--bin", binary])
        .current_dir(deploy::repo_root())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    deploy::target_dir().join("debug").join(binary)
}

/// The operator binary (`$WALT_OPERATOR_BIN`, else built, once per test process).
pub fn operator_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| workspace_binary("WALT_OPERATOR_BIN", "walt-operator", "walt-operator"))
        .clone()
}

/// The plugin binary (`$KUBECTL_WALT_BIN`, else built, once per test process): each `kubectl walt`
/// command of a test is a [`crate::lab::Kube::walt`], and a `cargo build` per command (0.3–0.9 s even
/// with nothing to build, on the 2-core development VM) was timed as the plugin's by `cargo xtask bench`.
pub fn plugin_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| workspace_binary("KUBECTL_WALT_BIN", "kubectl-walt", "kubectl-walt"))
        .clone()
}

/// A running `walt-operator run`, stopped when dropped.
#[derive(Debug)]
pub struct OperatorProcess {
    daemon: Option<Daemon>,
    /// How it was started, to start it again ([`Self::restart`]).
    binary: PathBuf,
    netns: Option<String>,
    args: Vec<String>,
    kubeconfig: PathBuf,
    log: PathBuf,
    /// Its SSH gateway (loopback, or the node namespace's loopback).
    pub gateway: SocketAddr,
    /// Its `/metrics` `/healthz` `/readyz` port.
    pub http: u16,
}

impl OperatorProcess {
    /// Starts `walt-operator run ARGS` ([`operator_binary`]) with `kubeconfig`, on free loopback
    /// ports for the gateway and HTTP (added to `args`), inside network namespace `netns` when given
    /// (`nsenter`), logging to `log`.
    ///
    /// # Errors
    /// When no free port is found or the process cannot start.
    pub fn start(
        kubeconfig: &Path,
        netns: Option<&str>,
        args: &[String],
        log: &Path,
    ) -> Result<Self, FixtureError> {
        Self::start_binary(&operator_binary(), kubeconfig, netns, args, log)
    }

    /// [`Self::start`] with a given `walt-operator` binary (the operator's own tests pass cargo's).
    ///
    /// # Errors
    /// When no free port is found or the process cannot start.
    pub fn start_binary(
        binary: &Path,
        kubeconfig: &Path,
        netns: Option<&str>,
        args: &[String],
        log: &Path,
    ) -> Result<Self, FixtureError> {
        let port = || crate::k8s::free_port().map_err(|e| FixtureError::Failed(format!("no free port: {e}")));
        let (http, gateway) = (port()?, port()?);
        let mut args = args.to_vec();
        args.extend([
            "--http-addr".to_owned(),
            format!("127.0.0.1:{http}"),
            "--gateway-addr".to_owned(),
            format!("127.0.0.1:{gateway}"),
        ]);
        let mut process = Self {
            daemon: None,
            binary: binary.to_owned(),
            netns: netns.map(str::to_owned),
            args,
            kubeconfig: kubeconfig.to_owned(),
            log: log.to_owned(),
            gateway: SocketAddr::from(([127, 0, 0, 1], gateway)),
            http,
        };
        process.spawn()?;
        Ok(process)
    }

    /// `walt-operator run ARGS` as started (for a run to be checked by its exit: see
    /// [`Self::start`] for one that keeps running).
    pub fn command(binary: &Path, kubeconfig: &Path, netns: Option<&str>, args: &[String]) -> Command {
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg("--")
                    .arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .arg("run")
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,walt_operator=debug");
        command
    }

    fn spawn(&mut self) -> Result<(), FixtureError> {
        let command = Self::command(&self.binary, &self.kubeconfig, self.netns.as_deref(), &self.args);
        let daemon = Daemon::spawn("walt-operator", command, &self.log, Lifetime::Test)
            .map_err(|e| FixtureError::Failed(format!("cannot start walt-operator: {e}")))?;
        self.daemon = Some(daemon);
        Ok(())
    }

    /// What it logged so far (every run of it, restarts included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A GET on its HTTP port: (status code, body), or `None` when it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.http)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let code = answer.split_whitespace().nth(1)?.parse().ok()?;
        let body = answer.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())?;
        Some((code, body))
    }

    /// Waits until `/readyz` answers 200 (it leads and its controllers run), at most `within`.
    ///
    /// # Panics
    /// When it does not, with its log.
    pub fn wait_ready(&self, within: Duration) {
        wait_for("walt-operator's /readyz to answer 200", within, || {
            match self.get("/readyz") {
                Some((200, _)) => Poll::Ready(()),
                Some((code, body)) => Poll::Pending(format!("{code} {}", body.trim())),
                None => Poll::Pending("no answer".to_owned()),
            }
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()));
    }

    /// Waits until its gateway listens (its configuration was accepted; with
    /// `--leader-election false` its controllers run from then on), at most `within`.
    ///
    /// # Panics
    /// When it does not, with its log.
    pub fn wait_started(&self, within: Duration) {
        wait_for("walt-operator's SSH gateway to be ready", within, || {
            self.log().contains("SSH gateway ready")
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()));
    }

    /// Stops it gracefully (SIGTERM, then SIGKILL after `grace`): it releases its Lease.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop(grace);
        }
    }

    /// Kills it at once (SIGKILL: no cleanup, no Lease release).
    pub fn kill(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.kill();
        }
    }

    /// Kills it, then starts it again with the same arguments, ports and log.
    ///
    /// # Panics
    /// When it cannot start again.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn().expect("restart walt-operator");
    }
}
