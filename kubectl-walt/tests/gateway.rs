//! `node shell`, `node run` and `node proxy` end to end: the plugin against the real API server,
//! the real operator (`walt-operator run`: its ShellSession controller and its SSH gateway, on
//! 127.0.0.1) and a real OpenSSH node in a network namespace. The interactive shell is driven
//! through a PTY; `node proxy` is used by OpenSSH's own `ssh`. Run as root (network namespaces).
//!
//! The plugin reaches the gateway with `--gateway-address` (the operator runs outside the
//! cluster here; in a cluster it port-forwards to the gateway Service's pods).

// Test helpers panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ListParams, PostParams};
use walt_crds::{Node, NodeSpec, ShellSession};
use walt_tests::k8s::{Cluster, shared_control_plane};
use walt_tests::operator::OperatorProcess;
use walt_tests::pty::Pty;
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

/// The operator (controllers and gateway), a node, a namespace.
struct Lab {
    namespace: String,
    kubeconfig: PathBuf,
    gateway: std::net::SocketAddr,
    work: tempfile::TempDir,
    operator: OperatorProcess,
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
        cluster
            .kubectl_output(&[
                "-n",
                &namespace,
                "create",
                "secret",
                "generic",
                "walt-node-key",
                "--type=kubernetes.io/ssh-auth",
                &format!("--from-file=ssh-privatekey={}", node.client_key().display()),
            ])
            .expect("node key Secret");
        let args: Vec<String> = [
            "--namespace",
            &namespace,
            "--watch-namespace",
            &namespace,
            "--leader-election",
            "false",
            "--lab-registry",
            "127.0.0.1:1/lab",
            "--registry-plain-http",
            "true",
            "--node-key-secret",
            "walt-node-key",
            "--shell-image",
            "127.0.0.1:1/walt/operator:test",
            "--catalog-namespace",
            "walt-catalog-none",
            "--probe-interval",
            "2s",
            "--node-proxy-command",
            &node.proxy_command(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let operator = OperatorProcess::start(
            &cluster.kubeconfig(),
            None,
            &args,
            &work.path().join("operator.log"),
        )
        .expect("start walt-operator");
        operator.wait_started(Duration::from_mins(1));
        let gateway = operator.gateway;
        runtime.block_on(async {
            let client = cluster.client().await.unwrap();
            let nodes: Api<Node> = Api::namespaced(client.clone(), &namespace);
            let spec = NodeSpec {
                model: "pc-x86-64".into(),
                address: Some(node.address().to_string()),
                ssh_port: 22,
                host_key: Some(node.host_public_key().trim().to_owned()),
                ..NodeSpec::default()
            };
            nodes
                .create(&PostParams::default(), &Node::new("vnode", spec))
                .await
                .unwrap();
            // The operator probes it over SSH: Ready once it answers with its ready marker.
            let deadline = Instant::now() + Duration::from_mins(1);
            loop {
                let phase = nodes
                    .get("vnode")
                    .await
                    .unwrap()
                    .status
                    .map(|s| format!("{:?}", s.phase))
                    .unwrap_or_default();
                if phase == "Ready" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node not Ready ({phase}); operator log:\n{}",
                    operator.log()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Lab {
            namespace,
            kubeconfig: cluster.kubeconfig(),
            gateway,
            work,
            operator,
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

    /// Sessions not yet gone (deleted ones disappear once the operator's finalizer ran).
    fn sessions_left(&self) -> usize {
        self.runtime.block_on(async {
            let api: Api<ShellSession> = Api::namespaced(cluster().client().await.unwrap(), &self.namespace);
            api.list(&ListParams::default()).await.unwrap().items.len()
        })
    }

    fn wait_no_sessions(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.sessions_left() != 0 {
            assert!(
                Instant::now() < deadline,
                "sessions were left behind; operator log:\n{}",
                self.operator.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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
    lab.wait_no_sessions();
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
    lab.wait_no_sessions();
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
    lab.wait_no_sessions();
}
