//! A real Kubernetes on this machine, for tests and for `cargo xtask cluster …`.
//!
//! Two tiers ([`Tier`]):
//! - **control plane**: etcd, kube-apiserver, kube-controller-manager and kube-scheduler on
//!   127.0.0.1 (free ports), a CA and certificates generated here (rcgen), RBAC (and Node)
//!   authorization, an admin kubeconfig and client-certificate kubeconfigs for ordinary users.
//!   Ready in seconds once the binaries are built.
//! - **cluster**: the same, plus one node (two with [`ClusterOptions::with_second_node`], see
//!   [`SecondNode`]): containerd + runc, the CNI bridge, host-local and
//!   loopback plugins and a kubelet, all inside a network namespace created here (pod and node
//!   addresses exist only there), a registry for the node's images inside that namespace, the
//!   pause image built locally, and the standard services of any cluster: kube-proxy (ClusterIPs
//!   route) and CoreDNS (Service names resolve in pods), see [`services`]. The API server and the registry are reachable from the host
//!   on 127.0.0.1 through a bridge, at the same address as inside the namespace.
//!
//! # Using it in a test
//! ```no_run
//! use walt_tests::k8s::{Cluster, ClusterOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // One control plane owned by this test: stopped (by PID) when `cluster` is dropped,
//! // also when the test panics; its processes die with the test process in any case.
//! let cluster = Cluster::start(ClusterOptions::control_plane())?;
//! let admin: kube::Client = cluster.client().await?;
//! let ns = cluster.create_namespace("demo")?; // a fresh namespace, unique name
//! let alice = cluster.user_client("alice", &["walt-users"]).await?; // RBAC applies to her
//! let out = cluster.kubectl().args(["get", "ns", &ns]).output()?; // kubectl with admin rights
//! # Ok(()) }
//! ```
//! Many tests in one test binary can share one control plane with [`shared_control_plane`]
//! (started once, stopped when the test binary exits); give each test its own namespace.
//!
//! # Binaries
//! [`K8sBinaries::ensure`]: `WALT_K8S_BIN`, else `KUBEBUILDER_ASSETS`, else `tests/k8s/build.sh`
//! (pinned release, cached in `${WALT_CACHE:-~/.cache/walt}/k8s/<version>/bin`).
//!
//! # Keeping state for debugging
//! Each cluster lives in a directory (`ClusterOptions::dir`, default a fresh one under the
//! temporary directory) with `pki/`, `kubeconfig/`, `logs/<component>.log` and `state.json`. It is
//! removed when the cluster stops, unless the thread is panicking or `WALT_KEEP_CLUSTER=1` is
//! set: then its path is printed.

pub mod binaries;
pub mod images;
pub mod kubeconfig;
pub mod node;
pub mod pki;
pub mod services;

use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use binaries::K8sBinaries;

use crate::process::{Daemon, Lifetime, stop_pid};
use crate::wait::{Poll, Wait};
use pki::Ca;

