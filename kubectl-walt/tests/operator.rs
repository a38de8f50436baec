//! The plugin against the real operator: `kubectl walt` on a real API server, with the real
//! operator (`walt-operator run`: its Node, Image, NodeSave and ShellSession controllers and its SSH
//! gateway, on 127.0.0.1), a real registry (Debian's docker-registry) and a real OpenSSH node in a
//! network namespace. Every answer the plugin shows comes from the operator; skopeo and OpenSSH's
//! `ssh` check what was produced. The interactive shell is driven through a PTY. Run as root
//! (network namespaces).
//!
//! The plugin reaches the gateway with `--gateway-address` (the operator runs outside the
//! cluster here; in a cluster it port-forwards to the gateway Service's pods).

// Test helpers panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ListParams, PostParams};
use walt_crds::{Device, DeviceLoan, DeviceSpec, Image, ImageSpec, Node, NodeSpec, ShellSession};
use walt_tests::images::{Arch, OciLayout, skopeo_inspect_format};
use walt_tests::k8s::{Cluster, shared_control_plane};
use walt_tests::operator::OperatorProcess;
use walt_tests::pty::Pty;
use walt_tests::registry::Registry;
use walt_tests::sshnode::{SshNode, keygen};
use walt_tests::wait::{Poll, Wait, wait_for, wait_for_async};

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
            let client = cluster.client().await.unwrap();
            let sessions: Api<ShellSession> = Api::namespaced(client, "default");
            wait_for_async(
                "the walt CRDs to be served",
                Duration::from_mins(1),
                async || match sessions.list(&ListParams::default()).await {
                    Ok(_) => Poll::Ready(()),
                    Err(e) => Poll::Pending(e.to_string()),
                },
            )
            .await
            .unwrap();
        });
    });
    cluster
}

