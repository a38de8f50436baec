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
use walt_tests::bounds::assert_bounded;
use walt_tests::sshnode::{NodeRoot, SshNode, SshNodeBuilder, keygen};
use walt_tests::wait::Wait;

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
        openssh(&self.user_key, &self.known_hosts, self.address.port(), user)
    }
}

/// OpenSSH's `ssh` to `user@127.0.0.1:port` with one identity, the host key checked against
/// `known_hosts`, no user configuration.
fn openssh(identity: &Path, known_hosts: &Path, port: u16, user: &str) -> Command {
    let mut command = Command::new("ssh");
    command
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR", "-i"])
        .arg(identity)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-p", &port.to_string()])
        .arg(format!("{user}@127.0.0.1"));
    command
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

/// Clock skew between node and operator: the ready filter compares the node's file times with the
/// node's own ready marker, never with the operator's clock. On a node whose clock runs 10 minutes
/// ahead of the operator's, then 10 minutes behind, what changed before the marker is left out and what
/// changed after it is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_clock_minutes_off_keeps_the_ready_filter_right() {
    let node = SshNode::busybox().unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let now = i64::try_from(now).unwrap();
    for skew in [600_i64, -600] {
        let at = |offset: i64| now + skew + offset;
        node.run(&format!(
            "set -e\nmkdir -p /srv\necho noise > /srv/noise{skew}\ntouch -d @{} /srv/noise{skew}\n\
             touch -d @{} /run/uptime-ready\necho work > /srv/work{skew}\ntouch -d @{} /srv/work{skew}",
            at(-10),
            at(0),
            at(10)
        ))
        .unwrap();
        let entries = change_set(&save_change_set(&node).await);
        let names: Vec<&String> = entries.keys().collect();
        assert!(
            entries.contains_key(&format!("srv/work{skew}")),
            "skew {skew} s: a change after the ready marker is saved: {names:?}"
        );
        assert!(
            !entries.contains_key(&format!("srv/noise{skew}")),
            "skew {skew} s: a change before the ready marker is left out: {names:?}"
        );
    }
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

/// A node that hangs or floods costs a bounded time and memory, says why, and leaves the
/// connection usable: a command that never returns is abandoned at the command timeout, one that
/// floods is stopped at the output limit, and a save whose tar goes silent mid-stream fails at the
/// stall timeout (the reader ends with an error, never a clean end of file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_or_flooding_node_is_bounded_and_says_why() {
    let node = SshNode::busybox().unwrap();
    let mut config = config(&node, pinned(&node));
    config.bounds = walt_operator::ssh::ExecBounds {
        command_timeout: Duration::from_secs(1),
        output_limit: 64 << 10,
        stall_timeout: Duration::from_secs(1),
    };
    let client = NodeClient::connect(&target(&node), &config).await.unwrap();

    let started = std::time::Instant::now();
    let error = client.exec("sleep 3600").await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(error, SshError::CommandTimedOut { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("did not finish `sleep 3600` within 1 s"),
        "{error}"
    );
    assert!(took < Duration::from_secs(3), "abandoned after {took:?}");

    let error = client.exec("exec yes flooding").await.unwrap_err();
    assert!(matches!(error, SshError::OutputTooLarge { .. }), "{error}");
    assert!(error.to_string().contains("more than 65536 bytes"), "{error}");

    // The connection is still good for the next command.
    let output = client.exec("echo still-here").await.unwrap();
    assert_eq!(output.stdout, b"still-here\n");

    // A tar that sends a little, then nothing while its channel stays open.
    let mut plan = export::plan(&client, &ExportOptions::default()).await.unwrap();
    plan.command = "head -c 5000 /dev/zero; exec sleep 3600".into();
    let progress = Arc::new(Progress::default());
    let mut reader = export::start(&client, &plan, progress).await.unwrap();
    let started = std::time::Instant::now();
    let read = tokio::task::spawn_blocking(move || {
        let mut sink = Vec::new();
        reader.read_to_end(&mut sink).map(|_| sink.len())
    })
    .await
    .unwrap();
    let error = read.expect_err("a stalled transfer is an error, not an end of file");
    assert!(
        error
            .to_string()
            .contains("sent nothing for 1 s while sending its changes"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    client.close().await;
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

// ---------------------------------------------------------------------------
// Virtual nodes (`walt-operator vnode`).

/// The binary under test (`WALT_OPERATOR_BIN` overrides Cargo's, e.g. to a private copy).
fn walt_operator() -> String {
    std::env::var("WALT_OPERATOR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_walt-operator").to_string())
}

/// A running `walt-operator vnode`, stopped with SIGTERM (then SIGKILL) when dropped.
struct Vnode {
    child: std::process::Child,
    port: u16,
    host_key: String,
    log: PathBuf,
}

impl Vnode {
    fn start(image: &str, name: &str, registry: &str, work: &Path, persist: Option<&Path>) -> Vnode {
        let log = work.join(format!("vnode-{name}.log"));
        let mut command = Command::new(walt_operator());
        command
            .args(["vnode", "--image", image, "--name", name, "--authorized-keys"])
            .arg(work.join("authorized_keys"))
            .args(["--listen", "127.0.0.1:0", "--insecure-registry", registry])
            .args(["--shutdown-timeout", "5"])
            .arg("--cache-dir")
            .arg(work.join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(persist) = persist {
            command.arg("--persist").arg(persist);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let line = ready.recv_timeout(Duration::from_mins(2)).unwrap_or_else(|_| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vnode {name} did not get ready; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        assert!(line.starts_with("vnode ready:"), "{line}");
        let address = line
            .split(" listening on ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let port = address.rsplit(':').next().unwrap().parse().unwrap();
        let host_key = line.split(" host key ").nth(1).unwrap().trim().to_owned();
        Vnode {
            child,
            port,
            host_key,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn target(&self) -> String {
        format!("root@127.0.0.1:{}", self.port)
    }

    /// OpenSSH's `ssh` to the node, host key checked.
    fn ssh(&self, work: &Path) -> Command {
        let known_hosts = work.join(format!("known_hosts-{}", self.port));
        std::fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{} {}\n", self.port, self.host_key),
        )
        .unwrap();
        openssh(&work.join("user"), &known_hosts, self.port, "root")
    }

    /// Runs `script` in the node over OpenSSH; returns the output (panics on failure).
    fn run(&self, work: &Path, script: &str) -> String {
        let output = run({
            let mut command = self.ssh(work);
            command.arg(script);
            command
        });
        assert!(
            output.status.success(),
            "`{script}` failed on the vnode: {}\n{}\nvnode log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// SIGTERM, then waits (SIGKILL after 60 s); returns the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let exited = Wait::new("the vnode to exit after SIGTERM", Duration::from_mins(1))
            .every(Duration::from_millis(100))
            .until(|| self.child.try_wait().unwrap());
        exited.unwrap_or_else(|_| {
            let _ = self.child.kill();
            self.child.wait().unwrap()
        })
    }
}

impl Drop for Vnode {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// A user key pair in `work` (`user`, `user.pub`) authorized in `work/authorized_keys`.
fn authorize_user(work: &Path) -> PathBuf {
    let key = keygen(work, "user");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    std::fs::write(work.join("authorized_keys"), format!("# the lab\n{public}")).unwrap();
    key
}

/// Mount points in the host's mount table under `dir` (nothing of a node may stay mounted).
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|mount_point| mount_point.starts_with(&*dir.to_string_lossy()))
        .map(str::to_owned)
        .collect()
}

/// `walt-operator save` of a vnode with the defaults (upper dir, ready marker, exclusions).
fn save_vnode(node: &Vnode, work: &Path, base: &str, to: &str, registry: &str) -> std::process::Output {
    let mut command = Command::new(walt_operator());
    command
        .args(["save", "--node", &node.target(), "--identity"])
        .arg(work.join("user"))
        .args(["--host-key", &node.host_key, "--base", base, "--to", to])
        .args(["--insecure-registry", registry]);
    run(command)
}

#[test]
fn arm64_vnode_serves_ssh_and_its_changes_save_into_a_new_image() {
    use walt_tests::images::{Arch, OciLayout, skopeo_inspect_config, skopeo_umoci_unpack};
    let registry = walt_tests::registry::Registry::start().expect("registry");
    let layout = OciLayout::busybox(Arch::Arm64).expect("arm64 busybox image");
    layout
        .push("base", &registry, "lab/busybox-arm64:base")
        .expect("push the base");
    let base = registry.reference("lab/busybox-arm64:base");
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    authorize_user(work);
    let persist = work.join("persist");
    let mut node = Vnode::start(&base, "vn-arm", &registry.host(), work, Some(&persist));
    assert!(node.log().contains("through qemu-user"), "{}", node.log());

    // Commands, output and exit codes, through OpenSSH.
    assert_eq!(node.run(work, "uname -m; hostname").trim(), "aarch64\nvn-arm");
    assert_bounded(&node.run(work, "cat /proc/$$/status"), "the emulated SSH session");
    let output = run({
        let mut command = node.ssh(work);
        command.arg("echo out; echo err >&2; exit 3");
        command
    });
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(output.stdout, b"out\n");
    assert_eq!(output.stderr, b"err\n");
    // Like a WalT node: booted marker, upper dir at WalT's path, /persist.
    assert_eq!(
        node.run(
            work,
            "test -s /run/uptime-ready && test -d /run/walt/rootfs/mnt/fs_rw && echo ok"
        )
        .trim(),
        "ok"
    );
    // Large output and input through pipes.
    let big = node.run(work, "head -c 3000000 /dev/zero | tr '\\0' x");
    assert_eq!(big.len(), 3_000_000);
    let mut counting = node.ssh(work);
    counting.arg("wc -c").stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = counting.spawn().unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![b'y'; 1_000_000]).unwrap();
    }
    let counted = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&counted.stdout).trim(), "1000000");

    // Changes: created, modified, deleted, a directory deleted and recreated; /persist.
    node.run(
        work,
        "set -e
mkdir -p /srv && echo created > /srv/created
echo 'walt:x:1000:1000::/:/bin/sh' >> /etc/passwd
rm /etc/group
rm -r /usr/sbin && mkdir /usr/sbin && echo only > /usr/sbin/only
echo kept > /persist/file",
    );
    assert_eq!(std::fs::read(persist.join("file")).unwrap(), b"kept\n");

    // Node save with the defaults finds the changes at WalT's upper dir path.
    let saved = registry.reference("lab/busybox-arm64:saved");
    let output = save_vnode(&node, work, &base, &saved, &registry.host());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}\nvnode log:\n{}", node.log());
    assert!(stderr.contains("busybox tar"), "{stderr}");
    let digest = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(digest.starts_with("sha256:"), "{digest}");

    // Independent check: skopeo + umoci.
    let check = tempfile::tempdir().unwrap();
    let rootfs = skopeo_umoci_unpack(&registry, "lab/busybox-arm64:saved", check.path()).expect("unpack");
    assert_eq!(std::fs::read(rootfs.join("srv/created")).unwrap(), b"created\n");
    assert!(
        std::fs::read_to_string(rootfs.join("etc/passwd"))
            .unwrap()
            .ends_with("walt:x:1000:1000::/:/bin/sh\n")
    );
    assert!(!rootfs.join("etc/group").exists(), "deleted file is gone");
    let sbin: Vec<_> = std::fs::read_dir(rootfs.join("usr/sbin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(sbin, ["only"], "the recreated directory hides the base's entries");
    assert!(rootfs.join("bin/busybox").is_file(), "base files stay");
    assert!(
        !rootfs.join("persist/file").exists(),
        "/persist is not part of the image"
    );
    let config = skopeo_inspect_config(&registry, "lab/busybox-arm64:saved").expect("config");
    assert_eq!(config["architecture"], "arm64");

    // A second node boots the saved image and finds every change, deletions included.
    let second = Vnode::start(&saved, "vn-arm2", &registry.host(), work, None);
    assert_eq!(
        second.run(
            work,
            "cat /srv/created; tail -n 1 /etc/passwd; test -e /etc/group || echo group-gone; ls /usr/sbin; hostname"
        ),
        "created\nwalt:x:1000:1000::/:/bin/sh\ngroup-gone\nonly\nvn-arm2\n"
    );
    drop(second);

    // A PTY through OpenSSH, then window changes and signals through our client.
    let output = run({
        let mut command = node.ssh(work);
        command.args(["-tt", "tty; echo term=$TERM; exit 7"]);
        command
    });
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(7), "{text}");
    assert!(text.contains("/dev/pts/") && text.contains("term="), "{text}");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(pty_window_changes_and_signals(&node, work));

    // SIGTERM: a clean stop, nothing left mounted or running.
    let init: i32 = node
        .log()
        .split("PID 1 is ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap();
    let status = node.stop();
    assert!(
        !Path::new(&format!("/proc/{init}")).exists(),
        "the node's PID 1 is gone"
    );
    assert!(status.success(), "{status}\n{}", node.log());
    assert!(mounts_under(work).is_empty(), "{:?}", mounts_under(work));
    let sessions = work.join("cache/sessions");
    let left: Vec<_> = std::fs::read_dir(&sessions)
        .map(Iterator::count)
        .into_iter()
        .collect();
    assert_eq!(left, [0], "state directories removed");
}

async fn pty_window_changes_and_signals(node: &Vnode, work: &Path) {
    use russh::{ChannelMsg, Sig};
    let config = ClientConfig::new(
        client::load_key_file(&work.join("user")).unwrap(),
        HostKeyPolicy::Pinned(client::parse_public_key(&node.host_key).unwrap()),
    );
    let client = NodeClient::connect(&node.target().parse().unwrap(), &config)
        .await
        .unwrap();
    let mut channel = client.open_session().await.unwrap();
    channel
        .request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .unwrap();
    channel.request_shell(true).await.unwrap();
    channel.data(&b"stty size\n"[..]).await.unwrap();
    let mut seen = String::new();
    let mut exit = None;
    let mut read_until =
        async |channel: &mut russh::Channel<russh::client::Msg>, needle: &str, seen: &mut String| {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while !seen.contains(needle) {
                let message = tokio::time::timeout_at(deadline, channel.wait())
                    .await
                    .unwrap_or_else(|_| panic!("no {needle:?} from the node; got {seen:?}"));
                match message {
                    Some(ChannelMsg::Data { data }) => seen.push_str(&String::from_utf8_lossy(&data)),
                    Some(ChannelMsg::ExitStatus { exit_status }) => exit = Some(exit_status),
                    Some(_) => {}
                    None => panic!("channel closed before {needle:?}; got {seen:?}"),
                }
            }
        };
    read_until(&mut channel, "24 80", &mut seen).await;
    channel.window_change(100, 40, 0, 0).await.unwrap();
    channel.data(&b"stty size\n"[..]).await.unwrap();
    read_until(&mut channel, "40 100", &mut seen).await;
    channel.data(&b"exit 5\n"[..]).await.unwrap();
    while exit.is_none() {
        match tokio::time::timeout(Duration::from_secs(30), channel.wait())
            .await
            .unwrap()
        {
            Some(ChannelMsg::ExitStatus { exit_status }) => exit = Some(exit_status),
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(exit, Some(5), "{seen}");

    // A signal ends the process; the client learns which one.
    let mut channel = client.open_session().await.unwrap();
    channel.exec(true, "echo started; exec sleep 60").await.unwrap();
    let mut started = String::new();
    while !started.contains("started") {
        if let Some(ChannelMsg::Data { data }) = channel.wait().await {
            started.push_str(&String::from_utf8_lossy(&data));
        }
    }
    channel.signal(Sig::TERM).await.unwrap();
    let mut signal = None;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(30), channel.wait()).await {
        if let ChannelMsg::ExitSignal { signal_name, .. } = message {
            signal = Some(signal_name);
        }
    }
    assert!(matches!(signal, Some(Sig::TERM)), "{signal:?}");
    client.close().await;
}

/// The manifest digest a tag points at, as skopeo sees it.
fn skopeo_digest(reference: &str) -> String {
    let output = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn vnode_killed_mid_save_fails_the_save_and_leaves_the_tag_alone() {
    use walt_tests::images::{Arch, OciLayout};
    let registry = walt_tests::registry::Registry::start().expect("registry");
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox image");
    layout
        .push("base", &registry, "lab/busybox:base")
        .expect("push the base");
    layout
        .push("base", &registry, "lab/busybox:target")
        .expect("push the target");
    let base = registry.reference("lab/busybox:base");
    let target = registry.reference("lab/busybox:target");
    let before = skopeo_digest(&target);
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    authorize_user(work);
    let mut node = Vnode::start(&base, "vn-doomed", &registry.host(), work, None);
    node.run(work, "head -c 300000000 /dev/urandom > /root/big");
    let init: i32 = node
        .log()
        .split("PID 1 is ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap();

    let mut save = Command::new(walt_operator())
        .args(["save", "--node", &node.target(), "--identity"])
        .arg(work.join("user"))
        .args(["--host-key", &node.host_key, "--base", &base, "--to", &target])
        .args(["--insecure-registry", &registry.host()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = save.stderr.take().unwrap();
    let (progress, mebibytes) = std::sync::mpsc::channel::<String>();
    let collected = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buffer) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buffer[..n]);
            let _ = progress.send(String::from_utf8_lossy(&all).into_owned());
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    // Wait until the save is well under way (its progress line), then kill the node.
    let deadline = std::time::Instant::now() + Duration::from_mins(2);
    loop {
        let text = mebibytes
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the save reports progress");
        let moved = text
            .rsplit('\r')
            .find_map(|line| line.split(" MiB,").next()?.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if moved >= 20.0 {
            break;
        }
    }
    node.child.kill().unwrap();
    node.child.wait().unwrap();

    let status = save.wait().unwrap();
    let stderr = collected.join().unwrap();
    assert!(!status.success(), "the save must fail: {stderr}");
    assert!(
        stderr.contains("dropped"),
        "the error says the node dropped: {stderr}"
    );
    assert_eq!(skopeo_digest(&target), before, "the target tag did not move");
    assert_eq!(
        registry.uploads_holding_data(),
        Vec::<(String, u64)>::new(),
        "the failed layer upload was cancelled, not left in the registry"
    );
    // The killed runtime's node went with it.
    Wait::new("the node's PID 1 to be gone", Duration::from_secs(10))
        .every(Duration::from_millis(100))
        .until(|| !Path::new(&format!("/proc/{init}")).exists())
        .unwrap();
}

#[test]
fn vnode_of_an_image_with_walt_init_scripts_runs_its_init() {
    use walt_tests::images::{Arch, OciLayout};
    let registry = walt_tests::registry::Registry::start().expect("registry");
    let layout = OciLayout::walt_busybox(Arch::Amd64, "pc-x86-64").expect("walt busybox image");
    layout
        .push("base", &registry, "lab/walt-busybox:base")
        .expect("push the image");
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    authorize_user(work);
    let mut node = Vnode::start(
        &registry.reference("lab/walt-busybox:base"),
        "vn-init",
        &registry.host(),
        work,
        None,
    );
    assert!(node.log().contains("init mode"), "{}", node.log());
    // The start script exec'd busybox init (it renames itself `init`), PID 1 of the node.
    assert_eq!(
        node.run(work, "tr '\\0' ' ' < /proc/1/cmdline | cut -d ' ' -f 1; hostname"),
        "init\nvn-init\n"
    );
    // Root over SSH is root in the node only: the bounded set and no_new_privs, for the session's
    // shell and for the node's init; no mount, no module.
    assert_bounded(&node.run(work, "cat /proc/$$/status"), "the SSH session's shell");
    assert_bounded(&node.run(work, "cat /proc/1/status"), "the node's init");
    let refused = node.run(
        work,
        "mkdir -p /tmp/m; mount -t tmpfs none /tmp/m 2>&1; echo junk > /tmp/x.ko; insmod /tmp/x.ko 2>&1; true",
    );
    assert!(
        refused.contains("denied") || refused.contains("not permitted"),
        "mount: {refused}"
    );
    // EPERM (no CAP_SYS_MODULE); a kernel without module support says ENOSYS to everyone first.
    assert!(refused.contains("insmod: can't insert"), "{refused}");
    // A user namespace: the seccomp filter (no capability is needed to make one).
    assert_eq!(
        node.run(work, "unshare -U true 2>&1; echo rc=$?"),
        "unshare: unshare(0x10000000): Operation not permitted\nrc=1\n"
    );
    if Path::new("/proc/modules").exists() {
        assert!(
            refused.contains("can't insert '/tmp/x.ko': Operation not permitted"),
            "{refused}"
        );
    }
    assert!(
        node.log()
            .contains("the image's processes run with capabilities CHOWN,")
            && node.log().contains("no_new_privs on, seccomp filter on (keyctl,"),
        "{}",
        node.log()
    );
    let status = node.stop();
    assert!(status.success(), "{status}\n{}", node.log());
    assert!(mounts_under(work).is_empty(), "{:?}", mounts_under(work));
}