/// Errors of the Kubernetes harness. Every message says what failed and where to look.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes binaries could not be found or built.
    #[error("Kubernetes binaries: {0}")]
    Binaries(String),
    /// Certificate generation failed.
    #[error("certificates: {0}")]
    Pki(String),
    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        source: io::Error,
    },
    /// A component did not start or did not become ready.
    #[error("{component} did not become ready: {reason}\n--- last lines of {log} ---\n{tail}")]
    NotReady {
        /// Component name (etcd, kube-apiserver…).
        component: String,
        /// Why we gave up.
        reason: String,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// A helper process could not be started.
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
    /// A command the harness runs failed.
    #[error("`{command}` failed: {message}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr or the reason.
        message: String,
    },
    /// A program or package the harness needs is missing (install it; CI installs everything).
    #[error("missing prerequisite: {0}")]
    Prerequisite(String),
    /// The cluster tier cannot run on this machine.
    #[error("the cluster tier cannot run here: {0}")]
    Unavailable(String),
    /// A Kubernetes client could not be built.
    #[error("Kubernetes client for {kubeconfig}: {message}")]
    Client {
        /// The kubeconfig used.
        kubeconfig: String,
        /// The error.
        message: String,
    },
    /// The state of a cluster started by `cargo xtask cluster up` is unusable.
    #[error("cluster state in {dir}: {message}")]
    State {
        /// The state directory.
        dir: String,
        /// What is wrong.
        message: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Which parts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// etcd, kube-apiserver, kube-controller-manager, kube-scheduler.
    ControlPlane,
    /// The control plane plus one node (containerd, runc, CNI, kubelet) in a network namespace.
    Cluster,
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Tier, String> {
        match s {
            "control-plane" => Ok(Tier::ControlPlane),
            "cluster" => Ok(Tier::Cluster),
            other => Err(format!("unknown tier {other:?}: use control-plane or cluster")),
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::ControlPlane => "control-plane",
            Tier::Cluster => "cluster",
        })
    }
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Which parts run.
    pub tier: Tier,
    /// State directory (created; must be empty or absent). Default: a fresh temporary directory.
    pub dir: Option<PathBuf>,
    /// Whether the processes belong to this test process or outlive it (`cargo xtask`).
    pub lifetime: Lifetime,
    /// How long to wait for readiness (default 180 s: the machine may be busy).
    pub ready_timeout: Duration,
    /// A second cluster node (cluster tier only; default none).
    pub second_node: Option<SecondNode>,
}

/// A second cluster node ([`ClusterOptions::with_second_node`]): its own containerd, kubelet and
/// kube-proxy in its own network namespace on the first node's bridge (address
/// [`node::SECOND_NODE_IP`], pods in [`node::SECOND_POD_CIDR`]), registered as
/// [`node::SECOND_NODE_NAME`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecondNode {
    /// The CPU the node says it is (`kubernetes.io/arch`, `status.nodeInfo.architecture`).
    pub architecture: images::Arch,
}

impl SecondNode {
    /// A node whose kubelet is built for `architecture`: on another CPU than this machine's, that
    /// kubelet runs through qemu-user (binfmt_misc), see [`binaries::kubelet_for`].
    ///
    /// Why a kubelet of that CPU: a node's CPU is what its kubelet says, from its own `GOARCH`: it
    /// puts it in its Node's `kubernetes.io/arch` label at every status update (a label set with
    /// `--node-labels` was back to `amd64` at the first one, tried; one set by hand would be too) and in
    /// `status.nodeInfo.architecture`. An arm64 kubelet says arm64 in both, by itself, as on a
    /// Raspberry Pi. Its containerd stays this machine's (amd64): pods there run amd64 images
    /// natively and an arm64 image's processes through qemu-user, as on the first node. What a test
    /// on such a node proves is where walt places its pods and what it tells about it.
    pub fn architecture(architecture: images::Arch) -> SecondNode {
        SecondNode { architecture }
    }
}

impl ClusterOptions {
    /// The control plane tier, owned by the caller.
    pub fn control_plane() -> ClusterOptions {
        ClusterOptions {
            tier: Tier::ControlPlane,
            dir: None,
            lifetime: Lifetime::Test,
            ready_timeout: Duration::from_mins(3),
            second_node: None,
        }
    }

    /// The same options with a second cluster node (the cluster tier; see [`SecondNode`]).
    #[must_use]
    pub fn with_second_node(mut self, second: SecondNode) -> ClusterOptions {
        self.tier = Tier::Cluster;
        self.second_node = Some(second);
        self
    }

    /// The cluster tier (control plane and a node), owned by the caller.
    pub fn cluster() -> ClusterOptions {
        ClusterOptions {
            tier: Tier::Cluster,
            ..ClusterOptions::control_plane()
        }
    }
}

/// What `cargo xtask cluster up` leaves behind in `<dir>/state.json` so that later commands find
/// the running cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// The tier that runs.
    pub tier: Tier,
    /// API server URL (same from the host and, for the cluster tier, inside the namespace).
    pub server: String,
    /// Processes, in start order: (name, PID).
    pub pids: Vec<(String, u32)>,
    /// The node's network namespace (cluster tier).
    pub netns: Option<String>,
    /// The registry (host:port) that serves the node's images (cluster tier).
    pub registry: Option<String>,
    /// The second node's network namespace, when there is one (its state is in `node-<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_netns: Option<String>,
}