/// The operator (controllers and gateway), a registry holding image `debian` (busybox, amd64), a
/// node `vnode` that boots it, a namespace.
struct Lab {
    namespace: String,
    kubeconfig: PathBuf,
    gateway: std::net::SocketAddr,
    work: tempfile::TempDir,
    operator: OperatorProcess,
    node: SshNode,
    registry: Registry,
    /// The digest of `debian` as pushed.
    base_digest: String,
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
        let registry = Registry::start().expect("start a docker-registry on loopback");
        let base_digest = OciLayout::busybox(Arch::Amd64)
            .expect("busybox image")
            .push("base", &registry, &format!("lab/{namespace}/debian:latest"))
            .expect("skopeo copy the base image to the registry");
        let lab_registry = format!("{}/lab", registry.host());
        let registry_host = registry.host();
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
            &lab_registry,
            "--registry-plain-http",
            "true",
            "--plain-http-sources",
            &registry_host,
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
            let images: Api<Image> = Api::namespaced(client.clone(), &namespace);
            images
                .create(
                    &PostParams::default(),
                    &Image::new("debian", ImageSpec::default()),
                )
                .await
                .unwrap();
            // The lab registers the sshd node as a Device and lends it to the namespace.
            let device_name = format!("{namespace}-pc");
            Api::<Device>::all(client.clone())
                .create(
                    &PostParams::default(),
                    &Device::new(
                        &device_name,
                        DeviceSpec {
                            address: Some(node.address().to_string()),
                            ssh_port: 22,
                            model: "pc-x86-64".into(),
                            host_key: Some(node.host_public_key().trim().to_owned()),
                            lent_to: Some(DeviceLoan {
                                namespace: namespace.clone(),
                            }),
                            ..DeviceSpec::default()
                        },
                    ),
                )
                .await
                .unwrap();
            let nodes: Api<Node> = Api::namespaced(client.clone(), &namespace);
            let spec = NodeSpec {
                model: "pc-x86-64".into(),
                image: Some("debian".into()),
                device: Some(device_name),
                ..NodeSpec::default()
            };
            nodes
                .create(&PostParams::default(), &Node::new("vnode", spec))
                .await
                .unwrap();
            // The operator resolves the image and probes the node over SSH: Ready once it answers
            // with its ready marker, booted on the image's digest.
            Wait::new(
                &format!("the node to be Ready on {base_digest}"),
                Duration::from_mins(1),
            )
            .every(Duration::from_millis(250))
            .until_async(async || {
                let status = nodes.get("vnode").await.unwrap().status.unwrap_or_default();
                let phase = format!("{:?}", status.phase);
                let booted = status.booted_image.and_then(|b| b.digest);
                if phase == "Ready" && booted.as_deref() == Some(base_digest.as_str()) {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!("{phase}, booted {booted:?}"))
                }
            })
            .await
            .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", operator.log()));
        });
        Lab {
            namespace,
            kubeconfig: cluster.kubeconfig(),
            gateway,
            work,
            operator,
            node,
            registry,
            base_digest,
            runtime,
        }
    }

    /// Runs the plugin, which must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "kubectl walt {args:?} failed ({}):\n{}{}\noperator log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.operator.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the plugin, which must fail with exit code 1; returns its stderr.
    fn refused(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "kubectl walt {args:?} should fail: {}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    /// `kubectl get … -o jsonpath=…` in the lab's namespace (empty when absent).
    fn jsonpath(&self, object: &str, path: &str) -> String {
        cluster()
            .kubectl_output(&[
                "-n",
                &self.namespace,
                "get",
                object,
                "--ignore-not-found",
                "-o",
                &format!("jsonpath={path}"),
            ])
            .unwrap_or_default()
    }

    /// Waits until `object`'s `path` reads `want`.
    fn wait_jsonpath(&self, object: &str, path: &str, want: &str) {
        wait_for(
            &format!("{object} {path} to be {want:?}"),
            Duration::from_mins(1),
            || {
                let got = self.jsonpath(object, path);
                if got == want {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!("{got:?}"))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", self.operator.log()));
    }

    /// The digest skopeo (an independent client) reads for `repository:tag` in the lab registry.
    fn registry_digest(&self, repository_and_tag: &str) -> String {
        skopeo_inspect_format(&self.registry, repository_and_tag, "{{.Digest}}")
            .unwrap_or_else(|e| panic!("skopeo inspect {repository_and_tag}: {e}"))
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
        Wait::new("no session to be left", Duration::from_secs(20))
            .every(Duration::from_millis(100))
            .until(|| match self.sessions_left() {
                0 => Poll::Ready(()),
                left => Poll::Pending(format!("{left} sessions")),
            })
            .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", self.operator.log()));
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

/// `sha256:0123456789ab`: how the plugin shows a digest.
fn short(digest: &str) -> String {
    digest.chars().take("sha256:".len() + 12).collect()
}

/// Every node command, answered by the operator: `node ls`/`show`/`wait` show the phase and the
/// booted digest the operator found over SSH; `node save` shows the operator's progress and result
/// (skopeo reads the same digest); `node reboot` makes the operator reboot the node over SSH;
/// `node boot` moves its image; `node remove` deletes it.
#[test]
fn node_commands_show_what_the_operator_does() {
    let _serial = serial();
    let mut lab = Lab::start("walt-nodes");
    let booted = format!("debian@{}", short(&lab.base_digest));

    let table = lab.ok(&["node", "ls"]);
    let row = table
        .lines()
        .find(|line| line.starts_with("vnode "))
        .unwrap_or_else(|| panic!("no vnode row:\n{table}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &columns[..4],
        ["vnode", "pc-x86-64", "debian", "Ready"],
        "{table}"
    );
    let wide = lab.ok(&["node", "ls", "-o", "wide"]);
    assert!(
        wide.contains(&format!("   {}   ", lab.node.address())) && wide.contains(&booted),
        "the address and the booted digest the operator recorded:\n{wide}"
    );
    let page = lab.ok(&["node", "show", "vnode"]);
    assert!(page.contains(&format!("Booted:      {booted}\n")), "{page}");
    assert!(page.contains("Phase:       Ready\n"), "{page}");
    let waited = lab.ok(&["node", "wait", "vnode", "--timeout", "30s"]);
    assert!(waited.contains("vnode: Ready"), "{waited}");

    // node save: the operator reads the node's changes over SSH and pushes a new image.
    lab.node
        .run("echo saved-by-the-plugin > /etc/plugin-save; rm /etc/group")
        .expect("change files on the node");
    let saved = lab.ok(&["node", "save", "vnode", "debian-v2"]);
    let pushed = lab.registry_digest(&format!("lab/{}/debian-v2:latest", lab.namespace));
    assert!(
        saved.contains(&format!("Saved vnode as debian-v2: {pushed}\n")),
        "the digest shown is the one in the registry ({pushed}):\n{saved}"
    );
    assert!(
        saved.contains("changes: 1 added, 0 modified, 1 deleted"),
        "{saved}"
    );
    assert!(
        saved.contains(&format!("on top of debian@{}", short(&lab.base_digest))),
        "{saved}"
    );
    lab.wait_jsonpath("image.walt.dev/debian-v2", "{.status.digest}", &pushed);
    let images = lab.ok(&["image", "ls"]);
    assert!(
        images.lines().any(|l| l.starts_with("debian-v2 "))
            && images.lines().any(|l| l.starts_with("debian ")),
        "{images}"
    );

    // node reboot: the operator reboots the node over SSH (the fixture's node stops) once. A
    // `node wait` right after it does not take the Ready of before the reboot for an answer (the
    // node does not come back here: the fixture has no boot loader, so it times out saying so).
    let rebooted = lab.ok(&["node", "reboot", "vnode"]);
    assert!(rebooted.contains("vnode: reboot requested."), "{rebooted}");
    let refused = lab.refused(&["node", "wait", "vnode", "--timeout", "5s"]);
    assert!(
        refused.contains("after 5s waiting for vnode (")
            && (refused.contains("reboot requested") || refused.contains("Rebooting")),
        "{refused}"
    );
    wait_for(
        "the operator to reboot the node (its processes to stop)",
        Duration::from_secs(30),
        || !lab.node.is_running(),
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", lab.operator.log()));
    let requested = lab.jsonpath(
        "node.walt.dev/vnode",
        "{.metadata.annotations.walt\\.dev/reboot-requested-at}",
    );
    lab.wait_jsonpath(
        "node.walt.dev/vnode",
        "{.metadata.annotations.walt\\.dev/reboot-handled-at}",
        &requested,
    );
    let page = lab.ok(&["node", "show", "vnode"]);
    assert!(
        page.contains("Rebooting"),
        "the operator's Event is shown:\n{page}"
    );

    // node boot: the Node's image moves to the saved one.
    let boot = lab.ok(&["node", "boot", "vnode", "debian-v2"]);
    assert!(boot.contains("vnode: will boot debian-v2"), "{boot}");
    assert_eq!(lab.jsonpath("node.walt.dev/vnode", "{.spec.image}"), "debian-v2");

    // node remove: gone for the operator too (its finalizer, if any, ran).
    let removed = lab.ok(&["node", "remove", "vnode"]);
    assert!(removed.contains("vnode: removed."), "{removed}");
    wait_for("the Node to be deleted", Duration::from_secs(30), || {
        lab.jsonpath("node.walt.dev/vnode", "{.metadata.name}").is_empty()
    })
    .unwrap();
    let out = lab.command(&["node", "ls"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No nodes in namespace"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The upstream image `image clone` copies, kept in the lab's catalog (`<prefix>/<--catalog-namespace>/`):
/// in the lab registry a tenant clones only from its own path and the catalog.
const CATALOG_IMAGE: &str = "lab/walt-catalog-none/busybox:arm64";

/// Every image command, answered by the operator: `image clone` waits while the operator copies the
/// image into the lab registry (skopeo reads the source's digest there), `image ls`/`show` show
/// what it resolved, `duplicate` and `rename` make the operator copy the image under a new name,
/// `rm` deletes it, and an image a node boots is refused naming the node.
#[test]
fn image_commands_show_what_the_operator_does() {
    let _serial = serial();
    let lab = Lab::start("walt-images");
    let upstream = OciLayout::busybox(Arch::Arm64)
        .expect("arm64 busybox image")
        .push("base", &lab.registry, CATALOG_IMAGE)
        .expect("push the upstream image");
    let source = lab.registry.reference(CATALOG_IMAGE);

    let cloned = lab.ok(&["image", "clone", &source, "rpi-busybox"]);
    assert!(
        cloned.contains(&format!("Image rpi-busybox is ready: {upstream} (arm64")),
        "{cloned}"
    );
    assert_eq!(
        lab.registry_digest(&format!("lab/{}/rpi-busybox:latest", lab.namespace)),
        upstream,
        "the clone keeps the source's digest"
    );
    let table = lab.ok(&["image", "ls"]);
    let row = table
        .lines()
        .find(|line| line.starts_with("rpi-busybox "))
        .unwrap_or_else(|| panic!("no rpi-busybox row:\n{table}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&columns[..3], ["rpi-busybox", "True", "arm64"], "{table}");
    let page = lab.ok(&["image", "show", "rpi-busybox"]);
    assert!(page.contains(&format!("Digest:      {upstream}\n")), "{page}");
    assert!(page.contains(&format!("Source:      {source}\n")), "{page}");
    assert!(page.contains("Platform:    linux/arm64\n"), "{page}");
    assert!(page.contains("Booted by:   no node\n"), "{page}");

    let duplicated = lab.ok(&["image", "duplicate", "rpi-busybox", "copy"]);
    assert!(
        duplicated.contains(&format!("Duplicated rpi-busybox as copy ({})", short(&upstream))),
        "{duplicated}"
    );
    assert_eq!(
        lab.registry_digest(&format!("lab/{}/copy:latest", lab.namespace)),
        upstream
    );
    let renamed = lab.ok(&["image", "rename", "copy", "renamed"]);
    assert!(renamed.contains("Renamed copy to renamed."), "{renamed}");
    assert!(lab.jsonpath("image.walt.dev/copy", "{.metadata.name}").is_empty());
    lab.wait_jsonpath("image.walt.dev/renamed", "{.status.digest}", &upstream);
    let removed = lab.ok(&["image", "rm", "renamed"]);
    assert!(removed.contains("renamed: removed."), "{removed}");

    // `debian` is booted by vnode: refused, naming the node and what to do.
    let refused = lab.refused(&["image", "rm", "debian"]);
    assert!(refused.contains("vnode"), "{refused}");
    assert!(
        !lab.jsonpath("image.walt.dev/debian", "{.metadata.name}")
            .is_empty(),
        "the refused image is still there"
    );
}

/// WalT's `node acquire` / `node release` on a device the lab lent to the namespace (the Lab's sshd
/// node, held by the node `vnode`): one node per device; released, another node acquires it and the
/// operator reaches the real node through it.
#[test]
fn device_ls_acquire_and_release() {
    let _serial = serial();
    let lab = Lab::start("walt-devices");
    let device = format!("{}-pc", lab.namespace);
    let listed = lab.ok(&["device", "ls"]);
    let row = listed
        .lines()
        .find(|line| line.starts_with(&device))
        .unwrap_or_else(|| panic!("no {device} row:\n{listed}"));
    assert!(
        row.contains(&format!("{}:22", lab.node.address())) && row.contains("vnode"),
        "the device, its address and the node holding it:\n{listed}"
    );
    let held = lab.refused(&["node", "acquire", &device, "--as", "second"]);
    assert!(held.contains("kubectl walt node release vnode"), "{held}");
    let released = lab.ok(&["node", "release", "vnode"]);
    assert!(
        released.contains(&format!("released the device {device}")),
        "{released}"
    );
    lab.wait_jsonpath("node.walt.dev/vnode", "{.metadata.name}", "");
    let acquired = lab.ok(&["node", "acquire", &device, "--as", "second", "--image", "debian"]);
    assert!(
        acquired.contains("Node second created on the device"),
        "{acquired}"
    );
    let waited = lab.ok(&["node", "wait", "second", "--timeout", "60s"]);
    assert!(waited.contains("second: Ready"), "{waited}");
    assert_eq!(lab.jsonpath("node.walt.dev/second", "{.status.device}"), device);
    let listed = lab.ok(&["device", "ls"]);
    assert!(
        listed.contains("second"),
        "the device is held by the new node:\n{listed}"
    );
}
