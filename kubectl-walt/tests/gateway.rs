//! `node shell`, `node run` and `node proxy` end to end: the plugin against the real API server,
//! the walt SSH gateway (walt-operator's, in this test process on 127.0.0.1) and a real OpenSSH
//! node in a network namespace. The interactive shell is driven through a PTY; `node proxy` is
//! used by OpenSSH's own `ssh`. Run as root (network namespaces).
//!
//! The test stands in for the operator's ShellSession controller: when a node session appears,
//! it authorizes the session's key at the gateway and writes the status the operator writes
//! (phase Running, gateway {service, port, user}). The plugin reaches the gateway with
//! `--gateway-address` (the gateway runs outside the cluster here).

// Test helpers panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use walt_crds::{Node, NodeSpec, ShellSession};
use walt_operator::ssh::client::{self, BoxedStream, Connector, HostKeyPolicy, NodeTarget, Transport};
use walt_operator::ssh::gateway::{Authorization, Authorizations, Gateway, GatewayConfig};
use walt_tests::k8s::{Cluster, shared_control_plane};
use walt_tests::sshnode::SshNode;

fn cluster() -> &'static Cluster {
    static READY: OnceLock<()> = OnceLock::new();
    let cluster = shared_control_plane().expect("control plane (see tests/k8s for the binaries)");
    READY.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let crds: Api<CustomResourceDefinition> = Api::all(cluster.client().await.unwrap());
            for crd in walt_crds::crds() {
                match crds.create(&PostParams::default(), &crd).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => panic!("install CRD: {e}"),
                }
            }
            // Wait until the API serves the kinds.
            let deadline = Instant::now() + Duration::from_mins(1);
            let client = cluster.client().await.unwrap();
            let sessions: Api<ShellSession> = Api::namespaced(client, "default");
            while sessions.list(&ListParams::default()).await.is_err() {
                assert!(Instant::now() < deadline, "CRDs not served");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    });
    cluster
}