/// A running Kubernetes (see the module docs). Stops what it started when dropped.
pub struct Cluster {
    dir: PathBuf,
    remove_dir: bool,
    tier: Tier,
    binaries: K8sBinaries,
    server: String,
    daemons: Mutex<Vec<Daemon>>,
    node: Option<node::Node>,
    /// The second node ([`ClusterOptions::with_second_node`]).
    second_node: Option<node::Node>,
    detached: bool,
    namespace_counter: std::sync::atomic::AtomicU32,
    /// kube-apiserver's flags, to start it again ([`Cluster::start_api_server`]).
    apiserver_args: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("tier", &self.tier)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// A free TCP port on 127.0.0.1 (bound then released; the kernel does not hand it out again
/// right away).
pub fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::io("bind a free port on 127.0.0.1", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("read a bound port", e))
}

/// The Services' ClusterIP range (kube-apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// Users the harness knows by default: `alice` and `bob`, both in `walt-users`, each with a
/// team group of their own.
pub const DEFAULT_USERS: [(&str, &[&str]); 2] = [
    ("alice", &["walt-users", "team-alice"]),
    ("bob", &["walt-users", "team-bob"]),
];

impl Cluster {
    /// Starts a cluster and waits until it is ready (see [`ClusterOptions`]).
    pub fn start(options: ClusterOptions) -> Result<Cluster, Error> {
        let ClusterOptions {
            tier,
            dir,
            lifetime,
            ready_timeout,
            second_node,
        } = options;
        let started = Instant::now();
        if tier == Tier::Cluster {
            node::check_available()?;
        }
        let binaries = K8sBinaries::ensure()?;
        if let Some(second) = second_node.filter(|s| s.architecture != images::Arch::host()) {
            // Built (once, minutes) before any readiness deadline runs.
            binaries::kubelet_for(second.architecture.oci_name())?;
        }
        let (dir, remove_dir) = if let Some(dir) = dir {
            (dir, false)
        } else {
            let dir = tempfile::Builder::new()
                .prefix("walt-k8s-")
                .tempdir()
                .map_err(|e| Error::io("create a temporary directory", e))?
                .keep();
            (dir, true)
        };
        for sub in ["pki", "kubeconfig", "logs", "etcd"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        }
        let apiserver_port = free_port()?;
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let mut cluster = Cluster {
            dir,
            remove_dir,
            tier,
            binaries,
            server,
            daemons: Mutex::new(Vec::new()),
            node: None,
            second_node: None,
            detached: lifetime == Lifetime::Detached,
            namespace_counter: std::sync::atomic::AtomicU32::new(0),
            apiserver_args: Mutex::new(Vec::new()),
        };
        // From here on, a failure drops `cluster`, which stops whatever already runs.
        if tier == Tier::Cluster {
            cluster.node = Some(node::Node::prepare(&cluster.dir, lifetime)?);
        }
        cluster.start_control_plane(apiserver_port, lifetime, ready_timeout)?;
        if tier == Tier::Cluster {
            let mut node = cluster.node.take().expect("prepared above");
            let result = node.start(&cluster, lifetime, ready_timeout);
            cluster.node = Some(node);
            result?;
            if let Some(second) = second_node {
                cluster.start_second_node(second, lifetime, ready_timeout)?;
            }
        }
        cluster.write_state()?;
        eprintln!(
            "walt-tests: {} tier ready in {:.1} s ({})",
            cluster.tier,
            started.elapsed().as_secs_f64(),
            cluster.dir.display()
        );
        Ok(cluster)
    }

