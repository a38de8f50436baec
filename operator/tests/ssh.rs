//! Component tests of the `ssh` module against real OpenSSH nodes in network namespaces
//! (`walt_tests::sshnode`), checked with OpenSSH's own `ssh` and `sftp`. Run as root.

// Test helpers panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{self, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use walt_operator::ssh::SshError;
use walt_operator::ssh::client::{
    self, BoxedStream, ClientConfig, Connector, HostKeyPolicy, NodeClient, NodeTarget, Transport,
};
use walt_operator::ssh::export::{self, ExportOptions, Progress};
use walt_operator::ssh::gateway::{Authorization, Authorizations, Gateway, GatewayConfig};
use walt_tests::sshnode::{NodeRoot, SshNode, SshNodeBuilder};

fn connector(node: &SshNode) -> Connector {
    let lab = node.lab_netns().to_owned();
    Arc::new(move |host: String, port: u16| {
        let lab = lab.clone();
        Box::pin(async move {
            let address: SocketAddr = format!("{host}:{port}").parse().map_err(io::Error::other)?;
            let stream =
                tokio::task::spawn_blocking(move || walt_tests::sshnode::connect_in_netns(&lab, address))
                    .await
                    .map_err(io::Error::other)??;
            stream.set_nonblocking(true)?;
            Ok(Box::new(tokio::net::TcpStream::from_std(stream)?) as BoxedStream)
        })
    })
}

fn target(node: &SshNode) -> NodeTarget {
    format!("root@{}:22", node.address()).parse().unwrap()
}

fn config(node: &SshNode, policy: HostKeyPolicy) -> ClientConfig {
    let mut config = ClientConfig::new(client::load_key_file(&node.client_key()).unwrap(), policy);
    config.transport = Transport::Connector(connector(node));
    config
}