fn connector(node: &SshNode) -> Connector {
    let lab = node.lab_netns().to_owned();
    Arc::new(move |host: String, port: u16| {
        let lab = lab.clone();
        Box::pin(async move {
            let address: std::net::SocketAddr =
                format!("{host}:{port}").parse().map_err(std::io::Error::other)?;
            let stream =
                tokio::task::spawn_blocking(move || walt_tests::sshnode::connect_in_netns(&lab, address))
                    .await
                    .map_err(std::io::Error::other)??;
            stream.set_nonblocking(true)?;
            Ok(Box::new(tokio::net::TcpStream::from_std(stream)?) as BoxedStream)
        })
    })
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

/// The gateway, a node, and a stand-in for the operator's session controller.
struct Lab {
    namespace: String,
    kubeconfig: PathBuf,
    gateway: std::net::SocketAddr,
    work: tempfile::TempDir,
    _node: SshNode,
    runtime: tokio::runtime::Runtime,
}

/// One test at a time: node fixtures copy and run binaries, and a process forked by a parallel
/// test meanwhile can hold a file open for writing ("Text file busy").
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Lab {
    fn start(prefix: &str) -> Lab {
        let cluster = cluster();
        let namespace = cluster.create_namespace(prefix).unwrap();
        let work = tempfile::tempdir().unwrap();
        let node = SshNode::busybox().expect("sshd node (run as root)");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let host_key = keygen(work.path(), "gateway_host");
        let target: NodeTarget = format!("root@{}:22", node.address()).parse().unwrap();
        let node_host_key = HostKeyPolicy::Pinned(client::parse_public_key(node.host_public_key()).unwrap());
        let (gateway, kubeconfig) = runtime.block_on(async {
            let mut config = GatewayConfig::new(
                client::load_key_file(&host_key).unwrap(),
                client::load_key_file(&node.client_key()).unwrap(),
            );
            config.node_transport = Transport::Connector(connector(&node));
            let authorizations = Authorizations::new();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            tokio::spawn(Gateway::new(config, authorizations.clone()).serve(listener));

            let client = cluster.client().await.unwrap();
            let nodes: Api<Node> = Api::namespaced(client.clone(), &namespace);
            let spec = NodeSpec {
                model: "pc-x86-64".into(),
                address: Some(node.address().to_string()),
                ssh_port: 22,
                ..NodeSpec::default()
            };
            nodes
                .create(&PostParams::default(), &Node::new("vnode", spec))
                .await
                .unwrap();
            nodes
                .patch_status(
                    "vnode",
                    &PatchParams::default(),
                    &Patch::Merge(&serde_json::json!({"status": {"phase": "Ready"}})),
                )
                .await
                .unwrap();
            tokio::spawn(session_controller(
                client,
                namespace.clone(),
                authorizations,
                target,
                node_host_key,
            ));
            (address, cluster.kubeconfig())
        });
        Lab {
            namespace,
            kubeconfig,
            gateway,
            work,
            _node: node,
            runtime,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kubectl-walt"));
        // Global flags first: whatever follows `--` goes to the node.
        command
            .args([
                "-n",
                &self.namespace,
                "--gateway-address",
                &self.gateway.to_string(),
            ])
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig);
        command
    }

    fn sessions_left(&self) -> usize {
        self.runtime.block_on(async {
            let api: Api<ShellSession> = Api::namespaced(cluster().client().await.unwrap(), &self.namespace);
            api.list(&ListParams::default()).await.unwrap().items.len()
        })
    }
}

/// What the operator does for node sessions: authorize the key at the gateway while the session
/// exists, and report Running with the gateway's coordinates.
async fn session_controller(
    client: Client,
    namespace: String,
    authorizations: Authorizations,
    target: NodeTarget,
    host_key: HostKeyPolicy,
) {
    let api: Api<ShellSession> = Api::namespaced(client, &namespace);
    let mut events = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(Ok(session)) = events.next().await {
        let name = session.metadata.name.clone().unwrap();
        if session.metadata.deletion_timestamp.is_some() || session.status.is_some() {
            continue;
        }
        let Some(key) = session.spec.public_key.clone() else {
            continue;
        };
        authorizations.add(Authorization {
            session_id: name.clone(),
            node: target.clone(),
            node_host_key: host_key.clone(),
            public_key: client::parse_public_key(&key).unwrap(),
            expires_at: SystemTime::now() + Duration::from_mins(10),
        });
        let status = serde_json::json!({"status": {"phase": "Running",
            "gateway": {"service": "walt-gateway.walt-system", "port": 22, "user": name}}});
        let _ = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await;
    }
}

/// A child process on a pseudo-terminal (its controlling terminal, through `setsid -c`).
struct Pty {
    master: OwnedFd,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    fn spawn(command: &Command) -> Pty {
        let pty = nix::pty::openpty(
            Some(&nix::pty::Winsize {
                ws_row: 30,
                ws_col: 100,
                ws_xpixel: 0,
                ws_ypixel: 0,
            }),
            None,
        )
        .unwrap();
        let program = command.get_program().to_owned();
        let args: Vec<_> = command.get_args().map(ToOwned::to_owned).collect();
        let envs: Vec<_> = command
            .get_envs()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned())))
            .collect();
        let slave = pty.slave;
        let child = Command::new("setsid")
            .arg("-c")
            .arg(program)
            .args(args)
            .envs(envs)
            .env("TERM", "xterm")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let reader_fd = pty.master.try_clone().unwrap();
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::from(reader_fd);
            let mut buf = [0u8; 4096];
            while let Ok(n) = file.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            master: pty.master,
            child,
            output,
        }
    }

    fn send(&self, text: &str) {
        let mut file = std::fs::File::from(self.master.try_clone().unwrap());
        file.write_all(text.as_bytes()).unwrap();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn expect(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "never saw {needle:?}; got:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait(&mut self) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200));
                return (status.code().unwrap_or(-1), self.text());
            }
            assert!(
                Instant::now() < deadline,
                "the plugin did not exit:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the terminal is back in canonical (cooked) mode with echo.
    fn cooked(&self) -> bool {
        let attrs = nix::sys::termios::tcgetattr(&self.master).unwrap();
        attrs.local_flags.contains(nix::sys::termios::LocalFlags::ICANON)
            && attrs.local_flags.contains(nix::sys::termios::LocalFlags::ECHO)
    }
}

#[test]
fn node_shell_through_a_pty_restores_the_terminal_and_cleans_up() {
    let _serial = serial();
    let lab = Lab::start("walt-nshell");
    let mut pty = Pty::spawn(&lab.command(&["node", "shell", "vnode"]));
    pty.expect("Note: changes outside /persist will be lost on next node reboot.");
    pty.send("echo walt-$((6*7)); stty size\n");
    pty.expect("walt-42");
    pty.expect("30 100");
    pty.send("exit 7\n");
    let (code, output) = pty.wait();
    assert_eq!(code, 7, "the remote exit status is the plugin's:\n{output}");
    assert!(pty.cooked(), "the terminal is back in cooked mode with echo");
    assert_eq!(lab.sessions_left(), 0, "the session was deleted");
    let _ = &lab.work;
}

#[test]
fn node_shell_runs_a_command_and_node_run_prefixes_lines() {
    let _serial = serial();
    let lab = Lab::start("walt-nrun");
    let out = lab
        .command(&["node", "shell", "vnode", "--", "sh", "-c", "echo out; exit 3"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("out"));

    let out = lab
        .command(&["node", "run", "vnode", "--", "printf 'a\\nb\\n'; echo err >&2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "vnode: a\nvnode: b\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("vnode: err\n"));
    let out = lab
        .command(&["node", "run", "vnode", "--", "false"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(lab.sessions_left(), 0);
}

#[test]
fn node_proxy_serves_openssh() {
    let _serial = serial();
    let lab = Lab::start("walt-proxy");
    let key = keygen(lab.work.path(), "user");
    let proxy = format!(
        "{} node proxy %h --login %r --public-key {} -n {} --gateway-address {}",
        env!("CARGO_BIN_EXE_kubectl-walt"),
        key.with_extension("pub").display(),
        lab.namespace,
        lab.gateway
    );
    let out = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg("-i")
        .arg(&key)
        .arg("-o")
        .arg(format!("ProxyCommand={proxy}"))
        .arg("me-vnode@vnode")
        .arg("echo proxied-$((40+2))")
        .env("KUBECONFIG", &lab.kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh through node proxy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "proxied-42\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.sessions_left() != 0 {
        assert!(Instant::now() < deadline, "the proxy's session was left behind");
        std::thread::sleep(Duration::from_millis(100));
    }
}