    /// Prepares and starts the second node, joined to the first (already Ready).
    fn start_second_node(
        &mut self,
        second: SecondNode,
        lifetime: Lifetime,
        timeout: Duration,
    ) -> Result<(), Error> {
        let first = self
            .node
            .as_ref()
            .ok_or_else(|| Error::Unavailable("a second node needs the cluster tier's first node".into()))?;
        let place = node::Place::second(second.architecture);
        // Kept in the cluster from here on: a failure stops it with the rest.
        self.second_node = Some(node::Node::prepare_joining(&self.dir, place, first, lifetime)?);
        let (Some(first), Some(second)) = (&self.node, &self.second_node) else {
            unreachable!("both nodes are there")
        };
        second.start_joining(self, first, lifetime, timeout)
    }

    fn start_control_plane(
        &self,
        apiserver_port: u16,
        lifetime: Lifetime,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let pki_dir = self.dir.join("pki");
        let ca = Ca::create(&pki_dir)?;
        let node_ip = self.node.as_ref().map(node::Node::ip);
        let mut ips: Vec<IpAddr> = vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V4(KUBERNETES_SERVICE_IP)];
        ips.extend(node_ip.map(IpAddr::V4));
        let serving = ca.issue(
            "kube-apiserver",
            "kube-apiserver",
            &[],
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &ips,
        )?;
        let kubelet_client = ca.issue(
            "kube-apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            &["system:masters"],
            &[],
            &[],
        )?;
        let (sa_key, sa_pub) = pki::service_account_key(&pki_dir)?;
        let ca_pem = ca.cert_pem()?;
        for (name, cn, orgs) in [
            ("admin", "walt-admin", &["system:masters"][..]),
            (
                "kube-controller-manager",
                "system:kube-controller-manager",
                &[][..],
            ),
            ("kube-scheduler", "system:kube-scheduler", &[][..]),
        ] {
            let cert = ca.issue(name, cn, orgs, &[], &[])?;
            kubeconfig::write(&self.kubeconfig_path(name), &self.server, &ca_pem, &cert, cn)?;
        }

        // etcd: plain HTTP on loopback (of the node's namespace, for the cluster tier).
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = self.command(&self.binaries.etcd);
        etcd.args(["--name", "walt", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("walt={peer_url}")])
            .args(["--unsafe-no-fsync", "--log-level", "warn"]);
        self.spawn("etcd", etcd, lifetime)?;

        let ca_path = ca.cert_path();
        let mut args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={apiserver_port}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            format!("--client-ca-file={}", ca_path.display()),
            format!("--tls-cert-file={}", serving.cert.display()),
            format!("--tls-private-key-file={}", serving.key.display()),
            format!("--kubelet-client-certificate={}", kubelet_client.cert.display()),
            format!("--kubelet-client-key={}", kubelet_client.key.display()),
            format!("--kubelet-certificate-authority={}", ca_path.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            format!("--cert-dir={}", pki_dir.display()),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        match node_ip {
            // Inside the node's namespace: pods reach the API server at the node address.
            Some(ip) => args.extend([
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={ip}"),
            ]),
            // Loopback only; the `kubernetes` Service cannot point at a loopback address.
            None => args.extend([
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--endpoint-reconciler-type=none".into(),
            ]),
        }
        let mut apiserver = self.command(&self.binaries.kube_apiserver);
        apiserver.args(&args);
        *self
            .apiserver_args
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = args;
        self.spawn("kube-apiserver", apiserver, lifetime)?;
        if let Some(node) = &self.node {
            node.bridge_to_host(self, "apiserver-bridge", apiserver_port, lifetime)?;
        }
        self.wait_ready("kube-apiserver", deadline)?;

        if let Some(cm) = &self.binaries.kube_controller_manager {
            let mut command = self.command(cm);
            command
                .arg(format!(
                    "--kubeconfig={}",
                    self.kubeconfig_path("kube-controller-manager").display()
                ))
                .arg("--leader-elect=false")
                .arg("--secure-port=0")
                .arg("--use-service-account-credentials=true")
                .arg(format!("--root-ca-file={}", ca_path.display()))
                .arg(format!("--service-account-private-key-file={}", sa_key.display()))
                .arg(format!("--cluster-signing-cert-file={}", ca_path.display()))
                .arg(format!(
                    "--cluster-signing-key-file={}",
                    pki_dir.join("ca.key").display()
                ))
                .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
                .arg("--v=1");
            self.spawn("kube-controller-manager", command, lifetime)?;
        }
        if let Some(scheduler) = &self.binaries.kube_scheduler {
            let mut command = self.command(scheduler);
            command
                .arg(format!(
                    "--kubeconfig={}",
                    self.kubeconfig_path("kube-scheduler").display()
                ))
                .arg("--leader-elect=false")
                .arg("--secure-port=0")
                .arg("--v=1");
            self.spawn("kube-scheduler", command, lifetime)?;
        }
        if self.binaries.kube_controller_manager.is_some() {
            // Pods need the `default` ServiceAccount and the `kube-root-ca.crt` ConfigMap, which
            // the controller manager creates.
            self.wait_for(
                "kube-controller-manager",
                deadline,
                &[
                    "get",
                    "-n",
                    "default",
                    "serviceaccount/default",
                    "configmap/kube-root-ca.crt",
                ],
            )?;
        }
        Ok(())
    }