fn pinned(node: &SshNode) -> HostKeyPolicy {
    HostKeyPolicy::Pinned(client::parse_public_key(node.host_public_key()).unwrap())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_runs_commands_and_reports_connection_errors() {
    let node = SshNode::busybox().unwrap();
    let work = tempfile::tempdir().unwrap();

    // Recorded on first contact, then enforced.
    let known_hosts = work.path().join("known_hosts");
    let client = NodeClient::connect(
        &target(&node),
        &config(&node, HostKeyPolicy::KnownHostsFile(known_hosts.clone())),
    )
    .await
    .unwrap();
    let output = client.exec("echo hello; echo oops >&2; exit 3").await.unwrap();
    assert_eq!(output.stdout, b"hello\n");
    assert_eq!(output.stderr, b"oops\n");
    assert_eq!(output.exit_status, Some(3));
    let recorded = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(
        recorded.starts_with(&format!("{} ssh-ed25519 ", node.address())),
        "{recorded}"
    );
    client.close().await;

    // Wrong key: refused, and the error names the key type.
    let other = keygen(work.path(), "other");
    let mut wrong = config(&node, pinned(&node));
    wrong.key = Arc::new(client::load_key_file(&other).unwrap());
    let error = NodeClient::connect(&target(&node), &wrong).await.unwrap_err();
    assert!(matches!(error, SshError::AuthRefused { .. }), "{error}");
    assert!(error.to_string().contains("ssh-ed25519"), "{error}");

    // Host key changed (the node was reinstalled, or someone impersonates it): both fingerprints.
    let old_key = node.host_public_key().to_owned();
    let old = client::fingerprint(&client::parse_public_key(&old_key).unwrap());
    drop(node);
    let mut node = SshNode::busybox().unwrap();
    std::fs::write(&known_hosts, format!("{} {old_key}\n", node.address())).unwrap();
    let error = NodeClient::connect(
        &target(&node),
        &config(&node, HostKeyPolicy::KnownHostsFile(known_hosts.clone())),
    )
    .await
    .unwrap_err();
    let new = client::fingerprint(&client::parse_public_key(node.host_public_key()).unwrap());
    match &error {
        SshError::HostKeyMismatch { .. } => {
            let text = error.to_string();
            assert!(text.contains(&old) && text.contains(&new), "{text}");
        }
        other => panic!("expected a host key mismatch, got: {other}"),
    }

    // Nothing listening: refused.
    let mut refused = config(&node, pinned(&node));
    refused.connect_timeout = Duration::from_secs(3);
    let closed: NodeTarget = format!("root@{}:2299", node.address()).parse().unwrap();
    let error = NodeClient::connect(&closed, &refused).await.unwrap_err();
    assert!(matches!(error, SshError::Refused { .. }), "{error}");

    // Node dead: unreachable or refused, never a hang.
    node.kill();
    let error = NodeClient::connect(&target(&node), &refused).await.unwrap_err();
    assert!(
        matches!(error, SshError::Refused { .. } | SshError::Unreachable { .. }),
        "{error}"
    );
}

struct GatewayUnderTest {
    address: SocketAddr,
    authorizations: Authorizations,
    user_key: PathBuf,
    known_hosts: PathBuf,
    _task: tokio::task::JoinHandle<Result<(), SshError>>,
}

async fn start_gateway(node: &SshNode, work: &Path, ttl: Duration) -> GatewayUnderTest {
    let host_key = keygen(work, "gateway_host");
    let user_key = keygen(work, "user");
    let mut config = GatewayConfig::new(
        client::load_key_file(&host_key).unwrap(),
        client::load_key_file(&node.client_key()).unwrap(),
    );
    config.node_transport = Transport::Connector(connector(node));
    config.idle_timeout = Duration::from_mins(1);
    let authorizations = Authorizations::new();
    authorizations.add(Authorization {
        session_id: "session-1".into(),
        node: target(node),
        node_host_key: pinned(node),
        public_key: client::parse_public_key(
            &std::fs::read_to_string(user_key.with_extension("pub")).unwrap(),
        )
        .unwrap(),
        expires_at: SystemTime::now() + ttl,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let known_hosts = work.join("gateway_known_hosts");
    let public = std::fs::read_to_string(host_key.with_extension("pub")).unwrap();
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{} {public}", address.port())).unwrap();
    let task = tokio::spawn(Gateway::new(config, authorizations.clone()).serve(listener));
    GatewayUnderTest {
        address,
        authorizations,
        user_key,
        known_hosts,
        _task: task,
    }
}

impl GatewayUnderTest {
    fn ssh(&self, user: &str) -> Command {
        let mut command = Command::new("ssh");
        command
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .args(["-o", "LogLevel=ERROR", "-i"])
            .arg(&self.user_key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-p", &self.address.port().to_string()])
            .arg(format!("{user}@127.0.0.1"));
        command
    }
}

fn run(mut command: Command) -> std::process::Output {
    command.stdin(Stdio::null());
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_relays_openssh_sessions_to_the_node_only() {
    let node = SshNode::busybox().unwrap();
    let work = tempfile::tempdir().unwrap();
    let gateway = start_gateway(&node, work.path(), Duration::from_hours(1)).await;

    tokio::task::spawn_blocking(move || {
        // Commands and exit codes.
        let mut command = gateway.ssh("session-1");
        command.arg("cat /etc/hostname; exit 42");
        let output = run(command);
        assert_eq!(
            output.status.code(),
            Some(42),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), "walt-busybox-node\n");

        // Large output, stdin relayed too.
        let mut command = gateway.ssh("session-1");
        command.arg("head -c 33554432 /dev/zero | md5sum; wc -c");
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = command.spawn().unwrap();
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(&vec![7u8; 5_000_000]).unwrap();
        }
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("58f06dd588d8ffb3beb46ada6309436b"), "{text}");
        assert!(text.contains("5000000"), "{text}");
        let mut command = gateway.ssh("session-1");
        command.arg("head -c 67108864 /dev/zero");
        let output = run(command);
        assert_eq!(output.stdout.len(), 67_108_864);

        // A PTY session: a terminal on the node, its size relayed.
        let mut command = gateway.ssh("session-1");
        command.args(["-tt", "tty; stty size; exit 5"]);
        let output = run(command);
        let text = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(5), "{text}");
        assert!(text.contains("/dev/pts/"), "{text}");

        // Killed by a signal: exit-signal relayed (ssh exits 255 and says so).
        let mut command = gateway.ssh("session-1");
        command.arg("kill -KILL $$");
        let output = run(command);
        assert_ne!(output.status.code(), Some(0));

        // sftp: upload then download through the gateway.
        let local = work.path().join("payload");
        std::fs::write(&local, vec![42u8; 300_000]).unwrap();
        let batch = work.path().join("batch");
        std::fs::write(
            &batch,
            format!(
                "put {} /root/payload\nget /root/payload {}\n",
                local.display(),
                work.path().join("back").display()
            ),
        )
        .unwrap();
        let output = Command::new("sftp")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-i",
            ])
            .arg(&gateway.user_key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", gateway.known_hosts.display()))
            .args(["-P", &gateway.address.port().to_string(), "-b"])
            .arg(&batch)
            .arg("session-1@127.0.0.1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(std::fs::read(work.path().join("back")).unwrap().len(), 300_000);
        assert_eq!(node.run("wc -c < /root/payload").unwrap().trim(), "300000");

        // Port forwards: to the node itself yes, elsewhere no.
        let mut command = gateway.ssh("session-1");
        command.args(["-W", &format!("{}:22", node.address())]);
        let output = run(command);
        assert!(
            String::from_utf8_lossy(&output.stdout).starts_with("SSH-2.0-"),
            "{output:?}"
        );
        let mut command = gateway.ssh("session-1");
        command.args(["-W", "10.200.250.9:22"]);
        let output = run(command);
        assert!(!String::from_utf8_lossy(&output.stdout).starts_with("SSH-2.0-"));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("forwarding failed"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );

        // Wrong session name, then a removed session: refused.
        let output = run({
            let mut command = gateway.ssh("other-session");
            command.arg("true");
            command
        });
        assert_eq!(output.status.code(), Some(255));
        assert!(String::from_utf8_lossy(&output.stderr).contains("Permission denied"));
        gateway.authorizations.remove("session-1");
        let output = run({
            let mut command = gateway.ssh("session-1");
            command.arg("true");
            command
        });
        assert_eq!(output.status.code(), Some(255));
        drop(node);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_refuses_expired_sessions_and_relays_our_client() {
    let node = SshNode::busybox().unwrap();
    let work = tempfile::tempdir().unwrap();
    let gateway = start_gateway(&node, work.path(), Duration::from_secs(4)).await;

    // Our own client through the gateway.
    let gateway_target: NodeTarget = format!("session-1@127.0.0.1:{}", gateway.address.port())
        .parse()
        .unwrap();
    let user_config = ClientConfig::new(
        client::load_key_file(&gateway.user_key).unwrap(),
        HostKeyPolicy::KnownHostsFile(gateway.known_hosts.clone()),
    );
    let client = NodeClient::connect(&gateway_target, &user_config).await.unwrap();
    let output = client.exec("echo through; exit 9").await.unwrap();
    assert_eq!(output.stdout, b"through\n");
    assert_eq!(output.exit_status, Some(9));

    // Once expired: the live connection is closed, new ones are refused.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(client.exec("true").await.is_err() || client.is_closed());
    let error = NodeClient::connect(&gateway_target, &user_config)
        .await
        .unwrap_err();
    assert!(matches!(error, SshError::AuthRefused { .. }), "{error}");
}

fn change_set(bytes: &[u8]) -> BTreeMap<String, (tar::EntryType, Vec<u8>, bool)> {
    let mut archive = tar::Archive::new(bytes);
    let mut entries = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_owned();
        let mut opaque = false;
        if let Some(extensions) = entry.pax_extensions().unwrap() {
            for extension in extensions {
                let extension = extension.unwrap();
                if extension.key().unwrap() == "SCHILY.xattr.trusted.overlay.opaque" {
                    opaque = extension.value_bytes() == b"y";
                }
            }
        }
        let kind = entry.header().entry_type();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        entries.insert(name, (kind, data, opaque));
    }
    entries
}

const CHANGES: &str = "set -e
mkdir -p /srv/new/deep && echo created > /srv/new/deep/file
echo modified >> /etc/hostname
rm /etc/group
rm -rf /etc/recreated && mkdir /etc/recreated && echo fresh > /etc/recreated/only
mkdir -p /var/log && echo noise > /var/log/messages
ln -s /srv/new/deep/file /srv/link
";

async fn save_change_set(node: &SshNode) -> Vec<u8> {
    let client = NodeClient::connect(&target(node), &config(node, pinned(node)))
        .await
        .unwrap();
    let plan = export::plan(&client, &ExportOptions::default()).await.unwrap();
    let progress = Arc::new(Progress::default());
    let reader = export::start(&client, &plan, progress.clone()).await.unwrap();
    let target = target(node);
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        export::filter_change_set(reader, &mut out, &plan, &target, &progress).unwrap();
        out
    })
    .await
    .unwrap()
}

fn check_change_set(entries: &BTreeMap<String, (tar::EntryType, Vec<u8>, bool)>) {
    let names: Vec<&String> = entries.keys().collect();
    assert_eq!(entries["srv/new/deep/file"].1, b"created\n", "{names:?}");
    assert!(String::from_utf8_lossy(&entries["etc/hostname"].1).ends_with("modified\n"));
    assert_eq!(
        entries["etc/group"].0,
        tar::EntryType::Char,
        "deletion kept as a whiteout"
    );
    assert!(
        entries["etc/recreated"].2,
        "recreated directory is opaque: {names:?}"
    );
    assert_eq!(entries["etc/recreated/only"].1, b"fresh\n");
    assert_eq!(entries["srv/link"].0, tar::EntryType::Symlink);
    assert!(!entries.contains_key("var/log/messages"), "WalT exclusion /log/");
    assert!(
        !entries.contains_key("etc/boot-noise"),
        "boot-time change left out: {names:?}"
    );
    assert!(!entries["etc"].2, "/etc is not opaque");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_save_change_set_from_a_busybox_node() {
    let node = SshNodeBuilder::new(NodeRoot::Busybox)
        .boot_script(
            "mkdir -p /etc/recreated && echo old > /etc/recreated/gone && echo boot > /etc/boot-noise",
        )
        .start()
        .unwrap();
    node.run(CHANGES).unwrap();
    let entries = change_set(&save_change_set(&node).await);
    check_change_set(&entries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_save_change_set_from_a_gnu_tar_node() {
    let node = SshNodeBuilder::new(NodeRoot::HostRoot)
        .boot_script("echo boot > /etc/boot-noise")
        .start()
        .unwrap();
    // /etc/recreated must exist in the lower for the directory to become opaque: use one that does.
    node.run(&CHANGES.replace("/etc/recreated", "/etc/apt/apt.conf.d"))
        .unwrap();
    node.run("setfattr -n user.walt -v kept /srv/new/deep/file")
        .unwrap();
    let bytes = save_change_set(&node).await;
    let entries = change_set(&bytes);
    let mut renamed: BTreeMap<_, _> = entries
        .iter()
        .map(|(k, v)| (k.replace("etc/apt/apt.conf.d", "etc/recreated"), v.clone()))
        .collect();
    renamed
        .entry("etc/recreated/only".into())
        .or_insert_with(|| (tar::EntryType::Regular, b"fresh\n".to_vec(), false));
    check_change_set(&renamed);
    // GNU tar keeps other xattrs.
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("SCHILY.xattr.user.walt=kept"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_save_fails_and_says_so() {
    let mut node = SshNode::busybox().unwrap();
    node.run("head -c 400000000 /dev/urandom > /root/big").unwrap();
    let client = NodeClient::connect(&target(&node), &config(&node, pinned(&node)))
        .await
        .unwrap();
    let plan = export::plan(&client, &ExportOptions::default()).await.unwrap();
    let progress = Arc::new(Progress::default());
    let reader = export::start(&client, &plan, progress.clone()).await.unwrap();
    let target = target(&node);
    let watched = progress.clone();
    let saving = tokio::task::spawn_blocking(move || {
        // A slow consumer, like a registry upload.
        let slow = SlowReader { inner: reader };
        export::filter_change_set(slow, io::sink(), &plan, &target, &watched)
    });
    while progress.bytes.load(std::sync::atomic::Ordering::Relaxed) < 20_000_000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.kill();
    let error = saving.await.unwrap().unwrap_err();
    assert!(error.to_string().contains("dropped"), "{error}");
}

struct SlowReader<R> {
    inner: R,
}

impl<R: io::Read> io::Read for SlowReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::thread::sleep(Duration::from_millis(2));
        self.inner.read(buf)
    }
}

#[test]
fn save_command_writes_the_change_set_through_a_proxy_command() {
    let node = SshNodeBuilder::new(NodeRoot::Busybox)
        .boot_script(
            "mkdir -p /etc/recreated && echo old > /etc/recreated/gone && echo boot > /etc/boot-noise",
        )
        .start()
        .unwrap();
    node.run(CHANGES).unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("changes.tar");
    let output = Command::new(env!("CARGO_BIN_EXE_walt-operator"))
        .args([
            "save",
            "--node",
            &format!("root@{}", node.address()),
            "--identity",
        ])
        .arg(node.client_key())
        .arg("--known-hosts")
        .arg(node.known_hosts())
        .args(["--proxy-command", &node.proxy_command(), "--change-set"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("busybox tar"), "{stderr}");
    assert!(stderr.contains("1 deleted"), "{stderr}");
    check_change_set(&change_set(&std::fs::read(&out).unwrap()));

    // Bad input: a clear error.
    let output = Command::new(env!("CARGO_BIN_EXE_walt-operator"))
        .args([
            "save",
            "--node",
            "nobody",
            "--identity",
            "/nonexistent",
            "--change-set",
            "-",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("USER@HOST"));
}

#[test]
fn save_command_pushes_the_node_changes_on_top_of_the_base_image() {
    use walt_tests::images::{Arch, OciLayout, skopeo_umoci_unpack};
    let registry = walt_tests::registry::Registry::start().expect("registry");
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox image");
    layout
        .push("base", &registry, "lab/busybox:base")
        .expect("push the base");
    let node = SshNode::busybox().unwrap();
    node.run(
        "set -e
mkdir -p /srv && echo created > /srv/created
echo 'walt:x:1000:1000::/:/bin/sh' >> /etc/passwd
rm /etc/group",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_walt-operator"))
        .args([
            "save",
            "--node",
            &format!("root@{}", node.address()),
            "--identity",
        ])
        .arg(node.client_key())
        .arg("--known-hosts")
        .arg(node.known_hosts())
        .args(["--proxy-command", &node.proxy_command()])
        .args(["--base", &registry.reference("lab/busybox:base")])
        .args(["--to", &registry.reference("lab/saved:v1")])
        .args(["--insecure-registry", &registry.host()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("1 deleted"), "{stderr}");
    let digest = stdout.trim();
    assert!(digest.starts_with("sha256:"), "stdout: {stdout}");
    assert!(stderr.contains(digest), "{stderr}");

    // Independent check: skopeo copies the tag, umoci unpacks it.
    let work = tempfile::tempdir().unwrap();
    let rootfs = skopeo_umoci_unpack(&registry, "lab/saved:v1", work.path()).expect("unpack");
    assert_eq!(std::fs::read(rootfs.join("srv/created")).unwrap(), b"created\n");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap(),
        "root:x:0:0:root:/root:/bin/sh\nwalt:x:1000:1000::/:/bin/sh\n"
    );
    assert!(!rootfs.join("etc/group").exists(), "deleted file is gone");
    assert!(rootfs.join("etc/inittab").is_file(), "base files stay");
    assert!(rootfs.join("bin/busybox").is_file(), "base files stay");
    // The tag points at the digest the command printed.
    let pinned_work = tempfile::tempdir().unwrap();
    let pinned = skopeo_umoci_unpack(&registry, &format!("lab/saved@{digest}"), pinned_work.path())
        .expect("unpack by digest");
    assert!(pinned.join("srv/created").is_file());
}