    /// A command for `program`, run inside the node's network namespace for the cluster tier.
    pub(crate) fn command(&self, program: &Path) -> Command {
        match &self.node {
            Some(node) => node.command(program),
            None => Command::new(program),
        }
    }

    pub(crate) fn spawn(&self, name: &str, command: Command, lifetime: Lifetime) -> Result<(), Error> {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let daemon = Daemon::spawn(name, command, &log, lifetime)?;
        self.daemons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(daemon);
        Ok(())
    }

    /// Stops kube-apiserver (`SIGTERM`, `SIGKILL` after 10 s) and leaves it down; etcd and the other
    /// components keep running. For tests of what survives an API server restart: start it again
    /// with [`Cluster::start_api_server`].
    pub fn stop_api_server(&self) {
        let daemon = {
            let mut daemons = self
                .daemons
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = daemons
                .iter()
                .position(|daemon| daemon.name() == "kube-apiserver");
            at.map(|at| daemons.remove(at))
        };
        if let Some(mut daemon) = daemon {
            daemon.stop(Duration::from_secs(10));
        }
    }

    /// Starts kube-apiserver again with the flags it first had (same port, same etcd, same
    /// certificates) and waits until it is ready; returns how long that took.
    pub fn start_api_server(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        let args = self
            .apiserver_args
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut apiserver = self.command(&self.binaries.kube_apiserver);
        apiserver.args(&args);
        let lifetime = if self.detached {
            Lifetime::Detached
        } else {
            Lifetime::Test
        };
        self.spawn("kube-apiserver", apiserver, lifetime)?;
        self.wait_ready("kube-apiserver", Instant::now() + Duration::from_mins(2))?;
        self.write_state()?;
        Ok(started.elapsed())
    }

    /// Fails with the component's log if it has exited.
    pub(crate) fn check_alive(&self, component: &str) -> Result<(), Error> {
        let mut daemons = self
            .daemons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for daemon in daemons.iter_mut() {
            if let Some(status) = daemon.exited() {
                return Err(Error::NotReady {
                    component: component.to_string(),
                    reason: format!("{} exited ({status})", daemon.name()),
                    log: daemon.log().display().to_string(),
                    tail: daemon.log_tail(30),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn not_ready(&self, component: &str, reason: String) -> Error {
        let log = self.dir.join("logs").join(format!("{component}.log"));
        Error::NotReady {
            component: component.to_string(),
            tail: crate::process::log_tail(&log, 30),
            log: log.display().to_string(),
            reason,
        }
    }

    fn wait_ready(&self, component: &str, deadline: Instant) -> Result<(), Error> {
        self.wait_for(component, deadline, &["get", "--raw", "/readyz"])
    }

    /// Runs `kubectl ARGS` (admin) until it succeeds, failing if a process exits or at `deadline`.
    pub(crate) fn wait_for(&self, component: &str, deadline: Instant, args: &[&str]) -> Result<(), Error> {
        Wait::new(
            &format!("`kubectl {}` to succeed", args.join(" ")),
            deadline.saturating_duration_since(Instant::now()),
        )
        .every(Duration::from_millis(250))
        .until(|| -> Result<_, Error> {
            self.check_alive(component)?;
            let output = self
                .kubectl()
                .args(args)
                .arg("--request-timeout=5s")
                .output()
                .map_err(|e| Error::io("run kubectl", e))?;
            Ok(if output.status.success() {
                Poll::Ready(())
            } else {
                Poll::Pending(String::from_utf8_lossy(&output.stderr).trim().to_owned())
            })
        })
        .map_err(|e| e.or_timed_out(|message| self.not_ready(component, message)))
    }

    fn write_state(&self) -> Result<(), Error> {
        let state = State {
            tier: self.tier,
            server: self.server.clone(),
            pids: self
                .daemons
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|d| (d.name().to_string(), d.pid()))
                .collect(),
            netns: self.node.as_ref().map(|n| n.netns().to_string()),
            registry: self.node.as_ref().map(node::Node::registry),
            second_netns: self.second_node.as_ref().map(|n| n.netns().to_string()),
        };
        let path = self.dir.join("state.json");
        let text = serde_json::to_string_pretty(&state).expect("state serializes");
        std::fs::write(&path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Which tier runs.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The API server URL, `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The binaries this cluster runs (kubectl among them).
    pub fn binaries(&self) -> &K8sBinaries {
        &self.binaries
    }

    /// The registry (`127.0.0.1:PORT`) from which the node pulls images (cluster tier only).
    /// The same address works on the host (to push) and on the node (to pull).
    pub fn registry(&self) -> Option<String> {
        self.node.as_ref().map(node::Node::registry)
    }

    /// The same registry as pods reach it (`NODE_IP:PORT`; cluster tier only).
    pub fn registry_for_pods(&self) -> Option<String> {
        self.node.as_ref().map(node::Node::registry_for_pods)
    }

    /// The node's network namespace (`/run/netns/NAME`; cluster tier only): a process started in
    /// it (`nsenter --net=/run/netns/NAME`) reaches the node and pod addresses, like a pod.
    pub fn node_netns(&self) -> Option<&str> {
        self.node.as_ref().map(node::Node::netns)
    }

    /// The name of the node (cluster tier only).
    pub fn node_name(&self) -> Option<&str> {
        self.node.as_ref().map(node::Node::name)
    }

    /// The name of the second node, when the cluster has one ([`ClusterOptions::with_second_node`]).
    pub fn second_node_name(&self) -> Option<&str> {
        self.second_node.as_ref().map(node::Node::name)
    }

    fn kubeconfig_path(&self, name: &str) -> PathBuf {
        self.dir.join("kubeconfig").join(format!("{name}.kubeconfig"))
    }

    /// The admin kubeconfig (group `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig_path("admin")
    }

    /// A kubeconfig for the ordinary user `user` in `groups` (a client certificate signed by
    /// the cluster CA, at most 2 groups; RBAC decides what they may do). Written on first use;
    /// later calls for the same user return that file whatever the groups.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf, Error> {
        user_kubeconfig(&self.dir, &self.server, user, groups)
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(&self.binaries.kubectl);
        command.env("KUBECONFIG", self.kubeconfig());
        command
    }

    /// `kubectl` as an ordinary user.
    pub fn kubectl_as(&self, user: &str, groups: &[&str]) -> Result<Command, Error> {
        let mut command = Command::new(&self.binaries.kubectl);
        command.env("KUBECONFIG", self.user_kubeconfig(user, groups)?);
        Ok(command)
    }

    /// Runs `kubectl ARGS` as admin and returns its stdout, or an error with its stderr.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<String, Error> {
        run_kubectl(self.kubectl(), args)
    }

    /// The messages of the Events (any namespace: those of a cluster-scoped object are in `default`)
    /// about objects named `object` with this `reason`, one a line.
    pub fn event_messages(&self, object: &str, reason: &str) -> Result<String, Error> {
        self.kubectl_output(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!("involvedObject.name={object},reason={reason}"),
            "-o",
            "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
        ])
    }

    /// Creates the Secret `walt-node-key` (type `kubernetes.io/ssh-auth`) in `namespace` from the
    /// private key file `key`: the node key the operator logs in to nodes with.
    pub fn create_node_key_secret(&self, namespace: &str, key: &std::path::Path) -> Result<String, Error> {
        self.kubectl_output(&[
            "-n",
            namespace,
            "create",
            "secret",
            "generic",
            "walt-node-key",
            "--type=kubernetes.io/ssh-auth",
            &format!("--from-file=ssh-privatekey={}", key.display()),
        ])
    }

    /// A kube-rs client with admin rights.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        client_from(&self.kubeconfig()).await
    }

    /// A kube-rs client as the ordinary user `user` in `groups`.
    pub async fn user_client(&self, user: &str, groups: &[&str]) -> Result<kube::Client, Error> {
        client_from(&self.user_kubeconfig(user, groups)?).await
    }

    /// Creates a namespace named `<prefix>-<n>` unique in this cluster, and returns its name.
    pub fn create_namespace(&self, prefix: &str) -> Result<String, Error> {
        let n = self
            .namespace_counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        self.kubectl_output(&["create", "namespace", &name])?;
        Ok(name)
    }

    /// Leaves everything running (for `cargo xtask cluster up`) and returns the state directory.
    pub fn detach(mut self) -> PathBuf {
        self.detached = true;
        let daemons = std::mem::take(
            &mut *self
                .daemons
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for daemon in daemons {
            daemon.keep_running();
        }
        for node in [self.second_node.take(), self.node.take()].into_iter().flatten() {
            node.keep();
        }
        self.dir.clone()
    }

    /// Stops everything (reverse start order) and removes the state (see module docs).
    pub fn stop(&self) {
        if self.detached {
            return;
        }
        let mut daemons = std::mem::take(
            &mut *self
                .daemons
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        while let Some(mut daemon) = daemons.pop() {
            daemon.stop(Duration::from_secs(10));
        }
        // The second node first: its namespace holds one end of the veth pair on the first's bridge.
        for node in [&self.second_node, &self.node].into_iter().flatten() {
            node.cleanup();
        }
        let keep =
            std::thread::panicking() || std::env::var_os("WALT_KEEP_CLUSTER").is_some_and(|v| v == "1");
        if keep {
            eprintln!(
                "walt-tests: cluster state and logs kept in {}",
                self.dir.display()
            );
        } else if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn user_kubeconfig(dir: &Path, server: &str, user: &str, groups: &[&str]) -> Result<PathBuf, Error> {
    let valid = !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '@'));
    if !valid {
        return Err(Error::Pki(format!(
            "user name {user:?}: use letters, digits, '-', '.', '_' or '@'"
        )));
    }
    let path = dir.join("kubeconfig").join(format!("{user}.kubeconfig"));
    if path.exists() {
        return Ok(path);
    }
    let ca = Ca::load(&dir.join("pki"))?;
    let cert = ca.issue(&format!("user-{user}"), user, groups, &[], &[])?;
    kubeconfig::write(&path, server, &ca.cert_pem()?, &cert, user)?;
    Ok(path)
}

/// Runs a prepared kubectl command with `args`, returning stdout or an error with stderr.
pub fn run_kubectl(mut command: Command, args: &[&str]) -> Result<String, Error> {
    let output = command
        .args(args)
        .output()
        .map_err(|e| Error::io("run kubectl", e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("kubectl {}", args.join(" ")),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

async fn client_from(path: &Path) -> Result<kube::Client, Error> {
    let fail = |message: String| Error::Client {
        kubeconfig: path.display().to_string(),
        message,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| fail(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| fail(e.to_string()))
}

/// One control plane for the whole test process, started on first use and stopped when the
/// process exits (its processes also die if the process is killed). Tests sharing it should
/// work in their own namespaces ([`Cluster::create_namespace`]).
pub fn shared_control_plane() -> Result<&'static Cluster, Error> {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let cluster = Cluster::start(ClusterOptions::control_plane()).map_err(|e| e.to_string());
            if cluster.is_ok() {
                crate::process::at_exit(|| {
                    if let Some(Ok(cluster)) = SHARED.get() {
                        cluster.stop();
                    }
                });
            }
            cluster
        })
        .as_ref()
        .map_err(|e| Error::NotReady {
            component: "shared control plane".into(),
            reason: e.clone(),
            log: String::new(),
            tail: String::new(),
        })
}

/// Environment variable set by `cargo xtask test`: `run`, or `skip: <reason>` when this machine
/// cannot run the cluster tier.
pub const WALT_CLUSTER_TIER: &str = "WALT_CLUSTER_TIER";

/// Whether the cluster-tier test `test` runs here: `false` (printed: `SKIPPED test: …`) when this
/// machine cannot run the tier. The one prologue of every cluster-tier test.
///
/// # Panics
/// When a prerequisite is missing (the test fails with what to install).
pub fn cluster_tier_runs(test: &str) -> bool {
    match cluster_tier_skip_reason() {
        Ok(Some(reason)) => {
            eprintln!("SKIPPED {test}: the cluster tier cannot run on this machine: {reason}");
            false
        }
        Ok(None) => true,
        Err(error) => panic!("cluster tier prerequisites: {error}"),
    }
}

/// `Ok(Some(reason))` when cluster-tier tests must be skipped on this machine (printed by the
/// caller), `Ok(None)` when they run, `Err` when a prerequisite is missing (tests then fail with
/// what to install).
pub fn cluster_tier_skip_reason() -> Result<Option<String>, Error> {
    match std::env::var(WALT_CLUSTER_TIER) {
        Ok(value) if value == "run" => return Ok(None),
        Ok(value) if value.starts_with("skip") => {
            return Ok(Some(
                value
                    .trim_start_matches("skip")
                    .trim_start_matches(':')
                    .trim()
                    .to_string(),
            ));
        }
        _ => {}
    }
    match node::check_available() {
        Ok(()) => Ok(None),
        Err(Error::Unavailable(reason)) => Ok(Some(reason)),
        Err(other) => Err(other),
    }
}

/// A cluster started earlier by `cargo xtask cluster up` (its state directory).
#[derive(Debug)]
pub struct Running {
    /// The state directory.
    pub dir: PathBuf,
    /// What runs.
    pub state: State,
}

impl Running {
    /// Reads `<dir>/state.json`; `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Running>, Error> {
        let path = dir.join("state.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        let state = serde_json::from_str(&text).map_err(|e| Error::State {
            dir: dir.display().to_string(),
            message: format!("state.json is unreadable ({e}): run `cargo xtask cluster down`"),
        })?;
        Ok(Some(Running {
            dir: dir.to_path_buf(),
            state,
        }))
    }

    /// Names of the recorded processes that no longer run.
    pub fn dead(&self) -> Vec<String> {
        self.state
            .pids
            .iter()
            .filter(|(_, pid)| !crate::process::pid_alive(*pid))
            .map(|(name, pid)| format!("{name} (PID {pid})"))
            .collect()
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig/admin.kubeconfig")
    }

    /// A kubeconfig for an ordinary user (see [`Cluster::user_kubeconfig`]).
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf, Error> {
        user_kubeconfig(&self.dir, &self.state.server, user, groups)
    }

    /// Stops every recorded process (reverse order), removes the node's namespace and mounts,
    /// and deletes the state directory.
    pub fn down(self) -> Result<(), Error> {
        for (_, pid) in self.state.pids.iter().rev() {
            stop_pid(*pid, Duration::from_secs(10));
        }
        if let Some(netns) = &self.state.second_netns {
            let place = node::Place::second(images::Arch::host());
            node::cleanup_leftovers(&self.dir.join(node::node_dir_name(&place)), netns);
        }
        if let Some(netns) = &self.state.netns {
            node::cleanup_leftovers(&self.dir.join(node::node_dir_name(&node::Place::first())), netns);
        }
        std::fs::remove_dir_all(&self.dir).map_err(|e| Error::io(format!("remove {}", self.dir.display()), e))
    }
}
